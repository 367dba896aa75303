-- The loop-stall watchdog through the real binary. The children here are
-- not tracked by the helpers (which fail any log with "loop stall"): the
-- stall is what they are about, so the spec checks their logs itself.
local osara = require "osara"
local H = require "spec.helpers.host"
local K = require "spec.helpers.kafka"
local N = require "spec.helpers.nats"

local function start(dir, source, args, env)
  H.write(dir .. "/app.lua", source)
  local argv = { H.exe(), "run" }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  argv[#argv + 1] = dir .. "/app.lua"
  return assert(osara.process.spawn { argv = argv, env = env })
end

-- Stops p and returns its whole log, after checking its exit status and
-- that no sanitizer reported anything.
local function stop(p)
  p:kill("TERM")
  local status = p:wait(30)
  if status == nil then p:kill("KILL") end
  H.drain(p)
  local log = p:output()
  assert.are.equal(0, status, log)
  for _, bad in ipairs { "AddressSanitizer", "LeakSanitizer", "runtime error:" } do
    assert.is_nil(log:find(bad, 1, true), log)
  end
  return log
end

local count = H.count

-- A timer whose Lua computes for `secs` of CPU time without yielding, then
-- logs the count. CPU time, not wall time: the watchdog does not count the
-- time the thread waits for a CPU on a loaded machine.
local function busy(secs)
  return ([[
local osara = require "osara"
osara.runaway_timeout = false -- the long run is the point here
osara.after(0.05, function()
  local t0 = os.clock()
  while os.clock() - t0 < %g do end
  osara.after(0.05, function()
    osara.log.info("stalls=%%d", osara.metrics.value("osara_loop_stalls_total"))
  end)
end)
]]):format(secs)
end
local BUSY = busy(0.3)
-- The default threshold of this build: sanitized code runs several times
-- slower, so its default is 1000 ms instead of 100.
local SANITIZED = os.getenv("OSARA_SANITIZED") == "1"
local DEFAULT_MS = SANITIZED and 1000 or 100

describe("loop-stall watchdog", function()
  after_each(H.cleanup)

  it("names the handler that busy-looped 300 ms, once, and counts it", function()
    local dir = H.tmpdir()
    local p = start(dir, BUSY, { "--loop-stall-ms", "100" })
    H.expect(p, "stalls=1", 10)
    local log = stop(p)
    assert.are.equal(1, count(log, "loop stall"), log)
    local ms, where = log:match("WARN  loop stall: (%d+) ms in (after at [^\n]*)")
    assert.is_truthy(ms, log)
    assert.is_true(tonumber(ms) >= 250 and tonumber(ms) < 3000, log)
    assert.matches("app.lua:3$", where)
  end)

  it("stays silent at its default through reloads, rebalances and subscriptions", function()
    local broker, boot = K.broker { "--partitions", "4", "--topic", "wd.in" }
    local server, url = N.server()
    local dir = H.tmpdir()
    -- every version renames the Kafka client (a new consumer: the group
    -- rebalances), the NATS client (a new subscription), the store and the
    -- listener, under a steady load of messages and timer ticks
    local function app(v)
      return ([[
local osara = require "osara"
local kafka = osara.kafka { ["bootstrap.servers"] = os.getenv("BOOT"), ["group.id"] = "wd",
                            ["client.id"] = "w%d", ["session.timeout.ms"] = 6000,
                            ["heartbeat.interval.ms"] = 500 }
local nats = osara.nats { servers = os.getenv("NATS_URL"), name = "w%d" }
local db = osara.store("s%d")
osara.http { listen = "%s:0" }
kafka:handle("wd.in", function(msg) db:set("last", msg.value.v) end)
nats:handle("wd.req", function(msg) return { v = %d } end)
osara.every(0.01, function() kafka:topic("wd.in"):send({ v = %d }) end)
osara.route("GET", "/v", function() return { v = %d } end)
]]):format(v, v, v, v % 2 == 1 and "127.0.0.1" or "0.0.0.0", v, v, v)
    end
    local p = start(dir, app(1), {}, { NATS_URL = url, BOOT = boot })
    H.expect(p, "http: listening", 30)
    local function assigned(n) -- the group gave the n-th consumer its partitions
      H.eventually(function() return count(p:output(), "kafka: assigned") >= n end, 60,
                   "assignment " .. n)
    end
    assigned(1)
    for v = 2, 6 do
      H.write(dir .. "/app.lua", app(v))
      p:kill("HUP")
      H.expect(p, "reloaded", 30)
      N.subscribed(p, { "wd.req" })
      assigned(v)
    end
    local log = stop(p)
    H.stop(server)
    H.stop(broker)
    assert.are.equal(0, count(log, "loop stall"), log)
    assert.are.equal(0, count(log, " ERROR "), log)
  end)

  it("takes its threshold from --loop-stall-ms or OSARA_LOOP_STALL_MS, checked, and is on by default", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", "return")
    local status, out = H.run({ "run", "--loop-stall-ms", "soon", dir .. "/app.lua" }, 10, nil,
                              { status = 2 })
    assert.are.equal(2, status)
    assert.matches("%-%-loop%-stall%-ms expects milliseconds", out)
    status, out = H.run({ "run", dir .. "/app.lua" }, 10, { OSARA_LOOP_STALL_MS = "-5" },
                        { status = 2 })
    assert.are.equal(2, status)
    assert.matches("OSARA_LOOP_STALL_MS expects milliseconds", out)
    -- 0 turns it off
    local p = start(dir, BUSY, { "--loop-stall-ms", "0" })
    H.expect(p, "stalls=0", 10)
    assert.are.equal(0, count(stop(p), "loop stall"))
    -- the default: a turn longer than DEFAULT_MS is one stall
    p = start(dir, busy(DEFAULT_MS / 1000 + 0.3))
    H.expect(p, "stalls=1", 20)
    assert.are.equal(1, count(stop(p), "loop stall"))
    -- the environment sets it when the command line does not
    p = start(dir, BUSY, {}, { OSARA_LOOP_STALL_MS = "100" })
    H.expect(p, "stalls=1", 10)
    assert.are.equal(1, count(stop(p), "loop stall"))
    p = start(dir, BUSY, {}, { OSARA_LOOP_STALL_MS = "0" })
    H.expect(p, "stalls=0", 10)
    assert.are.equal(0, count(stop(p), "loop stall"))
  end)
end)
