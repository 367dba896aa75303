local osara = require "osara"
local testing = require "osara.testing"
local H = require "spec.helpers.host"

describe("osara.testing", function()
  after_each(H.cleanup)

  it("fake time runs timers in order and sleeps without waiting", function()
    local clock = testing.clock(100)
    local seen = {}
    osara.every(10, function() seen[#seen + 1] = "every@" .. osara.now() end)
    osara.after(15, function()
      seen[#seen + 1] = "after@" .. osara.now()
      osara.sleep(100)
      seen[#seen + 1] = "woke@" .. osara.now()
    end)
    local t0 = osara.monotonic()
    clock:advance(30)
    assert.are.same({ "every@110", "after@115", "every@120", "every@130" }, seen)
    clock:advance(100)
    local woke
    for _, v in ipairs(seen) do
      if v:match("^woke@") then woke = v end
    end
    assert.are.equal("woke@215", woke)
    clock:restore()
    assert.is_true(osara.monotonic() - t0 < 1e6) -- real time again
  end)

  it("loads a script and delivers messages to its Kafka and NATS handlers, capturing outputs", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local kafka = osara.kafka { ["group.id"] = "t" }
local nats = osara.nats {}
local Order = osara.schema { id = "integer" }
local out = kafka:topic("out")
kafka:handle("orders", { schema = Order, sink = out }, function(msg)
  if msg.value.id == 13 then error("unlucky") end
  return { id = msg.value.id, doubled = msg.value.id * 2 }
end)
nats:handle("price.*", function(msg) return { price = msg.data.q * 10 } end)
osara.every(1, function() end)
]])
    local app = testing.load(dir .. "/app.lua")
    local out = app:deliver("kafka", "orders (group t)", { value = { id = 21 }, key = "k" })
    assert.is_true(out.ok)
    assert.are.same({ { to = "out", value = { id = 21, doubled = 42 }, meta = { key = "k" } } }, out.sent)
    local bad = app:deliver("kafka", "orders (group t)", { raw = "{not json" })
    assert.are.equal("decode", bad.reason)
    local invalid = app:deliver("kafka", "orders (group t)", { value = { id = "x" } })
    assert.are.equal("schema", invalid.reason)
    assert.matches("/id: expected integer", invalid.error)
    local failed = app:deliver("kafka", "orders (group t)", { value = { id = 13 } })
    assert.are.equal("handler", failed.reason)
    assert.are.same({}, failed.sent)
    local reply = app:deliver("nats", "price.*", { value = { q = 2 }, reply = "inbox.1" })
    assert.are.same({ { to = "inbox.1", value = { price = 20 }, meta = { reply = true } } }, reply.sent)
  end)
end)
