-- Issue 14 item 5: reload reports that are true. Time from the last write
-- to new code running; a broken save reported once (editors write in
-- steps); no "http: listening" again for the same socket; an unchanged
-- script restarts nothing; a handler whose options alone changed keeps its
-- consumer running.
local osara = require "osara"
local H = require "spec.helpers.host"
local T = require "spec.helpers.http"

local APP = [[
local osara = require "osara"
local kafka = osara.kafka { ["group.id"] = "report" }
local input = kafka:topic("in")
local n = 0
kafka:handle("in", { retry = { max = RETRIES, backoff = 0.01 } }, function(msg)
  osara.log.info("handled %d", msg.value)
end)
osara.route("GET", "/x", function() return { ok = true } end)
osara.every(0.05, function() n = n + 1 input:send(n) end, { name = "feed" })
]]

local function app(retries) return (APP:gsub("RETRIES", tostring(retries))) end

-- Writes content in pieces, as editors and `sed -i` do.
local function write_in_steps(path, pieces)
  local f = assert(io.open(path, "w"))
  for _, piece in ipairs(pieces) do
    f:write(piece)
    f:flush()
    osara.sleep(0.02)
  end
  f:close()
end

local function count(text, plain)
  local n, from = 0, 1
  while true do
    local i = text:find(plain, from, true)
    if not i then return n end
    n, from = n + 1, i + #plain
  end
end

describe("reload reports", function()
  after_each(H.cleanup)

  it("reports an unchanged script as all kept, without listening again", function()
    local dir = H.tmpdir()
    local p = T.app(dir, app(1))
    H.expect(p, "handled", 20)
    p:kill("HUP")
    local line = H.expect(p, "reloaded", 20)
    assert.matches("%(SIGHUP%) in [%d.]+ ms: 3 kept, 0 added, 0 removed, 0 restarted, 0 updated$", line)
    H.stop(p)
    assert.are.equal(1, count(p:output(), "http: listening on"))
  end)

  it("keeps the consumer running when only a handler's options change", function()
    local dir = H.tmpdir()
    local p = T.app(dir, app(1), { "--watch" })
    H.expect(p, "handled", 20)
    H.write(dir .. "/app.lua", app(2))
    local line = H.expect(p, "reloaded", 20)
    assert.matches("2 kept, 0 added, 0 removed, 0 restarted, 1 updated; updated kafka in %(group report%)$", line)
    -- the next message is handled at once, not after a consumer restart
    local t0 = osara.monotonic()
    H.expect(p, "handled", 20)
    assert.is_true(osara.monotonic() - t0 < 2, "a message handled within 2 s of the reload")
    H.stop(p)
  end)

  it("times a reload from the last write and reports a broken save once", function()
    local dir = H.tmpdir()
    local path = dir .. "/app.lua"
    local p = T.app(dir, app(1), { "--watch" }, { errors = { "reload failed %(file changed%)" } })
    H.expect(p, "handled", 20)
    -- an unrelated file event long before the change is not counted
    H.write(dir .. "/notes.txt", "x")
    osara.sleep(1)
    H.write(path, app(1) .. "-- a comment\n")
    local line = H.expect(p, "reloaded", 20)
    local ms = tonumber(line:match(" in ([%d.]+) ms"))
    assert.is_true(ms < 500, line)
    -- a save in steps whose middle does not parse: no failure reported
    write_in_steps(path, { app(1), "local broken = (\n", "1)\n" })
    H.expect(p, "reloaded", 20)
    -- a broken save, written in steps, is reported once
    write_in_steps(path, { app(1), "local broken = (\n", "-- still open\n" })
    H.expect(p, "reload failed", 20)
    osara.sleep(0.5)
    H.write(path, app(1) .. "-- fixed\n")
    H.expect(p, "reloaded", 20)
    H.stop(p)
    assert.are.equal(1, count(p:output(), "reload failed"))
  end)
end)
