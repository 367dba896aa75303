-- gh_14 item 6: restarts against `osara broker`. A graceful stop leaves the
-- consumer group, so the restart is assigned after the broker's join time; a
-- host killed with -9 does not leave, and the restart says why it waits;
-- `osara broker --port N` gives a fixed bootstrap address.
--
-- The join times are librdkafka 2.0.2's mock coordinator's: after a member
-- leaves or joins a running group it waits session.timeout.ms - 1 s for the
-- others (5 s here); it has no static membership (group.instance.id is
-- accepted and ignored: a restarted static member waits like a new one).
local osara = require "osara"
local H = require "spec.helpers.host"
local K = require "spec.helpers.kafka"

-- A loopback port nobody listens on (the kernel's pick, then released).
local function free_port()
  local f = assert(io.popen([[python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])']]))
  local port = tonumber(f:read("*l"))
  f:close()
  return assert(port, "no free port")
end

local function app(dir, extra)
  H.write(dir .. "/app.lua", ([[
local osara = require "osara"
local kafka = osara.kafka { ["bootstrap.servers"] = os.getenv("BOOT"), ["group.id"] = "rs",
                            ["session.timeout.ms"] = 6000, ["heartbeat.interval.ms"] = 500 %s }
kafka:handle("rs.in", function(msg) osara.log.info("got %%s", msg.value.id) end)
]]):format(extra or ""))
  return dir .. "/app.lua"
end

-- Starts the app; returns the process and the seconds until it was assigned.
local function start(script, dir, boot)
  local t0 = osara.monotonic()
  local p = H.osara({ "run", "--data", dir .. "/data", script }, { BOOT = boot })
  H.expect(p, "kafka: assigned", 40)
  return p, osara.monotonic() - t0
end

describe("restarts against osara broker (gh_14 item 6)", function()
  after_each(H.cleanup)

  it("osara broker --port N serves its bootstrap at 127.0.0.1:N; a taken port fails", function()
    local port = free_port()
    local broker, boot = K.broker { "--port", tostring(port), "--topic", "fixed" }
    assert.are.equal("127.0.0.1:" .. port, boot)
    K.produce(boot, "fixed", { "k\t{\"id\":1}" })
    local got = K.eventually(boot, "fixed", function(m) return #m == 1 end, 20, "the message back")
    assert.are.equal('{"id":1}', got[1].value)
    local status, out = H.run({ "broker", "--port", tostring(port) }, 10)
    assert.are.equal(1, status)
    assert.matches("cannot listen on 127.0.0.1:" .. port, out, nil, true)
    status, out = H.run({ "broker", "--port", "70000" }, 10)
    assert.are.equal(2, status)
    assert.matches("--port must be a port number", out, nil, true)
    H.stop(broker)
  end)

  it("a graceful stop leaves the group: the restart is assigned within the join time", function()
    local broker, boot = K.broker { "--partitions", "4", "--topic", "rs.in" }
    local dir = H.tmpdir()
    local script = app(dir)
    local p = start(script, dir, boot)
    H.stop(p)
    local q, secs = start(script, dir, boot)
    print(("restart after SIGTERM: assigned in %.1f s"):format(secs))
    assert.is_true(secs < 9, ("assigned after %.1f s"):format(secs))
    assert.is_nil(q:output():find("previous member", 1, true))
    H.stop(q)
    H.stop(broker)
  end)

  it("after kill -9 the restart logs that it waits for the previous member's session", function()
    local broker, boot = K.broker { "--partitions", "4", "--topic", "rs.in" }
    local dir = H.tmpdir()
    local script = app(dir)
    local p = start(script, dir, boot)
    H.kill9(p)
    local q, secs = start(script, dir, boot)
    print(("restart after kill -9: assigned in %.1f s"):format(secs))
    assert.matches("the previous run %(pid %d+%) stopped without leaving: waiting for the previous "
                   .. "member's session to expire %(6 s, session.timeout.ms%)", q:output())
    -- the trace of the killed member is gone: the next restart does not wait for it
    H.stop(q)
    local r = start(script, dir, boot)
    assert.is_nil(r:output():find("previous member", 1, true))
    H.stop(r)
    H.stop(broker)
  end)

  it("group.instance.id is passed on; osara broker has no static membership, so it says so", function()
    local broker, boot = K.broker { "--partitions", "4", "--topic", "rs.in" }
    local dir = H.tmpdir()
    local script = app(dir, ', ["group.instance.id"] = "rs-1"')
    local p = start(script, dir, boot)
    H.kill9(p)
    local q, secs = start(script, dir, boot)
    print(("static member restart after kill -9 against osara broker: assigned in %.1f s"):format(secs))
    assert.matches("static member rs%-1 takes its partitions back at once on Kafka >= 2.3", q:output())
    K.produce(boot, "rs.in", { "k\t{\"id\":8}" })
    H.expect(q, "got 8", 20)
    H.stop(q)
    H.stop(broker)
  end)
end)
