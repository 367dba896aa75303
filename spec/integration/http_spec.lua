-- HTTP through the real binary: curl and raw TCP as clients.
local osara = require "osara"
local H = require "spec.helpers.host"
local T = require "spec.helpers.http"
local cjson = require "cjson"

local APP = [[
local osara = require "osara"
osara.http { max_body = 1000, max_header = 2000, request_timeout = 0.5 }
local Item = osara.schema { name = "string", qty = osara.integer { min = 1 } }
osara.route("GET", "/users/{id:int}", function(req, id) return { id = id, kind = math.type and "" or type(id) } end)
osara.route("GET", "/files/*", function(req, rest) return { rest = rest } end)
osara.route("GET", "/q", function(req) return { a = req.query.a, b = req.query.b } end)
osara.route("POST", "/echo", function(req) return { len = #req.body, data = req:data() } end)
osara.route("POST", "/items", function(req) return 201, { created = req.value.name } end, { schema = Item })
osara.route("GET", "/page", function() return "<h1>hi</h1>" end, { format = "html" })
osara.route("GET", "/multi", function() return { x = 1 } end, { format = { "json", "msgpack" } })
osara.route("GET", "/boom", function() error("kaboom") end)
osara.route("GET", "/slow", function() osara.sleep(0.05) return { slept = true } end)
-- a label value with every character the exposition format escapes
osara.metrics.counter("spec_escapes_total", { v = 'a"b\\c\nd' }):inc()
osara.resource("/things/{id}", {
  get = function(req, id) return { id = id } end,
  delete = function(req, id) return 204, "" end,
})
osara.route("GET", "/raw/**", function(req, rest) return { rest = rest, raw_path = req.raw_path } end)
osara.route("GET", "/n/{x:number}", function(req, x) return { x = x } end)
osara.route("GET", "/neg", function() return { x = 1 } end, { format = { "json", "msgpack", "html" } })
osara.route("GET", "/htmlonly", function() return { x = 1 } end, { format = "html" })
osara.route("GET", "/rid", function(req) osara.log.info("handling request %s", req.id) return { id = req.id } end)
]]

describe("http", function()
  local dir, p, port
  setup(function()
    dir = H.tmpdir()
    p, port = T.app(dir, APP, nil, { errors = { "http GET /boom failed", "http GET /htmlonly failed" } })
  end)
  teardown(function()
    H.stop(p)
    H.cleanup()
  end)
  local function url(path) return "http://127.0.0.1:" .. port .. path end

  it("passes typed path parameters and a trailing wildcard", function()
    local status, _, body = T.curl { url "/users/42" }
    assert.are.equal(200, status)
    assert.are.equal(42, cjson.decode(body).id)
    assert.are.equal(404, (T.curl { url "/users/abc" }))
    local _, _, b2 = T.curl { url "/files/a/b/c.txt" }
    assert.are.equal("a/b/c.txt", cjson.decode(b2).rest)
    local _, _, b3 = T.curl { url "/q?a=1&b=hello%20world" }
    assert.are.same({ a = "1", b = "hello world" }, cjson.decode(b3))
  end)

  it("gh_13_wildcard: decodes each segment of a * parameter and never lets it climb out", function()
    local function rest(path, ...)
      local status, _, body = T.curl { "--path-as-is", url(path), ... }
      return status, status == 200 and cjson.decode(body).rest or nil
    end
    -- before: the path was decoded whole, so %2F became a separator and
    -- ..%2f.. reached the handler as ../..
    assert.are.equal(404, (rest "/files/..%2f..%2fetc%2fpasswd"))
    assert.are.equal(404, (rest "/files/a/../../etc/passwd"))
    assert.are.equal(404, (rest "/files/a%2Fb"))
    assert.are.equal(404, (rest "/files/./a"))
    assert.are.equal(404, (rest "/files/a%00b"))
    assert.are.same({ 200, "a b/c+d/..x" }, { rest "/files/a%20b/c+d/..x" })
    -- ** is the raw form: as sent, still percent-encoded, unchecked
    local status, _, body = T.curl { "--path-as-is", url "/raw/..%2f..%2fx/y" }
    assert.are.equal(200, status)
    assert.are.same({ rest = "..%2f..%2fx/y", raw_path = "/raw/..%2f..%2fx/y" }, cjson.decode(body))
  end)

  it("gh_13_int_param: matches an int parameter only when it is an exact integer", function()
    -- before: 99999999999999999999999 matched and came out as 1e+23
    assert.are.equal(404, (T.curl { url "/users/99999999999999999999999" }))
    assert.are.equal(404, (T.curl { url "/users/9007199254740993" }))
    assert.are.equal(404, (T.curl { url "/users/1e+23" }))
    assert.are.equal(404, (T.curl { url "/users/1.0" }))
    assert.are.equal(200, (T.curl { url "/users/-9007199254740992" }))
    local _, _, body = T.curl { url "/users/00012345678901" }
    assert.are.equal(12345678901, cjson.decode(body).id)
    local _, _, b2 = T.curl { url "/n/1.5e3" }
    assert.are.equal(1500, cjson.decode(b2).x)
    for _, bad in ipairs { "0x10", "inf", "nan", "1e999", "1.", "-", "." } do
      assert.are.equal(404, (T.curl { url("/n/" .. bad) }), bad)
    end
  end)

  it("answers 404, 405 with Allow, HEAD and OPTIONS", function()
    assert.are.equal(404, (T.curl { url "/nope" }))
    local status, headers = T.curl { "-X", "PUT", url "/things/1" }
    assert.are.equal(405, status)
    assert.are.equal("DELETE, GET, HEAD, OPTIONS", headers.allow)
    local s2, h2, b2 = T.curl { "-I", url "/things/1" }
    assert.are.equal(200, s2)
    assert.are.equal("", b2)
    assert.is_truthy(h2["content-length"])
    local s3, h3 = T.curl { "-X", "OPTIONS", url "/things/1" }
    assert.are.equal(204, s3)
    assert.matches("DELETE", h3.allow)
  end)

  it("encodes by the route's format and by Accept", function()
    local _, h, body = T.curl { url "/page" }
    assert.matches("text/html", h["content-type"])
    assert.are.equal("<h1>hi</h1>", body)
    local _, h2 = T.curl { "-H", "Accept: application/msgpack", url "/multi" }
    assert.are.equal("application/msgpack", h2["content-type"])
    local _, h3, b3 = T.curl { url "/multi" }
    assert.are.equal("application/json", h3["content-type"])
    assert.are.equal('{"x":1}', b3)
  end)

  it("gh_14_table_as_html: sends a table asked for as text/html as JSON, never its address", function()
    local status, h, body = T.curl { "-H", "Accept: text/html", url "/neg" }
    assert.are.equal(200, status)
    assert.are.equal("application/json", h["content-type"])
    assert.are.equal('{"x":1}', body)
    -- a route that only sends html and returns a table: 500, logged
    local s2, _, b2 = T.curl { url "/htmlonly" }
    assert.are.equal(500, s2)
    assert.is_nil(b2:find("table: ", 1, true))
    assert.matches("returned a table, but its format html sends strings", H.expect(p, "http GET /htmlonly failed"))
  end)

  it("decodes json and form bodies, including a chunked upload", function()
    local _, _, body = T.curl { "-H", "Content-Type: application/json", "-d", '{"k":[1,2]}', url "/echo" }
    assert.are.same({ 1, 2 }, cjson.decode(body).data.k)
    local _, _, b2 = T.curl { "-d", "a=1&b=x+y", url "/echo" }
    assert.are.same({ a = "1", b = "x y" }, cjson.decode(b2).data)
    local _, _, b3 = T.curl { "-H", "Transfer-Encoding: chunked", "-H", "Content-Type: text/plain",
                              "--data-binary", string.rep("z", 600), url "/echo" }
    assert.are.equal(600, cjson.decode(b3).len)
  end)

  it("validates a body with a schema: 400 with the error paths", function()
    local status, _, body = T.curl { "-H", "Content-Type: application/json", "-d", '{"name":5,"qty":0}', url "/items" }
    assert.are.equal(400, status)
    local errs = cjson.decode(body).errors
    table.sort(errs, function(a, b) return a.path < b.path end)
    assert.are.same({ { path = "/name", message = "expected string, got integer" },
                      { path = "/qty", message = "must be >= 1, got 0" } }, errs)
    local s2, _, b2 = T.curl { "-H", "Content-Type: application/json", "-d", '{"name":"x","qty":2}', url "/items" }
    assert.are.equal(201, s2)
    assert.are.equal("x", cjson.decode(b2).created)
  end)

  it("turns a handler error into a 500 naming a request id, logged with file:line", function()
    local status, headers, body = T.curl { url "/boom" }
    assert.are.equal(500, status)
    local b = cjson.decode(body)
    assert.are.equal("internal error", b.error)
    assert.are.equal(tostring(b.request_id), headers["x-request-id"])
    assert.is_nil(body:find("kaboom"))
    local line = H.expect(p, "http GET /boom failed")
    assert.matches("request id " .. b.request_id .. ", .*app.lua:11%): .*app.lua:11: kaboom", line)
  end)

  it("gh_14_request_id: takes the client's X-Request-Id or makes one, as req.id and in the answer", function()
    local status, headers, body = T.curl { "-H", "X-Request-Id: trace-abc.123", url "/rid" }
    assert.are.equal(200, status)
    assert.are.equal("trace-abc.123", headers["x-request-id"])
    assert.are.equal("trace-abc.123", cjson.decode(body).id)
    H.expect(p, "handling request trace-abc.123")
    local seen = {}
    for _, given in ipairs { "", "has space", ("x"):rep(200) } do
      local _, h, b = T.curl { "-H", "X-Request-Id: " .. given, url "/rid" }
      local id = cjson.decode(b).id
      assert.matches("^%x+$", id)
      assert.are.equal(16, #id)
      assert.are.equal(id, h["x-request-id"])
      assert.is_nil(seen[id])
      seen[id] = true
    end
  end)

  it("runs routes that yield, and serves pipelined requests in order on one connection", function()
    local out = T.raw(port, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /users/7 HTTP/1.1\r\nHost: x\r\n\r\nGET /users/8 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 3)
    local a = out:find('"slept":true', 1, true)
    local b = out:find('"id":7', 1, true)
    local c = out:find('"id":8', 1, true)
    assert.is_truthy(a and b and c, out)
    assert.is_true(a < b and b < c)
  end)

  it("answers a malformed pipelined request after the requests before it", function()
    -- before: the 400 went out at once and closed the connection, so the
    -- slow request before it was never answered
    local out = T.raw(port, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\nBLAH\r\n\r\n", 3)
    local a, b = out:find('"slept":true', 1, true), out:find("HTTP/1.1 400", 1, true)
    assert.is_truthy(a and b, out)
    assert.is_true(a < b, out)
  end)

  it("answers 413, 431, 408 and 400 and closes cleanly", function()
    local s1 = T.curl { "-d", string.rep("x", 5000), url "/echo" }
    assert.are.equal(413, s1)
    local s2 = T.curl { "-H", "X-Big: " .. string.rep("h", 3000), url "/users/1" }
    assert.are.equal(431, s2)
    local out = T.raw(port, { "GET /users/1 HTTP/1.1\r\nHo", 1.0, "st: x\r\n\r\n" }, 2)
    assert.matches("^HTTP/1.1 408", out)
    assert.matches("^HTTP/1.1 400", T.raw(port, "BLAH\r\n\r\n"))
    assert.matches("^HTTP/1.1 400", T.raw(port, "GET /a b c HTTP/9.9\r\n\r\n"))
    local s3, _, b3 = T.curl { url "/%FF%FE" }
    assert.are.equal(400, s3)
    assert.matches("UTF%-8", b3)
    assert.are.equal(200, (T.curl { url "/users/1" })) -- still serving
  end)

  it("survives random bytes at the socket (bounded fuzz)", function()
    local deadline = osara.monotonic() + 3
    local n = 0
    while osara.monotonic() < deadline do
      local bytes = {}
      for i = 1, math.random(1, 300) do bytes[i] = string.char(math.random(0, 255)) end
      local s = table.concat(bytes)
      if n % 2 == 0 then s = "GET /" .. s end
      T.raw(port, s, 0.2)
      n = n + 1
    end
    assert.is_true(n >= 5)
    assert.are.equal(200, (T.curl { url "/users/1" }))
  end)

  it("exposes /healthz and Prometheus /metrics", function()
    local status, _, body = T.curl { url "/healthz" }
    assert.are.equal(200, status)
    assert.are.equal("ok", cjson.decode(body).status)
    local _, headers, text = T.curl { url "/metrics" }
    assert.matches("text/plain", headers["content-type"])
    -- every line is a comment or `name{labels} value`
    for line in text:gmatch("[^\n]+") do
      if line:sub(1, 1) ~= "#" then
        assert.truthy(line:match('^[%a_:][%w_:]*{.*} [%d.e+%-]+$') or line:match("^[%a_:][%w_:]* [%d.e+%-]+$"), line)
      end
    end
    assert.matches('osara_http_requests_total{route="/users/{id:int}",status="200"}', text)
    assert.is_truthy(text:find('spec_escapes_total{v="a\\"b\\\\c\\nd"} 1\n', 1, true), text)
    assert.matches("osara_http_request_seconds_bucket", text)
  end)
end)

describe("http server-sent events and reload", function()
  after_each(H.cleanup)

  it("streams updates and stops the stream when the client leaves", function()
    local dir = H.tmpdir()
    local p, port = T.app(dir, [[
local osara = require "osara"
local db = osara.store("state", { memory = true })
osara.every(0.05, function() db:set("time", osara.now()) end)
osara.route("GET", "/updates", function() return osara.sse(db:watch(""), { keepalive = 0.1 }) end)
]])
    local out = T.raw(port, "GET /updates HTTP/1.1\r\nHost: x\r\n\r\n", 0.5)
    assert.matches("text/event%-stream", out)
    local _, events = out:gsub('data: {[^\n]*"time"', "")
    assert.is_true(events >= 3, out)
    -- after the client left, the stream's coroutines end
    H.eventually(function()
      local _, _, body = T.curl { "http://127.0.0.1:" .. port .. "/healthz" }
      return cjson.decode(body).inflight <= 1 -- only the healthz request itself
    end, 5, "the SSE coroutines to end")
    H.stop(p)
  end)

  it("gh_13_stream_unread: drops a stream client that does not read, before it grows the host", function()
    -- before: every event was queued in memory for as long as it stayed
    local dir = H.tmpdir()
    local p, port = T.app(dir, [[
local osara = require "osara"
local big = string.rep("x", 256 * 1024)
osara.route("GET", "/s", function()
  return osara.sse(function() osara.sleep(0.005) return big end, { keepalive = 0.1 })
end)
]])
    local client = H.child({ "bash", "-c", ([[
exec 3<>/dev/tcp/127.0.0.1/%d
printf 'GET /s HTTP/1.1\r\nHost: x\r\n\r\n' >&3
echo sent
sleep 60]]):format(port) }, { status = false })
    H.expect(client, "sent")
    local function inflight()
      local _, _, body = T.curl { "http://127.0.0.1:" .. port .. "/healthz" }
      return cjson.decode(body).inflight
    end
    H.eventually(function() return inflight() >= 2 end, 10, "the stream to start")
    H.eventually(function() return inflight() <= 1 end, 30, "the unread stream to be dropped")
    H.kill9(client)
    H.stop(p)
  end)

  it("swaps routes on reload without closing keep-alive connections", function()
    local dir = H.tmpdir()
    local function app(v)
      return ([[
local osara = require "osara"
osara.route("GET", "/v", function() return { version = %d } end)
]]):format(v)
    end
    H.write(dir .. "/app.lua", app(1))
    local p = H.osara { "run", "--watch", "--http", "127.0.0.1:0", dir .. "/app.lua" }
    local port = T.listening(p)
    local proc = H.child { "bash", "-c", ([[
exec 3<>/dev/tcp/127.0.0.1/%d
printf 'GET /v HTTP/1.1\r\nHost: x\r\n\r\n' >&3
sleep 0.4
printf 'GET /v HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&3
timeout 3 cat <&3]]):format(port) }
    osara.sleep(0.15)
    H.write(dir .. "/app.lua", app(2))
    H.expect(p, "reloaded")
    H.finish(proc, { status = false })
    local out = proc:output()
    local a, b = out:find('"version":1', 1, true), out:find('"version":2', 1, true)
    assert.is_truthy(a and b, out)
    assert.is_true(a < b)
    H.stop(p)
  end)
end)

describe("http request lifetimes (gh-12)", function()
  after_each(H.cleanup)

  it("gh_12_reject_frees: frees the request it was parsing when it rejects it", function()
    -- each rejected upload held up to max_body bytes forever: 30 x 1 MiB
    local dir = H.tmpdir()
    local p, port = T.app(dir, [[
local osara = require "osara"
osara.http { max_body = 1048576 }
osara.route("POST", "/up", function(req) return { len = #req.body } end)
]])
    local body = dir .. "/body"
    H.write(body, string.rep("x", 1536 * 1024))
    local url = "http://127.0.0.1:" .. port .. "/up"
    local function upload() return (T.curl { "-H", "Expect:", "-H", "Transfer-Encoding: chunked", "--data-binary", "@" .. body, url }) end
    -- the client may see a reset instead of the 413 (the server closes with
    -- the upload unread): count the rejections on the server's side
    upload()
    local before = T.rss_kb(p)
    for _ = 1, 30 do upload() end
    local _, _, metrics = T.curl { "http://127.0.0.1:" .. port .. "/metrics" }
    assert.are.equal("31", metrics:match('osara_http_rejected_total{status="413"} (%d+)'))
    -- under ASan freed memory sits in quarantine: LeakSanitizer's report at
    -- exit (checked by H.stop) is the measure there
    if os.getenv("OSARA_SANITIZED") ~= "1" then
      local grown = T.rss_kb(p) - before
      assert.is_true(grown < 10 * 1024, ("RSS grew by %d KiB over 30 rejected uploads"):format(grown))
    end
    H.stop(p)
  end)

  it("gh_12_request_handle: raises when a request is used after its response was sent", function()
    local dir = H.tmpdir()
    local p, port = T.app(dir, [[
local osara = require "osara"
local http_c = require "osara.http_c"
local kept
osara.route("GET", "/keep", function(req) kept = req._token return { kept = true } end)
osara.route("GET", "/late", function()
  collectgarbage()
  local ok, err = pcall(http_c.write, kept, "late")
  local ok2, err2 = pcall(http_c.alive, kept)
  return { ok = ok or ok2, err = tostring(err), err2 = tostring(err2) }
end)
]])
    local base = "http://127.0.0.1:" .. port
    assert.are.equal(200, (T.curl { base .. "/keep" }))
    local status, _, body = T.curl { base .. "/late" }
    assert.are.equal(200, status)
    local r = cjson.decode(body)
    assert.is_false(r.ok)
    assert.matches("request already answered", r.err)
    assert.matches("request already answered", r.err2)
    H.stop(p)
  end)

  it("gh_12_reload_port: finishes a slow request of the old version after a reload moved the port", function()
    local dir = H.tmpdir()
    -- port 0: the kernel picks a free port; ":0" is another address (a
    -- new listener) on 127.0.0.1 too
    local function app(v, listen)
      return ([[
local osara = require "osara"
osara.http { listen = "%s" }
osara.route("GET", "/slow", function()
  osara.log.info("slow started")
  osara.sleep(1)
  return { version = %d }
end)
osara.route("GET", "/v", function() return { version = %d } end)
]]):format(listen, v, v)
    end
    H.write(dir .. "/app.lua", app(1, "127.0.0.1:0"))
    local p = H.osara { "run", "--watch", dir .. "/app.lua" }
    local a = T.listening(p)
    -- a keep-alive client: the slow request; the connection closes once
    -- the old version (which holds the old listener) is done
    local client = H.child({ "bash", "-c", ([[
exec 3<>/dev/tcp/127.0.0.1/%d
printf 'GET /slow HTTP/1.1\r\nHost: x\r\n\r\n' >&3
timeout 5 cat <&3]]):format(a) }, { status = false })
    H.expect(p, "slow started")
    H.write(dir .. "/app.lua", app(2, ":0"))
    local b = T.listening(p)
    H.expect(p, "reloaded")
    local status, _, body = T.curl { "http://127.0.0.1:" .. b .. "/v" }
    assert.are.equal(200, status)
    assert.are.equal(2, cjson.decode(body).version)
    H.finish(client, { timeout = 10 })
    local out = client:output()
    assert.matches('"version":1', out)
    assert.is_nil((T.curl { "http://127.0.0.1:" .. a .. "/v" })) -- the old port is closed
    H.stop(p)
  end)
end)

describe("http rough edges (gh-14)", function()
  after_each(H.cleanup)

  it("gh_14_duplicate_route: names the user's line for a route registered twice", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
osara.route("GET", "/a", function() return {} end)
osara.route("GET", "/a", function() return {} end)
]])
    local status, out = H.run({ "check", dir .. "/app.lua" }, 20, nil, { errors = { "already registered" } })
    assert.are.equal(1, status)
    assert.is_truthy(out:find(dir .. "/app.lua:3: route 'GET /a' is already registered at " .. dir .. "/app.lua:2",
      1, true), out)
    assert.is_nil(out:find("osara/http.lua", 1, true), out)
  end)

  it("gh_14_http_port: rejects a listen port out of range instead of wrapping it", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
osara.route("GET", "/a", function() return {} end)
]])
    for _, port in ipairs { "99999", "70000", "-1", "8o80" } do
      local status, out = H.run({ "run", "--http", "127.0.0.1:" .. port, dir .. "/app.lua" }, 20, nil,
                                { errors = { "invalid port" } })
      assert.are.equal(1, status)
      assert.is_truthy(out:find("invalid port '" .. port .. "' in listen address '127.0.0.1:" .. port
        .. "' (0 to 65535) (from --http or OSARA_HTTP_LISTEN)", 1, true), out)
      assert.is_nil(out:find("listening"), out)
    end
  end)
end)
