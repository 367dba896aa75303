-- The failure policy (issue 13 item 2) through the real binary and the
-- embedded Kafka cluster: retries hold the partition, the dead letter
-- carries every header, and the input is committed only once its dead
-- letter was delivered.
local H = require "spec.helpers.host"

describe("failure policy on kafka", function()
  after_each(H.cleanup)

  it("dead-letters a failing and an undecodable input, committing each only after its dead letter", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local kafka = osara.kafka { ["osara.partitions"] = 1 }
local input = kafka:topic("dl.in", { codec = "raw" })
local calls = {}
osara.after(0, function()
  input:send('{"id":1}')
  input:send('{"id":2}', { key = "k2", headers = { trace = "t2" } })
  input:send("{not json")
  input:send('{"id":4}')
end)
local refused = false
kafka:handle("dl.in", {
  retry = { max = 2, backoff = 0.05 },
  dlq = "dl.dead",
  on_failure = function(msg, err, attempts)
    osara.log.info("on_failure offset=%d attempts=%d position=%d", msg.offset, attempts, kafka:position("dl.in", 0))
  end,
}, function(msg)
  calls[msg.value.id] = (calls[msg.value.id] or 0) + 1
  if msg.value.id == 2 then
    if not refused and msg.attempt == 3 then
      refused = true
      kafka:mock_push_errors(0, 1, 10) -- the first dead letter is refused (too large: not retriable)
    end
    error("always fails")
  end
  if msg.value.id == 4 then
    osara.log.info("handled 4 calls2=%d position=%d", calls[2], kafka:position("dl.in", 0))
  end
end)
kafka:handle("dl.dead", { codec = "raw" }, function(msg)
  local h = msg.headers
  osara.log.info("dead key=%s raw=%s trace=%s kind=%s attempts=%s origin=%s first=%s error=%s",
    tostring(msg.key), msg.raw, tostring(h.trace), h["osara-error-kind"], h["osara-attempts"],
    h["osara-origin"], tostring(h["osara-first-failure"]), h["osara-error"])
end)
]])
    local p = H.osara({ "run", dir .. "/app.lua" }, nil, { errors = {
      "delivery to dl.dead %[0%] failed", "dead letter to dl.dead not delivered", "error in kafka handler dl.in",
    } })
    local line = H.expect(p, "handled 4 ", 60)
    local out = p:output()
    -- the first dead letter was refused: offset 1 stayed uncommitted and
    -- was handled again: C's attempt 2, then the policy's attempt 3
    assert.matches("dl.in %[0%] offset 1 failed %(attempt 1%); handling it again", out)
    assert.matches("calls2=5 ", line)
    -- on_failure runs after the dead letter, before the commit
    assert.matches("on_failure offset=1 attempts=3 position=1", out)
    assert.matches("on_failure offset=2 attempts=1 position=2", out)
    local dead = {}
    H.eventually(function()
      p:line(0.05)
      dead = {}
      for l in p:output():gmatch("dead key=[^\n]+") do dead[#dead + 1] = l end
      return #dead >= 2
    end, 30, "two dead letters")
    assert.are.equal(2, #dead) -- the refused one never arrived
    assert.matches('^dead key=k2 raw={"id":2} trace=t2 kind=handler attempts=3 origin=dl.in/0/1 first=%d+%.%d%d%d error=.*always fails', dead[1])
    assert.matches("^dead key=nil raw={not json trace=nil kind=decode attempts=1 origin=dl.in/0/2 first=%d+%.%d%d%d error=json:", dead[2])
    H.eventually(function()
      p:line(0.05)
      return p:output():find("handled 4 calls2=5 position=3", 1, true)
    end, 10, "input 4 handled after the dead letters were committed")
    H.stop(p)
  end)
end)

describe("failure policy on core nats", function()
  after_each(H.cleanup)

  it("retries, then publishes the dead letter with every header and calls on_failure once", function()
    local N = require "spec.helpers.nats"
    local osara = require "osara"
    local server, url = N.server()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL") }
local calls = 0
nats:handle("pay.*", {
  retry = { max = 2, backoff = 0.02 },
  dlq = "dead.pay", -- not under pay.*: it would be handled again
  filter = function(msg) return msg.value.amount ~= 0 end,
  on_failure = function(msg, err, attempts) osara.log.info("on_failure attempts=%d", attempts) end,
}, function(msg)
  calls = calls + 1
  if msg.value.amount < 0 then error("negative amount") end
  osara.log.info("paid %d after attempt %d", msg.value.amount, msg.attempt)
end)
nats:handle("dead.pay", { codec = "raw" }, function(msg)
  local h = msg.headers
  osara.log.info("dead raw=%s trace=%s kind=%s attempts=%s origin=%s first=%s error=%s calls=%d filtered=%d",
    msg.raw, tostring(h.trace), h["osara-error-kind"], h["osara-attempts"], h["osara-origin"],
    tostring(h["osara-first-failure"]), h["osara-error"], calls,
    osara.metrics.value("osara_filtered_total", { kind = "nats", name = "pay.*" }))
end)
]])
    local p = H.osara({ "run", dir .. "/app.lua" }, { NATS_URL = url })
    N.subscribed(p, { "pay.*", "dead.pay" })
    local nats = osara.nats { servers = url }
    nats:publish("pay.eu", { amount = 0 })
    nats:publish("pay.eu", { amount = -5 }, { headers = { trace = "t9" } })
    nats:flush()
    local line = H.expect(p, "dead raw=", 20)
    assert.matches('dead raw={"amount":%-5} trace=t9 kind=handler attempts=3 origin=pay.eu first=%d+%.%d%d%d '
      .. "error=.*negative amount calls=3 filtered=1", line)
    assert.matches("on_failure attempts=3", p:output())
    nats:publish("pay.eu", { amount = 7 })
    nats:flush()
    H.expect(p, "paid 7 after attempt 1", 20)
    H.stop(p)
    H.stop(server)
  end)
end)
