-- One vocabulary across brokers (issue 12, item 6; docs/api.md): msg.value,
-- fn(msg, emit), :stream as the iterator, reply_to, and the old spellings
-- kept for one release with one warning per call site.
local osara = require "osara"
local testing = require "osara.testing"
local log_c = require "osara.log_c"
local vm_c = require "osara.vm_c"
local H = require "spec.helpers.host"

-- Collects the WARN lines written while fn runs.
local function warnings(fn)
  local real, got = log_c.write, {}
  log_c.write = function(level, msg)
    if level == "warn" then got[#got + 1] = msg else real(level, msg) end
  end
  local ok, err = pcall(fn)
  log_c.write = real
  assert(ok, err)
  return got
end

local function load(src)
  local dir = H.tmpdir()
  H.write(dir .. "/app.lua", src)
  return testing.load(dir .. "/app.lua")
end

describe("one vocabulary", function()
  after_each(H.cleanup)

  it("gives NATS handlers (msg, emit) with msg.value, and sends results to the sink", function()
    local app = load [[
local osara = require "osara"
local nats = osara.nats {}
nats:handle("orders.in", { sink = "orders.out" }, function(msg, emit)
  emit({ id = msg.value.id, early = true })
  return { id = msg.value.id }
end)
nats:handle("price.*", function(msg) return { price = msg.value.q * 10 } end)
]]
    local out = app:deliver("nats", "orders.in", { value = { id = 7 } })
    assert.is_true(out.ok)
    assert.are.same({ "orders.out", "orders.out" }, { out.sent[1].to, out.sent[2].to })
    assert.are.same({ { id = 7, early = true }, { id = 7 } }, { out.sent[1].value, out.sent[2].value })
    local reply = app:deliver("nats", "price.*", { value = { q = 2 }, reply = "inbox.1" })
    assert.are.same({ { to = "inbox.1", value = { price = 20 }, meta = { reply = true } } }, reply.sent)
  end)

  it("raises when a NATS handler emits without a sink, as on Kafka", function()
    local app = load [[
local osara = require "osara"
local nats = osara.nats {}
nats:handle("in", function(msg, emit) emit(1) end)
]]
    local out = app:deliver("nats", "in", { value = 1 })
    assert.are.equal("handler", out.reason)
    assert.matches("emit: this handler has no sink", out.error)
  end)

  it("sets msg.reply on Kafka inputs that carry a reply address", function()
    local app = load [[
local osara = require "osara"
local kafka = osara.kafka {}
kafka:handle("prices", function(msg) return { to = msg.reply } end)
]]
    local out = app:deliver("kafka", "prices (group osara-app)", { value = {}, headers = { ["osara-reply-to"] = "r" } })
    assert.are.same({ { to = "r", value = { to = "r" }, meta = { reply = true } } }, out.sent)
  end)

  it("gives Kafka's emit the failure convention of every send: nil, err from the client", function()
    local app = load [[
local osara = require "osara"
local kafka = osara.kafka {}
local refusing = { _send_fast = function() return nil, "Local: Queue full" end,
                   send = function() return nil, "Local: Queue full" end }
kafka:handle("in", { sink = { refusing } }, function(msg, emit)
  local ok, err = emit(1)
  osara.log.info("emit gave %s %s", tostring(ok), tostring(err))
  return 2
end)
]]
    local real, lines = log_c.write, {}
    log_c.write = function(level, msg) lines[#lines + 1] = level .. " " .. msg end
    local ok, out = pcall(app.deliver, app, "kafka", "in (group osara-app)", { value = 1 })
    log_c.write = real
    assert(ok, out)
    assert.are.same({ "info emit gave nil Local: Queue full",
                      "error kafka in: output of in[0]@0 not sent: Local: Queue full" }, lines)
  end)

  it("keeps msg.data working with one warning per line that reads it", function()
    local app = load [[
local osara = require "osara"
local nats = osara.nats {}
nats:handle("in", function(msg) return msg.data.n end)
]]
    local results = {}
    local warned = warnings(function()
      for i = 1, 3 do
        local out = app:deliver("nats", "in", { value = { n = i }, reply = "r" })
        results[i] = out.sent[1].value
      end
    end)
    assert.are.same({ 1, 2, 3 }, results)
    assert.are.equal(1, #warned)
    assert.matches("app%.lua:3: msg%.data is deprecated, use msg%.value", warned[1])
  end)

  it("keeps nats:stream{name=, subjects=} creating a JetStream stream, with a warning", function()
    local warned = warnings(function()
      load [[
local osara = require "osara"
local nats = osara.nats {}
nats:stream { name = "ORDERS", subjects = { "orders.>" } }
nats:add_stream { name = "ITEMS", subjects = { "items.>" } }
]]
    end)
    assert.are.equal(1, #warned)
    assert.matches("app%.lua:3: nats:stream{name=, subjects=} is deprecated, use nats:add_stream", warned[1])
  end)

  it("iterates NATS messages with nats:stream, as kafka:stream does", function()
    local real_mode, real_register = vm_c.mode, vm_c.register
    local runner
    vm_c.mode = function() return "check" end
    vm_c.register = function(_, _, _, fn) runner = fn end
    local ok, stream = pcall(function() return osara.nats({}):stream("ticks") end)
    vm_c.mode, vm_c.register = real_mode, real_register
    assert(ok, stream)
    local got, finished = {}, 0
    osara.spawn(function()
      for msg in stream do
        got[#got + 1] = msg.value.n
        if #got == 3 then break end
      end
    end)
    for n = 1, 3 do
      osara.spawn(function()
        runner { raw = '{"n":' .. n .. "}", subject = "ticks", headers = {} }
        finished = finished + 1
      end)
    end
    for _ = 1, 20 do
      if #got == 3 and finished == 2 then break end
      osara.yield()
    end
    assert.are.same({ 1, 2, 3 }, got)
    assert.are.equal(2, finished) -- the last message is held until the loop asks again
    stream:close()
    for _ = 1, 20 do
      if finished == 3 then break end
      osara.yield()
    end
    assert.are.equal(3, finished)
    assert.is_nil(stream())
  end)

  it("gives HTTP handlers the decoded body as req.value", function()
    local http = require "osara.http"
    osara.route("POST", "/vocabulary", function(req) return { got = req.value } end)
    local status, _, body = http._dispatch { method = "POST", target = "/vocabulary", id = 1,
                                             t0 = osara.monotonic(), body = '{"a":1}',
                                             headers = { ["content-type"] = "application/json" } }
    assert.are.equal(200, status)
    assert.are.same({ got = { a = 1 } }, require("cjson").decode(body))
  end)
end)
