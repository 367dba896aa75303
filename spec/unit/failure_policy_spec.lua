-- The failure policy (issue 13 item 2): retry with backoff, dead letters,
-- on_failure and filters, on Kafka and core NATS handlers, through the
-- real handler path (osara.testing delivers without a broker).
local osara = require "osara"
local testing = require "osara.testing"
local H = require "spec.helpers.host"

-- An app with one Kafka and one NATS handler sharing `opts` (Lua source)
-- and a handler that fails the first `FAILS` calls of each message id.
local function app_with(opts)
  local dir = H.tmpdir()
  H.write(dir .. "/app.lua", ([[
local osara = require "osara"
local kafka = osara.kafka { ["group.id"] = "t" }
local nats = osara.nats {}
local out = kafka:topic("out")
calls, failures, seen = {}, {}, {}
local function handler(msg)
  local id = msg.value.id
  calls[id] = (calls[id] or 0) + 1
  seen[id] = { attempt = msg.attempt, first_failure = msg.first_failure }
  if calls[id] <= (msg.value.fails or 0) then error("boom " .. id) end
  return { id = id }
end
local opts = %s
opts.on_failure = opts.on_failure and function(msg, err, attempts)
  failures[#failures + 1] = { id = msg.value and msg.value.id, err = err, attempts = attempts, raw = msg.raw }
end
kafka:handle("orders", (function() local o = { sink = out } for k, v in pairs(opts) do o[k] = v end return o end)(), handler)
nats:handle("orders.*", opts, handler)
]]):format(opts))
  return testing.load(dir .. "/app.lua")
end

local KAFKA, NATS = "orders (group t)", "orders.*"

local function dead_letters(out)
  local list = {}
  for _, s in ipairs(out.sent) do
    if s.meta and s.meta.dead_letter then list[#list + 1] = s end
  end
  return list
end

describe("failure policy", function()
  after_each(H.cleanup)

  for _, case in ipairs { { "kafka", KAFKA, "orders" }, { "nats", NATS, "orders.x" } } do
    local kind, key, where = case[1], case[2], case[3]

    it(kind .. ": a handler failing twice then succeeding is handled once, seeing msg.attempt == 3", function()
      local app = app_with("{ retry = { backoff = 0.01 } }")
      local before = osara.metrics.value("osara_retries_total", { kind = kind, name = key:match("^%S+") }) or 0
      local out = app:deliver(kind, key, { value = { id = 1, fails = 2 }, subject = where })
      assert.is_true(out.ok)
      assert.are.equal(3, _G.calls[1])
      assert.are.equal(3, _G.seen[1].attempt)
      assert.is_number(_G.seen[1].first_failure)
      assert.is_true(math.abs(_G.seen[1].first_failure - osara.now()) < 5)
      assert.are.equal(2, osara.metrics.value("osara_retries_total", { kind = kind, name = key:match("^%S+") }) - before)
      if kind == "kafka" then assert.are.same({ { to = "out", value = { id = 1 }, meta = {} } }, out.sent) end
    end)

    it(kind .. ": the default retries 3 times with a 0.1 s backoff that doubles", function()
      local app = app_with("{ on_failure = true }")
      local t0 = osara.monotonic()
      local out = app:deliver(kind, key, { value = { id = 2, fails = 99 }, subject = where })
      local took = osara.monotonic() - t0
      assert.is_false(out.ok)
      assert.are.equal("handler", out.reason)
      assert.are.equal(4, out.attempts)
      assert.are.equal(4, _G.calls[2])
      -- 0.1 + 0.2 + 0.4 s, each jittered by up to 20 %
      assert.is_true(took >= 0.7 * 0.8 - 0.01 and took < 5, "took " .. took)
      assert.are.same({ { id = 2, err = _G.failures[1].err, attempts = 4, raw = _G.failures[1].raw } }, _G.failures)
      assert.matches("boom 2", _G.failures[1].err)
      assert.are.same({}, dead_letters(out))
    end)

    it(kind .. ": retry = false fails at once; retry.on can refuse a retry", function()
      local app = app_with("{ retry = false, on_failure = true }")
      local out = app:deliver(kind, key, { value = { id = 3, fails = 1 }, subject = where })
      assert.are.equal("handler", out.reason)
      assert.are.equal(1, _G.calls[3])
      assert.are.equal(1, _G.failures[1].attempts)
      app = app_with([[{ retry = { backoff = 0.01, on = function(err) return not err:find("boom 4") end } }]])
      out = app:deliver(kind, key, { value = { id = 4, fails = 1 }, subject = where })
      assert.are.equal("handler", out.reason)
      assert.are.equal(1, _G.calls[4])
      out = app:deliver(kind, key, { value = { id = 5, fails = 1 }, subject = where })
      assert.is_true(out.ok)
      assert.are.equal(2, _G.calls[5])
      -- a retry.on that raises answers no (and says so) instead of failing the host
      app = app_with([[{ retry = { on = function() error("broken on") end } }]])
      out = app:deliver(kind, key, { value = { id = 9, fails = 1 }, subject = where })
      assert.are.equal("handler", out.reason)
      assert.are.equal(1, _G.calls[9])
    end)

    it(kind .. ": a handler always failing reaches the dead letter with every header, then on_failure", function()
      local app = app_with([[{ retry = { max = 2, backoff = 0.01 }, dlq = "dead", on_failure = true }]])
      local out = app:deliver(kind, key, { value = { id = 6, fails = 99 }, key = "k6", subject = where,
                                           headers = { trace = "t-1" } })
      assert.is_false(out.ok)
      assert.are.equal("dead", out.dead_letter)
      assert.are.equal(3, _G.calls[6])
      local dl = dead_letters(out)
      assert.are.equal(1, #dl)
      assert.are.equal("dead", dl[1].to)
      assert.are.equal(out.msg.raw, dl[1].value) -- the original payload
      local h = dl[1].meta.headers
      assert.are.equal("t-1", h.trace)
      assert.matches("boom 6", h["osara-error"])
      assert.are.equal("handler", h["osara-error-kind"])
      assert.are.equal("3", h["osara-attempts"])
      assert.are.equal(("%.3f"):format(out.msg.first_failure), h["osara-first-failure"])
      if kind == "kafka" then
        assert.are.equal("k6", dl[1].meta.key)
        assert.are.equal(("orders/0/%d"):format(out.msg.offset), h["osara-origin"])
      else
        assert.are.equal("orders.x", h["osara-origin"])
      end
      assert.are.equal(1, #_G.failures)
      assert.are.equal(3, _G.failures[1].attempts)
    end)

    it(kind .. ": a decode or schema failure goes straight to the dead letter", function()
      local app = app_with([[{ dlq = "dead", on_failure = true, schema = osara.schema { id = "integer" } }]])
      local out = app:deliver(kind, key, { raw = "{not json", subject = where })
      assert.are.equal("decode", out.reason)
      local dl = dead_letters(out)
      assert.are.equal(1, #dl)
      assert.are.equal("{not json", dl[1].value)
      assert.are.equal("decode", dl[1].meta.headers["osara-error-kind"])
      assert.are.equal("1", dl[1].meta.headers["osara-attempts"])
      out = app:deliver(kind, key, { value = { id = "x" }, subject = where })
      assert.are.equal("schema", dead_letters(out)[1].meta.headers["osara-error-kind"])
      assert.are.equal(2, #_G.failures)
      assert.are.same({}, _G.calls) -- the handler never ran
    end)

    it(kind .. ": filter skips messages, counts them and settles them", function()
      local app = app_with("{ filter = function(msg) return msg.value.id % 2 == 0 end }")
      local labels = { kind = kind, name = key:match("^%S+") }
      local before = osara.metrics.value("osara_filtered_total", labels) or 0
      local out = app:deliver(kind, key, { value = { id = 7 }, subject = where })
      assert.is_true(out.ok)
      assert.are.equal("filtered", out.skipped)
      assert.is_nil(_G.calls[7])
      assert.is_true(app:deliver(kind, key, { value = { id = 8 }, subject = where }).ok)
      assert.are.equal(1, _G.calls[8])
      assert.are.equal(1, osara.metrics.value("osara_filtered_total", labels) - before)
    end)
  end

  it("kafka with a store: a retried attempt starts from a clean transaction", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local kafka = osara.kafka { ["group.id"] = "s" }
local counts = osara.store "counts"
kafka:handle("clicks", { store = counts, retry = { backoff = 0.01 } }, function(msg)
  msg.tx:set("n", (msg.tx:get("n") or 0) + 1)   -- the failed attempt's write is dropped
  if msg.attempt == 1 then error("first attempt fails") end
  return msg.tx:get("n")
end)
]])
    local app = testing.load(dir .. "/app.lua")
    local out = app:deliver("kafka", "clicks (group s)", { value = {} })
    assert.is_true(out.ok)
    assert.are.same({ 1 }, out.returned)
    app:close()
  end)

  it("checks the policy's options", function()
    local dir = H.tmpdir()
    for src, want in pairs {
      ["{ retry = { tries = 3 } }"] = "unknown option 'tries' in retry",
      ["{ retry = { max = 1.5 } }"] = "option 'max' in retry must be an integer",
      ["{ dlq = 3 }"] = "option 'dlq' in kafka:handle must be a string or a boolean",
      ["{ on_failure = 'x' }"] = "option 'on_failure' in kafka:handle must be a function",
    } do
      H.write(dir .. "/app.lua", "local k = require('osara').kafka {}\nk:handle('t', " .. src .. ", function() end)\n")
      local ok, err = pcall(testing.load, dir .. "/app.lua")
      assert.is_false(ok)
      assert.matches(want, err, 1, true)
    end
  end)
end)
