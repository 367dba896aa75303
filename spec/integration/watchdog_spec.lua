-- The loop-stall watchdog through the real binary. The children here are
-- not tracked by the helpers (which fail any log with "loop stall"): the
-- stall is what they are about, so the spec checks their logs itself.
local osara = require "osara"
local H = require "spec.helpers.host"

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

local function count(log, text)
  local n = 0
  for _ in log:gmatch(text) do n = n + 1 end
  return n
end

local BUSY = [[
local osara = require "osara"
osara.after(0.05, function()
  local t0 = osara.monotonic()
  while osara.monotonic() - t0 < 0.3 do end
  osara.after(0.05, function()
    osara.log.info("stalls=%d", osara.metrics.value("osara_loop_stalls_total"))
  end)
end)
]]

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
    assert.is_true(tonumber(ms) >= 300 and tonumber(ms) < 3000, log)
    assert.matches("app.lua:2$", where)
  end)

  it("stays silent through reloads that start a Kafka client, a store and a listener", function()
    local dir = H.tmpdir()
    local function app(v)
      return ([[
local osara = require "osara"
local kafka = osara.kafka { ["osara.partitions"] = 4, ["client.id"] = "w%d" }
local db = osara.store("s%d")
osara.http { listen = "%s:0" }
kafka:handle("wd.in", function(msg) db:get("last") end)
osara.every(0.01, function() kafka:topic("wd.in"):send({ v = %d }) end)
osara.route("GET", "/v", function() return { v = %d } end)
]]):format(v, v, v % 2 == 1 and "127.0.0.1" or "0.0.0.0", v, v)
    end
    -- the threshold for this build: sanitized code runs several times slower
    local ms = os.getenv("OSARA_SANITIZED") == "1" and "1000" or "100"
    local p = start(dir, app(1), { "--loop-stall-ms", ms })
    H.expect(p, "http: listening", 30)
    for v = 2, 6 do
      H.write(dir .. "/app.lua", app(v))
      p:kill("HUP")
      H.expect(p, "reloaded", 30)
    end
    local log = stop(p)
    assert.are.equal(0, count(log, "loop stall"), log)
    assert.are.equal(0, count(log, " ERROR "), log)
  end)

  it("takes its threshold from --loop-stall-ms or OSARA_LOOP_STALL_MS, checked, and is off by default", function()
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
    -- 0 turns it off, and is the default: the same busy handler logs nothing.
    local p = start(dir, BUSY, { "--loop-stall-ms", "0" })
    H.expect(p, "stalls=0", 10)
    assert.are.equal(0, count(stop(p), "loop stall"))
    p = start(dir, BUSY)
    H.expect(p, "stalls=0", 10)
    assert.are.equal(0, count(stop(p), "loop stall"))
    -- the environment sets it when the command line does not
    p = start(dir, BUSY, {}, { OSARA_LOOP_STALL_MS = "100" })
    H.expect(p, "stalls=1", 10)
    assert.are.equal(1, count(stop(p), "loop stall"))
  end)
end)
