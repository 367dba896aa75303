-- Issue 14 item 2: osara.on_start runs after the clients connected and
-- before the first message; osara.on_stop runs on a graceful stop after
-- the consumers stopped and before the clients close (it may send).
local H = require "spec.helpers.host"
local T = require "spec.helpers.http"
local K = require "spec.helpers.kafka"
local cjson = require "cjson"

describe("osara.on_start / osara.on_stop", function()
  after_each(H.cleanup)

  it("runs on_start before the first message and on_stop before the clients close", function()
    local broker, bootstrap = K.broker { "--topic", "in", "--topic", "out" }
    local dir = H.tmpdir()
    local app = ([[
local osara = require "osara"
osara.http {}
local kafka = osara.kafka { ["bootstrap.servers"] = %q, ["group.id"] = "lifecycle" }
local input, out = kafka:topic("in"), kafka:topic("out")
local started = false
osara.on_start(function()
  osara.log.info("on_start: ready=%%s", tostring(require("osara.health").readiness()))
  assert(input:send("first"):wait())   -- already there when the consumer starts
  osara.sleep(0.3)
  started = true
  osara.log.info("on_start: done")
end)
kafka:handle("in", function(msg)
  osara.log.info("handled %%s started=%%s", msg.value, tostring(started))
end)
osara.on_stop(function()
  osara.log.info("on_stop: begins")
  assert(out:send("flushed at stop"):wait())
  osara.log.info("on_stop: delivered")
end)
]]):format(bootstrap)
    local p, port = T.app(dir, app, { "--watch" })
    -- readiness says so while on_start runs
    local _, _, body = T.curl { ("http://127.0.0.1:%d/readyz"):format(port) }
    local starting = cjson.decode(body)
    if starting.status ~= "ready" then
      assert.matches("starting", table.concat(starting.not_ready, " "))
    end
    H.expect(p, "on_start: done", 40)
    local line = H.expect(p, "handled first", 30)
    assert.matches("started=true", line)
    -- a reload runs neither hook again
    H.write(dir .. "/app.lua", app .. "\n-- changed\n")
    H.expect(p, "reloaded", 10)
    H.stop(p, { timeout = 30 })
    local log = p:output()
    local _, starts = log:gsub("on_start: done", "")
    assert.are.equal(1, starts)
    local _, stops = log:gsub("on_stop: begins", "")
    assert.are.equal(1, stops)
    assert.is_true(log:find("SIGTERM received", 1, true) < log:find("on_stop: begins", 1, true))
    assert.matches("on_stop: delivered", log)
    local got = K.eventually(bootstrap, "out", function(m) return #m >= 1 end, 30, "the message on_stop sent")
    assert.are.equal('"flushed at stop"', got[1].value) -- json, the default codec
    H.stop(broker)
  end)

  it("stops the host with status 1 when an on_start hook raises", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
osara.on_start(function() error("cannot warm the cache") end)
osara.every(0.01, function() osara.log.info("timer ran") end)
]])
    local status, out = H.run({ "run", dir .. "/app.lua" }, 20, nil,
      { errors = { "error in on_start", "an on_start hook failed" } })
    assert.are.equal(1, status)
    assert.matches("cannot warm the cache", out)
    assert.is_nil(out:find("timer ran", 1, true))
  end)

  it("raises when a hook is registered after the script loaded", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
osara.after(0, function()
  local ok, err = pcall(osara.on_stop, function() end)
  osara.log.info("late: %s %s", tostring(ok), tostring(err))
end)
]])
    local p = H.osara { "run", dir .. "/app.lua" }
    local line = H.expect(p, "late:", 10)
    assert.matches("late: false .*register hooks while the script loads", line)
    H.stop(p)
  end)
end)
