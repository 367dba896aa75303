-- Kafka delivery under pressure and faults (issue 13): outputs wait for
-- room in librdkafka's queue instead of being dropped, a delivery that
-- fails for good takes the failure policy, a failed state commit holds its
-- partition, stored offsets belong to one cluster, and per-key
-- transactions do not overwrite each other.
local H = require "spec.helpers.host"
local K = require "spec.helpers.kafka"

-- Produces {"id":1} .. {"id":n} to topic with kcat (an independent client).
local function produce_ids(boot, topic, n)
  local p = H.child { "sh", "-c", ("seq 1 %d | sed 's/.*/{\"id\":&}/' | kcat -b %s -t %s -P")
    :format(n, boot, topic) }
  H.finish(p, { timeout = 120 })
end

describe("kafka delivery", function()
  after_each(H.cleanup)

  it("gh_13_backpressure delivers 200,000 outputs through librdkafka's default queue", function()
    local broker, boot = K.broker { "--partitions", "4", "--topic", "bp.in", "--topic", "bp.out" }
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local kafka = osara.kafka { ["bootstrap.servers"] = os.getenv("BOOT") }
local out = kafka:topic("bp.out")
-- the result of send is ignored, as in every handler of the docs
kafka:handle("bp.in", function(msg) out:send(msg.value) end)
local seen, n = {}, 0
kafka:handle("bp.out", function(msg)
  local id = msg.value.id
  if not seen[id] then
    seen[id] = true
    n = n + 1
    if n % 50000 == 0 then osara.log.info("outputs=%d", n) end
  end
end)
]])
    produce_ids(boot, "bp.in", 200000)
    local p = H.osara({ "run", dir .. "/app.lua" }, { BOOT = boot })
    H.expect(p, "outputs=200000", 240)
    assert.is_nil(p:output():find("cannot produce", 1, true))
    H.stop(p)
    H.stop(broker)
  end)

  it("gh_13_emit_return waits for room: 50,000 outputs by emit and return through a 1,000-message queue", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local kafka = osara.kafka { ["osara.partitions"] = 4, ["queue.buffering.max.messages"] = 1000 }
local out = kafka:topic("fp.out")
kafka:handle("fp.in", { sink = out }, function(msg, emit)
  if msg.value.id % 2 == 0 then
    emit({ id = msg.value.id }) -- the result ignored, as in the docs
    return
  end
  return { id = msg.value.id }
end)
local seen, n = {}, 0
kafka:handle("fp.out", function(msg)
  local id = msg.value.id
  if not seen[id] then
    seen[id] = true
    n = n + 1
    if n % 10000 == 0 then osara.log.info("outputs=%d", n) end
  end
end)
]])
    local p = H.osara { "run", dir .. "/app.lua" }
    local boot = H.expect(p, "embedded broker"):match("at ([%d.]+:%d+)")
    produce_ids(boot, "fp.in", 50000)
    H.expect(p, "outputs=50000", 180)
    assert.is_nil(p:output():find("cannot produce", 1, true))
    H.stop(p)
  end)

  it("gh_13_oversized an output over message.max.bytes fails its input into the dead letter", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local kafka = osara.kafka { ["osara.partitions"] = 1, ["message.max.bytes"] = 10000 }
local input, out = kafka:topic("ov.in"), kafka:topic("ov.out")
kafka:handle("ov.in", { sink = out, retry = { max = 1, backoff = 0.01 }, dlq = "ov.dead" }, function(msg)
  osara.log.info("call id=%d attempt=%d position=%d", msg.value.id, msg.attempt, kafka:position("ov.in", 0))
  if msg.value.id == 1 then return { id = 1, pad = string.rep("x", 20000) } end
  return { id = msg.value.id }
end)
kafka:handle("ov.dead", { codec = "raw" }, function(msg)
  local h = msg.headers
  osara.log.info("dead raw=%s kind=%s attempts=%s error=%s", msg.raw, h["osara-error-kind"],
    h["osara-attempts"], h["osara-error"])
end)
kafka:handle("ov.out", function(msg) osara.log.info("out id=%d", msg.value.id) end)
osara.after(0, function()
  input:send({ id = 1 })
  input:send({ id = 2 })
end)
]])
    local p = H.osara({ "run", dir .. "/app.lua" }, nil, { errors = { "cannot produce to ov.out" } })
    local dead = H.expect(p, "dead raw=", 30)
    assert.matches('dead raw={"id":1} kind=output attempts=2 error=output not delivered: .*too large', dead)
    H.expect(p, "out id=2", 30)
    local out = p:output()
    -- the input stayed uncommitted while it was retried
    assert.matches("call id=1 attempt=1 position=%-1", out)
    assert.matches("call id=1 attempt=2 position=%-1", out)
    assert.is_nil(out:find("call id=1 attempt=3", 1, true)) -- retry.max = 1
    assert.matches("call id=2 attempt=1 position=1", out)
    assert.is_nil(out:find("out id=1", 1, true))
    H.stop(p)
  end)

  it("gh_13_delivery_failed an output whose delivery fails for good goes to the dead letter", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local kafka = osara.kafka { ["osara.partitions"] = 1 }
local input, out = kafka:topic("df.in"), kafka:topic("df.out")
kafka:handle("df.in", { sink = out, retry = { max = 1, backoff = 0.01 }, dlq = "df.dead" }, function(msg)
  osara.log.info("call id=%d attempt=%d position=%d", msg.value.id, msg.attempt, kafka:position("df.in", 0))
  if msg.value.id == 1 then kafka:mock_push_errors(0, 1, 10) end -- this Produce fails, not retriable
  return { id = msg.value.id }
end)
kafka:handle("df.dead", { codec = "raw" }, function(msg)
  local h = msg.headers
  osara.log.info("dead raw=%s kind=%s attempts=%s error=%s", msg.raw, h["osara-error-kind"],
    h["osara-attempts"], h["osara-error"])
  input:send({ id = 2 })
end)
kafka:handle("df.out", function(msg) osara.log.info("out id=%d", msg.value.id) end)
osara.after(0, function() input:send({ id = 1 }) end)
]])
    local p = H.osara({ "run", dir .. "/app.lua" }, nil, { errors = { "delivery to df.out %[0%] failed" } })
    local dead = H.expect(p, "dead raw=", 30)
    assert.matches('dead raw={"id":1} kind=output attempts=2 error=output not delivered: .*too large', dead)
    H.expect(p, "out id=2", 30)
    local out = p:output()
    assert.matches("call id=1 attempt=2 position=%-1", out)
    assert.is_nil(out:find("call id=1 attempt=3", 1, true))
    assert.is_nil(out:find("out id=1", 1, true))
    H.stop(p)
  end)
end)
