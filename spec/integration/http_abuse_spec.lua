-- The HTTP server under abuse (issue 13 item 8): clients that pipeline
-- without reading, connections that never send a byte.
local osara = require "osara"
local H = require "spec.helpers.host"
local T = require "spec.helpers.http"

local sanitized = os.getenv("OSARA_SANITIZED") == "1"

local function metric(port, pattern)
  local _, _, text = T.curl { "http://127.0.0.1:" .. port .. "/metrics" }
  return tonumber((text or ""):match(pattern))
end

describe("http server under abuse (gh-13)", function()
  after_each(H.cleanup)

  it("gh_13_pipelining: bounds a client that pipelines without reading, then answers it all", function()
    -- before: 100,000 pipelined requests grew the host by ~110 MiB (every
    -- answer queued in memory); now it stops reading that connection
    local n = sanitized and 20000 or 100000
    local dir = H.tmpdir()
    local p, port = T.app(dir, [[
local osara = require "osara"
local big = string.rep("x", 1024)
osara.route("GET", "/x", function() return big end)
]])
    local one = "GET /x HTTP/1.1\r\nHost: x\r\n\r\n"
    H.write(dir .. "/reqs", one:rep(n - 1) .. "GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    -- the client writes everything (blocking once the server stops
    -- reading), reads nothing until told to, then counts the answers
    local client = H.child({ "bash", "-c", ([[
exec 3<>/dev/tcp/127.0.0.1/%d
trap '' PIPE
cat %s/reqs >&3 &
while [ ! -e %s/go ]; do sleep 0.05; done
timeout 120 cat <&3 | grep -o 'HTTP/1.1 200' | wc -l]]):format(port, dir, dir) }, { status = false })
    local before = T.rss_kb(p)
    local peak, last, stable_since = before, -1, osara.monotonic()
    local deadline = osara.monotonic() + (sanitized and 120 or 60)
    -- watch the host until it stops answering (or answered everything)
    while osara.monotonic() < deadline do
      peak = math.max(peak, T.rss_kb(p))
      local done = metric(port, 'osara_http_requests_total{route="/x",status="200"} (%d+)') or 0
      if done ~= last then last, stable_since = done, osara.monotonic() end
      if done >= n or osara.monotonic() - stable_since > 1.5 then break end
      osara.sleep(0.1)
    end
    assert.is_true(last < n, "the server answered every request of a client that reads nothing")
    if not sanitized then
      local grown = peak - before
      assert.is_true(grown < 20 * 1024, ("RSS grew by %d KiB with a client not reading"):format(grown))
    end
    -- the client reads: the server goes on and every answer arrives
    H.write(dir .. "/go", "")
    H.finish(client, { timeout = sanitized and 180 or 120 })
    assert.are.equal(tostring(n), client:output():match("(%d+)%s*$"))
    H.stop(p)
  end)

  it("gh_13_silent_connections: connections that never send a byte neither lock others out nor stay", function()
    -- before: a new connection got idle_timeout (60 s); more silent ones
    -- than max_connections answered everyone else 503 for a minute
    local dir = H.tmpdir()
    local p, port = T.app(dir, [[
local osara = require "osara"
osara.http { max_connections = 20, request_timeout = 5, idle_timeout = 60 }
osara.route("GET", "/ok", function() return { ok = true } end)
]])
    local silent = H.child({ "bash", "-c", ([[
for i in $(seq 30); do exec {fd}<>/dev/tcp/127.0.0.1/%d; done
echo opened
sleep 30]]):format(port) }, { status = false })
    H.expect(silent, "opened")
    H.eventually(function()
      return (metric(port, "osara_http_connections (%d+)") or 0) >= 20
    end, 10, "every slot taken")
    for _ = 1, 5 do
      local status = T.curl { "http://127.0.0.1:" .. port .. "/ok" }
      assert.are.equal(200, status)
    end
    assert.is_true(metric(port, "osara_http_reclaimed_total (%d+)") >= 5)
    H.kill9(silent)
    H.stop(p)
  end)

  it("gh_13_request_timeout: closes a connection that sends nothing after the request timeout", function()
    local dir = H.tmpdir()
    local p, port = T.app(dir, [[
local osara = require "osara"
osara.http { request_timeout = 0.5, idle_timeout = 60 }
osara.route("GET", "/ok", function() return { ok = true } end)
]])
    local t0 = osara.monotonic()
    local out = T.raw(port, "", 20) -- returns when the server closes
    local took = osara.monotonic() - t0
    assert.are.equal("", out)
    assert.is_true(took < 10, ("a silent connection stayed %.1f s"):format(took))
    -- a keep-alive connection that finished a request waits idle_timeout
    -- instead: it is still open after the request timeout
    local ka = T.raw(port, { "GET /ok HTTP/1.1\r\nHost: x\r\n\r\n", 1.5, "GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" }, 10)
    local _, answers = ka:gsub("HTTP/1.1 200", "")
    assert.are.equal(2, answers, ka)
    H.stop(p)
  end)
end)
