-- osara.middleware around handler calls (issue 19: panini's middlewares),
-- through the real handler path of Kafka and NATS (osara.testing).
local testing = require "osara.testing"
local H = require "spec.helpers.host"

local function load(app_source)
  local dir = H.tmpdir()
  H.write(dir .. "/app.lua", app_source)
  return testing.load(dir .. "/app.lua")
end

describe("osara.middleware", function()
  it("runs befores in order and afters in reverse around every handler, per client", function()
    local app = load [[
local osara = require "osara"
local kafka = osara.kafka { ["group.id"] = "m" }
local nats = osara.nats {}
trace = {}
local function note(s) trace[#trace + 1] = s end
osara.middleware { before = function(ctx) note("a>" .. ctx.kind .. ":" .. ctx.name) ctx.msg.tagged = true end,
                   after = function(ctx, ok, err) note("a<" .. tostring(ok)) end }
osara.middleware { before = function() note("b>") end, after = function(ctx, ok) note("b<") end }
osara.middleware { client = nats, before = function() note("nats only") end }
osara.middleware { direction = "out", before = function() note("never for handlers") end }
kafka:handle("orders", function(msg) note("kafka " .. tostring(msg.tagged)) end)
nats:handle("orders.*", { retry = false }, function(msg)
  note("nats")
  if msg.value.fail then error("boom") end
end)
]]
    local r = app:deliver("kafka", "orders (group m)", { value = { id = 1 } })
    assert.is_true(r.ok)
    r = app:deliver("nats", "orders.*", { subject = "orders.x", value = { fail = true } })
    local trace = rawget(_G, "trace")
    assert.are.same({ "a>kafka:orders", "b>", "kafka true", "b<", "a<true",
                      "a>nats:orders.*", "b>", "nats only", "nats", "b<", "a<false" },
                    { unpack(trace, 1, 11) })
    rawset(_G, "trace", nil)
  end)

  it("fails the call when a before raises, taking the failure policy", function()
    local app = load [[
local osara = require "osara"
local kafka = osara.kafka { ["group.id"] = "m" }
osara.middleware { before = function(ctx) if ctx.msg.value.id == 2 then error("refused by middleware") end end }
kafka:handle("orders", { retry = false }, function(msg) return msg.value end)
]]
    assert.is_true(app:deliver("kafka", "orders (group m)", { value = { id = 1 } }).ok)
    local r = app:deliver("kafka", "orders (group m)", { value = { id = 2 } })
    assert.is_false(r.ok)
    assert.are.equal("handler", r.reason)
    assert.matches("refused by middleware", r.error)
  end)

  it("runs around every outgoing message: sends, handler outputs and publishes", function()
    local app = load [[
local osara = require "osara"
local kafka = osara.kafka { ["group.id"] = "m" }
local nats = osara.nats {}
local out = kafka:topic("out")
osara.middleware { direction = "out", before = function(ctx)
  ctx.value = { wrapped = ctx.value, by = ctx.kind .. ":" .. ctx.name }
end }
osara.middleware { direction = "in", before = function(ctx) ctx.msg.seen_in = true end }
kafka:handle("orders", { sink = out }, function(msg, emit)
  emit(msg.value.id)
  nats:publish("audit", { id = msg.value.id })
  return msg.value.id + 100
end)
]]
    local r = app:deliver("kafka", "orders (group m)", { value = { id = 1 } })
    assert.is_true(r.ok, r.error)
    local sent = {}
    for i, o in ipairs(r.sent) do sent[i] = { o.to, o.value } end
    assert.are.same({
      { "out", { wrapped = 1, by = "kafka:out" } },
      { "audit", { wrapped = { id = 1 }, by = "nats:audit" } },
      { "out", { wrapped = 101, by = "kafka:out" } },
    }, sent)
  end)

  it("wraps AMQP handlers and publishes too", function()
    local app = load [[
local osara = require "osara"
local amqp = osara.amqp { url = "amqp://guest:guest@127.0.0.1:5672/", service = "billing" }
osara.middleware { before = function(ctx)
  if ctx.direction == "in" then ctx.msg.via = ctx.kind .. ":" .. ctx.name
  else ctx.value = { via = ctx.kind .. ":" .. ctx.name, v = ctx.value } end
end }
amqp:handle({ exchange = "orders", routing_key = "created", queue = "billing" }, function(msg, event)
  event("charged", { via = msg.via })
end)
]]
    local r = app:deliver("amqp", "orders/created (queue billing)", { value = { id = 1 } })
    assert.is_true(r.ok, r.error)
    assert.are.equal(1, #r.sent)
    assert.are.same({ via = "amqp:billing/charged", v = { via = "amqp:orders/created" } }, r.sent[1].value)
  end)

  it("refuses a misspelled option and an empty middleware", function()
    local osara = require "osara"
    assert.has_error(function() osara.middleware { befor = function() end } end)
    assert.has_error(function() osara.middleware {} end)
  end)
end)
