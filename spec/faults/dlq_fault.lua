-- Fault: a handler that raises for 1 % of its inputs, with a dead letter
-- (issue 13 item 4). Every failing id must reach the dead-letter topic with
-- its headers (the original ones and osara-error, -kind, -attempts,
-- -origin), every other id the output, and none both.
local H = require "spec.helpers.host"
local K = require "spec.helpers.kafka"
local F = require "spec.helpers.faults"

local N = F.size(10000, 100000)

describe("fault suite", function()
  after_each(H.cleanup)

  it("dlq: a handler failing 1 % of its inputs dead-letters each of them, loses and repeats nothing", function()
    local broker, boot = K.broker { "--partitions", "4", "--topic", "f.in", "--topic", "f.out",
                                    "--topic", "f.dlq" }
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local kafka = osara.kafka { ["bootstrap.servers"] = os.getenv("BOOT"), ["group.id"] = "fdlq" }
local out = kafka:topic("f.out")
kafka:handle("f.in", { sink = out, dlq = "f.dlq", retry = { max = 2, backoff = 0.01 } }, function(msg)
  if msg.value.id % 100 == 0 then error("refused " .. msg.value.id) end
  return { id = msg.value.id }
end)
]])
    local p = H.osara({ "run", "--data", dir .. "/data", dir .. "/app.lua" }, { BOOT = boot },
                      { errors = { "error in kafka handler f%.in" } })
    H.expect(p, "kafka: assigned", 30)
    F.produce(boot, "f.in", 1, N, { src = "fault" })
    local outs, dead = F.read_until(boot, { "f.out", "f.dlq" }, function(o, d)
      return #o + #d >= N
    end, F.size(60, 300))
    H.stop(p)
    H.stop(broker)

    local in_out, n_out, dup_out = F.tally(outs)
    local in_dlq, n_dlq, dup_dlq = F.tally(dead)
    local lost, both, misplaced, bad_headers, first_bad = 0, 0, 0, 0, nil
    for id = 1, N do
      local failing = id % 100 == 0
      if not in_out[id] and not in_dlq[id] then lost = lost + 1 end
      if in_out[id] and in_dlq[id] then both = both + 1 end
      if (failing and in_out[id]) or (not failing and in_dlq[id]) then misplaced = misplaced + 1 end
    end
    for _, m in ipairs(dead) do
      local h = m.headers
      local ok = h:find("src=fault", 1, true) and h:find("osara-error-kind=handler", 1, true)
        and h:find("osara-attempts=3", 1, true) and h:find("osara%-origin=f%.in/%d+/%d+")
        and h:find("osara%-error=[^,]*refused " .. m.id) and h:find("osara%-first%-failure=%d")
      if not ok then
        bad_headers = bad_headers + 1
        first_bad = first_bad or h
      end
    end
    local line = F.report("dlq", N, n_out + n_dlq, lost, dup_out + dup_dlq + both,
      ("outputs=%d dead letters=%d (expected %d) misplaced=%d in both=%d bad headers=%d")
        :format(n_out, n_dlq, math.floor(N / 100), misplaced, both, bad_headers)
        .. (first_bad and ("; first bad headers: " .. first_bad) or ""))
    assert.are.same({ lost = 0, dup = 0, dead = math.floor(N / 100), misplaced = 0, bad_headers = 0 },
      { lost = lost, dup = dup_out + dup_dlq + both, dead = n_dlq, misplaced = misplaced,
        bad_headers = bad_headers }, line)
  end)
end)
