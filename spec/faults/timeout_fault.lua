-- Fault: a handler that never returns for 1 % of its inputs, with
-- osara.handler_timeout set (issue 13 items 4 and 7): each such call is
-- logged as slow, cancelled at the timeout and takes the failure path
-- (retried once, then the dead letter); every other input reaches the
-- output; none is lost or in both.
local H = require "spec.helpers.host"
local K = require "spec.helpers.kafka"
local F = require "spec.helpers.faults"

local N = F.size(2000, 10000)

describe("fault suite", function()
  after_each(H.cleanup)

  it("timeout: handlers that never return are cancelled and dead-lettered, nothing lost", function()
    local broker, boot = K.broker { "--partitions", "4", "--topic", "t.in", "--topic", "t.out",
                                    "--topic", "t.dlq" }
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
osara.handler_timeout = 0.3
osara.slow_handler_warning = 0.1
local kafka = osara.kafka { ["bootstrap.servers"] = os.getenv("BOOT"), ["group.id"] = "ftimeout" }
local out = kafka:topic("t.out")
kafka:handle("t.in", { sink = out, dlq = "t.dlq", retry = { max = 1, backoff = 0 } }, function(msg)
  if msg.value.id % 100 == 0 then osara.sleep(3600) end
  return { id = msg.value.id }
end)
]])
    local p = H.osara({ "run", "--data", dir .. "/data", dir .. "/app.lua" }, { BOOT = boot },
                      { errors = { "timeout failed at t%.in" } })
    H.expect(p, "kafka: assigned", 30)
    F.produce(boot, "t.in", 1, N)
    local outs, dead = F.read_until(boot, { "t.out", "t.dlq" }, function(o, d)
      return #o + #d >= N
    end, F.size(60, 300))
    H.stop(p)
    H.stop(broker)

    local in_out, n_out, dup_out = F.tally(outs)
    local in_dlq, n_dlq, dup_dlq = F.tally(dead)
    local lost, both, misplaced = 0, 0, 0
    for id = 1, N do
      local hangs = id % 100 == 0
      if not in_out[id] and not in_dlq[id] then lost = lost + 1 end
      if in_out[id] and in_dlq[id] then both = both + 1 end
      if (hangs and in_out[id]) or (not hangs and in_dlq[id]) then misplaced = misplaced + 1 end
    end
    local log = p:output()
    local slow = select(2, log:gsub("slow handler: kafka handler t%.in", ""))
    local timeouts = select(2, log:gsub("timeout: kafka handler t%.in", ""))
    local line = F.report("timeout", N, n_out + n_dlq, lost, dup_out + dup_dlq + both,
      ("handler_timeout 0.3 s; %d slow-handler warnings, %d timeouts (2 attempts each), %d dead letters, "
        .. "misplaced=%d"):format(slow, timeouts, n_dlq, misplaced))
    assert.are.same({ lost = 0, dup = 0, dead = math.floor(N / 100), misplaced = 0, timeouts = 2 * math.floor(N / 100) },
      { lost = lost, dup = dup_out + dup_dlq + both, dead = n_dlq, misplaced = misplaced, timeouts = timeouts }, line)
    assert.is_true(slow >= math.floor(N / 100), line)
  end)
end)
