-- Runaway and slow handlers (issue 13 item 7) through the real binary:
-- osara.runaway_timeout interrupts Lua that does not yield, the call fails
-- with kind "runaway" and takes the failure policy; osara.handler_timeout
-- cancels a call that waits too long; the second SIGTERM exits at once
-- whatever the loop does.
--
-- The hosts here stall their loop on purpose (a run of runaway_timeout),
-- so they run with --loop-stall-ms 0: the stall is what they are about.
local H = require "spec.helpers.host"
local T = require "spec.helpers.http"

local function start(dir, source, errors)
  H.write(dir .. "/app.lua", source)
  return H.osara({ "run", "--loop-stall-ms", "0", "--http", "127.0.0.1:0", dir .. "/app.lua" },
                 nil, { errors = errors })
end

-- A loop the guard can interrupt: LuaJIT does not compile spin (jit.off),
-- so the interpreter checks the hook (docs/architecture.md says which
-- compiled loops cannot be interrupted).
local SPIN = [[
local function spin() while true do end end
jit.off(spin)
]]

-- Sends sig until p exits (two signals sent back to back merge into one
-- pending signal); returns how long that took.
local function signal_until_exit(p, sig)
  local osara = require "osara"
  local t0 = osara.monotonic()
  repeat
    p:kill(sig)
  until p:wait(0.2) or osara.monotonic() - t0 > 10
  return osara.monotonic() - t0
end

local count = H.count

describe("runaway handlers", function()
  after_each(H.cleanup)

  it("interrupts a Kafka handler past osara.runaway_timeout: dead letter of kind runaway, the partition goes on", function()
    local dir = H.tmpdir()
    local p = start(dir, [[
local osara = require "osara"
]] .. SPIN .. [[
osara.runaway_timeout = 0.3
local kafka = osara.kafka { ["osara.partitions"] = 1 }
kafka:handle("ra.in", { dlq = "ra.dlq" }, function(msg)
  if msg.value.spin then spin() end
  osara.log.info("handled %d", msg.value.id)
end)
kafka:handle("ra.dlq", function(msg)
  osara.log.info("dead letter id=%d kind=%s attempts=%s", msg.value.id,
                 msg.headers["osara-error-kind"], msg.headers["osara-attempts"])
end)
osara.after(0.1, function()
  local topic = kafka:topic("ra.in")
  for id = 1, 3 do topic:send({ id = id, spin = id == 2 }) end
end)
]])
    H.expect(p, "handled 1", 20)
    local warn = H.expect(p, "runaway: kafka handler ra.in", 20)
    assert.matches("ran 0%.%d s without yielding; interrupted at .*app.lua:2", warn)
    -- the dead letter and message 3 arrive in either order
    H.eventually(function()
      local out = p:output()
      return out:find("handled 3", 1, true) and
             out:find("dead letter id=2 kind=runaway attempts=1", 1, true)
    end, 20, "message 3 handled and message 2 dead-lettered")
    H.stop(p)
    -- never retried: a runaway would hold the loop again for each attempt
    assert.are.equal(1, count(p:output(), "runaway: kafka handler"), p:output())
  end)

  it("interrupts a runaway HTTP route with a 500 and keeps serving the other routes", function()
    local dir = H.tmpdir()
    local p = start(dir, [[
local osara = require "osara"
]] .. SPIN .. [[
osara.runaway_timeout = 0.3
osara.route("GET", "/spin", function() spin() end)
osara.route("GET", "/ok", function() return { ok = true } end)
]], { "http GET /spin failed .*runaway: ran" })
    local port = T.listening(p)
    local status, _, body = T.curl({ ("http://127.0.0.1:%d/spin"):format(port) }, 20)
    assert.are.equal(500, status)
    assert.is_nil(body:find("runaway", 1, true), body) -- no error text of the code
    H.expect(p, "runaway: http GET /spin ran", 5)
    for _ = 1, 3 do
      status, _, body = T.curl({ ("http://127.0.0.1:%d/ok"):format(port) })
      assert.are.equal(200, status)
      assert.matches('"ok":true', body)
    end
    H.stop(p)
  end)

  it("says so when LuaJIT compiled the loop, and a second SIGTERM exits at once with 130", function()
    local dir = H.tmpdir()
    local p = start(dir, [[
local osara = require "osara"
osara.runaway_timeout = 0.2
osara.after(0.05, function()
  osara.log.info("spinning")
  local n = 0
  while true do n = n + 1 end
end)
]], { "runaway: after at .*app.lua:3 has run .* did not stop at the interrupt" })
    H.expect(p, "spinning", 10)
    H.expect(p, "did not stop at the interrupt", 10)
    local took = signal_until_exit(p, "TERM")
    assert.are.equal(130, H.exit_status(p, 10), p:output())
    assert.is_true(took < 3, took)
    assert.matches("second signal: exiting now", p:output())
  end)

  it("exits at once with 130 on a second SIGINT even with the guard off", function()
    local dir = H.tmpdir()
    local p = start(dir, [[
local osara = require "osara"
osara.runaway_timeout = false
assert(osara.runaway_timeout == false)
osara.after(0.05, function()
  osara.log.info("spinning")
  while true do end
end)
]])
    H.expect(p, "spinning", 10)
    local took = signal_until_exit(p, "INT")
    assert.are.equal(130, H.exit_status(p, 10), p:output())
    assert.is_true(took < 3, took)
  end)
end)

describe("slow handlers", function()
  after_each(H.cleanup)

  it("cancels a call past osara.handler_timeout: it takes the failure path and the next message runs", function()
    local dir = H.tmpdir()
    local p = start(dir, [[
local osara = require "osara"
osara.handler_timeout = 0.3
osara.slow_handler_warning = 0.2
local kafka = osara.kafka { ["osara.partitions"] = 1 }
kafka:handle("ht.in", {
  retry = { max = 1, backoff = 0 },
  on_failure = function(msg, err, attempts)
    osara.log.info("on_failure id=%d attempts=%d timeout=%s", msg.value.id, attempts,
                   tostring(err:find("osara.handler_timeout", 1, true) ~= nil))
  end,
}, function(msg)
  if msg.value.hang then osara.sleep(3600) end
  osara.log.info("handled %d", msg.value.id)
end)
osara.after(0.1, function()
  local topic = kafka:topic("ht.in")
  topic:send({ id = 1, hang = true })
  topic:send({ id = 2 })
end)
]], { "kafka ht.in: timeout failed at ht.in%[0%]@0 after 2 attempts" })
    H.expect(p, "slow handler: kafka handler ht.in", 20)
    H.expect(p, "timeout: kafka handler ht.in", 20)
    H.expect(p, "on_failure id=1 attempts=2 timeout=true", 20)
    H.expect(p, "handled 2", 20)
    H.stop(p)
    assert.are.equal(2, count(p:output(), "WARN  timeout: kafka handler ht.in"), p:output())
    assert.are.equal(1, count(p:output(), "slow handler:"), p:output())
  end)

  it("checks the limits: seconds or false", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
osara.handler_timeout = "soon"
]])
    local status, out = H.run({ "run", dir .. "/app.lua" }, 20, nil,
                              { errors = { "osara.handler_timeout must be seconds" } })
    assert.are.equal(1, status)
    assert.matches("app.lua:2: osara.handler_timeout must be seconds %(a number >= 0%) or false, got soon", out)
  end)
end)
