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

-- Per-key values of the "counts" store in data (`osara store dump`).
local function counts_in(data)
  local _, out = H.run { "store", data, "dump", "counts" }
  local per = {}
  for k, v in out:gmatch("(k%d+)\t(%d+)") do per[k] = tonumber(v) end
  return per
end

-- docs/store.md's example, with a timer sending 20 clicks on 4 keys.
local COUNTS_APP = [[
local osara = require "osara"
local kafka = osara.kafka { ["bootstrap.servers"] = os.getenv("BOOT") or "embedded",
                            ["osara.partitions"] = 2, ["enable.auto.commit"] = os.getenv("AUTO_COMMIT") or "true",
                            -- a killed member leaves the group after this
                            ["session.timeout.ms"] = "6000", ["heartbeat.interval.ms"] = "500" }
local counts = osara.store("counts", { codec = "json" })
local clicks = kafka:topic("clicks")
local applied = 0
kafka:handle("clicks", { store = counts }, function(msg)
  msg.tx:set(msg.key, (msg.tx:get(msg.key) or 0) + 1)
  applied = applied + 1
end)
osara.after(0, function()
  if os.getenv("SEND") then
    for i = 1, 20 do clicks:send({ n = i }, { key = "k" .. (i % 4) }) end
  end
  local function position()
    local sum = 0
    for p = 0, 1 do sum = sum + math.max(kafka:position("clicks", p), 0) end
    return sum
  end
  while position() < 20 do osara.sleep(0.02) end
  osara.log.info("all 20 settled, applied=%d", applied)
end)
]]

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
    H.eventually(function()
      p:line(0.05)
      return p:output():find("out id=2", 1, true)
    end, 30, "the next input's output") -- it may come before the dead letter's line
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
    H.eventually(function()
      p:line(0.05)
      return p:output():find("out id=2", 1, true)
    end, 30, "the next input's output") -- it may come before the dead letter's line
    local out = p:output()
    assert.matches("call id=1 attempt=2 position=%-1", out)
    assert.is_nil(out:find("call id=1 attempt=3", 1, true))
    assert.is_nil(out:find("out id=1", 1, true))
    H.stop(p)
  end)

  it("gh_13_cluster_identity applies the embedded broker's messages again after a restart", function()
    local dir, data = H.tmpdir(), H.tmpdir()
    H.write(dir .. "/counts.lua", COUNTS_APP)
    for run = 1, 2 do
      -- each run's embedded broker starts empty: the app sends the 20 clicks
      local p = H.osara({ "run", "--data", data, dir .. "/counts.lua" }, { SEND = "1" })
      H.expect(p, "all 20 settled, applied=20", 30)
      local _, discarded = p:output():gsub("discarded the exactly%-once positions", "")
      assert.are.equal(run == 1 and 0 or 1, discarded)
      H.stop(p)
      assert.are.same({ k0 = 5 * run, k1 = 5 * run, k2 = 5 * run, k3 = 5 * run }, counts_in(data))
    end
  end)

  it("gh_13_cluster_identity keeps a real cluster's positions across a restart", function()
    local broker, boot = K.broker { "--partitions", "2", "--topic", "clicks" }
    local dir, data = H.tmpdir(), H.tmpdir()
    H.write(dir .. "/counts.lua", COUNTS_APP)
    -- Kafka's own commit is off and the first run is killed: the second
    -- replays all 20, and the store's saved positions skip them
    local env = { BOOT = boot, AUTO_COMMIT = "false", SEND = "1" }
    local p = H.osara({ "run", "--data", data, dir .. "/counts.lua" }, env)
    H.expect(p, "all 20 settled, applied=20", 30)
    H.kill9(p)
    env.SEND = nil
    p = H.osara({ "run", "--data", data, dir .. "/counts.lua" }, env)
    H.expect(p, "all 20 settled, applied=0", 60)
    assert.is_nil(p:output():find("discarded", 1, true))
    H.stop(p)
    assert.are.same({ k0 = 5, k1 = 5, k2 = 5, k3 = 5 }, counts_in(data))
    H.stop(broker)
  end)

  it("gh_13_commit_failure a failed state commit holds its partition until the message is committed", function()
    local dir, data = H.tmpdir(), H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local kafka = osara.kafka { ["osara.partitions"] = 1 }
local counts = osara.store("counts", { codec = "json" })
local commit, n = counts.commit_grouped, 0
counts.commit_grouped = function(self, ...) -- the 5th state commit fails once (a disk error)
  n = n + 1
  if n == 5 then return nil, "injected failure" end
  return commit(self, ...)
end
local input = kafka:topic("cf.in")
kafka:handle("cf.in", { store = counts }, function(msg)
  msg.tx:set("k0", (msg.tx:get("k0") or 0) + 1)
  osara.log.info("handled offset=%d attempt=%d", msg.offset, msg.attempt)
end)
osara.after(0, function()
  for i = 1, 10 do input:send({ id = i }, { key = "k" }) end
  while kafka:position("cf.in", 0) < 10 do osara.sleep(0.01) end
  osara.log.info("done count=%s", tostring(counts:get("k0")))
end)
]])
    local p = H.osara({ "run", "--data", data, dir .. "/app.lua" }, nil,
      { errors = { "store commit failed: injected failure" } })
    H.expect(p, "done count=10", 30)
    local order = {}
    for o, a in p:output():gmatch("handled offset=(%d+) attempt=(%d+)") do order[#order + 1] = o .. "/" .. a end
    assert.are.equal("0/1 1/1 2/1 3/1 4/1 4/2 5/1 6/1 7/1 8/1 9/1", table.concat(order, " "))
    H.stop(p)
    assert.are.same({ k0 = 10 }, counts_in(data))
  end)

  it("gh_13_tx_isolation sums 100 unkeyed orders from 4 partitions to 5,050 (README's example)", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local kafka = osara.kafka { ["group.id"] = "shop", ["osara.partitions"] = 4 }
local Order = osara.schema { id = "integer", user = "string", amount = osara.number { min = 0 } }
local totals = osara.store "totals"
kafka:handle("orders", { schema = Order, store = totals }, function(msg)
  msg.tx:set(msg.value.user, (msg.tx:get(msg.value.user) or 0) + msg.value.amount)
end)
local said = false
osara.every(0.05, function()
  local settled = 0
  for p = 0, 3 do settled = settled + math.max(kafka:position("orders", p), 0) end
  if settled == 100 and not said then
    said = true
    osara.log.info("settled totals=%d,%d retries=%d", totals:get("u0") or 0, totals:get("u1") or 0,
      osara.metrics.value("osara_store_tx_retries_total", { store = "totals" }) or 0)
  end
end)
]])
    local p = H.osara { "run", "--data", H.tmpdir(), dir .. "/app.lua" }
    local boot = H.expect(p, "embedded broker"):match("at ([%d.]+:%d+)")
    -- unkeyed, spread over the partitions (no sticky batches)
    local kcat = H.child { "kcat", "-b", boot, "-t", "orders", "-P", "-X", "sticky.partitioning.linger.ms=0" }
    for i = 1, 100 do kcat:write(('{"id":%d,"user":"u%d","amount":%d}\n'):format(i, i % 2, i)) end
    kcat:close_stdin()
    H.finish(kcat)
    local line = H.expect(p, "settled totals=", 60)
    local u0, u1, retries = line:match("totals=(%d+),(%d+) retries=(%d+)")
    assert.are.same({ 2550, 2500 }, { tonumber(u0), tonumber(u1) }) -- even ids are u0
    assert.is_true(tonumber(retries) > 0, "no transaction ran concurrently: " .. line)
    H.stop(p)
  end)
  it("gh_13_retry_topic moves a failing message to the retry topic so its partition goes on", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local kafka = osara.kafka { ["osara.partitions"] = 1 }
local input = kafka:topic("rt.in")
kafka:handle("rt.in", { retry = { mode = "topic", topic = "rt.retry", max = 2, backoff = 0.3, jitter = 0 },
                        dlq = "rt.dead" }, function(msg)
  osara.log.info("call id=%d attempt=%d topic=%s at=%.3f", msg.value.id, msg.attempt, msg.topic, osara.monotonic())
  if msg.value.id == 1 then error("id 1 always fails") end
end)
kafka:handle("rt.dead", { codec = "raw" }, function(msg)
  local h = msg.headers
  osara.log.info("dead raw=%s attempts=%s origin=%s kind=%s due=%s position=%d", msg.raw, h["osara-attempts"],
    h["osara-origin"], h["osara-error-kind"], tostring(h["osara-retry-due"] ~= nil), kafka:position("rt.in", 0))
end)
osara.after(0, function()
  for i = 1, 5 do input:send({ id = i }) end
end)
]])
    local p = H.osara { "run", dir .. "/app.lua" }
    local dead = H.expect(p, "dead raw=", 30)
    assert.matches('dead raw={"id":1} attempts=3 origin=rt.in/0/0 kind=handler due=true position=5', dead)
    local out = p:output()
    local calls = {}
    for id, attempt, topic, at in out:gmatch("call id=(%d+) attempt=(%d+) topic=(%S+) at=([%d.]+)") do
      calls[#calls + 1] = { id = tonumber(id), attempt = tonumber(attempt), topic = topic, at = tonumber(at) }
    end
    local order = {}
    for i, c in ipairs(calls) do order[i] = ("%d/%d/%s"):format(c.id, c.attempt, c.topic) end
    -- the partition went on at once; the retries came from the retry topic, each once due
    assert.are.equal("1/1/rt.in 2/1/rt.in 3/1/rt.in 4/1/rt.in 5/1/rt.in 1/2/rt.retry 1/3/rt.retry",
      table.concat(order, " "))
    assert.is_true(calls[6].at - calls[1].at >= 0.29, "attempt 2 was due after 0.3 s")
    assert.is_true(calls[7].at - calls[6].at >= 0.59, "attempt 3 was due after 0.6 s")
    assert.matches("moved to the retry topic rt.retry", out)
    H.stop(p)
  end)
end)
