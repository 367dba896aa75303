-- Runs README's "Your first hour" step by step, as a newcomer would: the
-- app's own spec, the app under --watch with an order sent by kcat, the
-- route, an edit that reloads, /metrics and the AsyncAPI document.
local H = require "spec.helpers.host"
local T = require "spec.helpers.http"
local K = require "spec.helpers.kafka"
local cjson = require "cjson"

describe("README: your first hour", function()
  after_each(H.cleanup)

  it("every step works", function()
    -- step 2: the app's spec passes
    local status, out = H.run({ "test", "--output=plainTerminal", "examples/first_hour" }, 60)
    assert.are.equal(0, status, out)
    assert.matches("2 successes / 0 failures", out)

    -- step 3: run it (a copy, as the reader edits it), send an order, ask the route
    local dir = H.tmpdir()
    local f = assert(io.open("examples/first_hour/app.lua"))
    local source = f:read("*a")
    f:close()
    H.write(dir .. "/app.lua", source)
    local p = H.osara { "run", "--watch", "--http", "127.0.0.1:0", dir .. "/app.lua" }
    local bootstrap = H.expect(p, "kafka: embedded broker"):match("at ([%d.]+:%d+)")
    local port = T.listening(p)
    H.expect(p, "running " .. dir .. "/app.lua")
    K.produce(bootstrap, "orders", { '{"id":1,"user":"ann","amount":5}' })
    local base = "http://127.0.0.1:" .. port
    local body = H.eventually(function()
      local _, _, b = T.curl { base .. "/totals/ann" }
      local v = cjson.decode(b)
      return v.total == 5 and v
    end, 20, "the order in the total")
    assert.are.same({ user = "ann", total = 5 }, body)

    -- step 4: edit the route; the reload keeps the consumer and the total
    H.write(dir .. "/app.lua", (source:gsub('return { user = user, total = totals:get%(user%) or 0 }',
      'return { user = user, total = totals:get(user) or 0, currency = "EUR" }')))
    assert.matches("2 kept, 0 added, 0 removed, 0 restarted", H.expect(p, "reloaded", 20))
    local _, _, b2 = T.curl { base .. "/totals/ann" }
    assert.are.same({ user = "ann", total = 5, currency = "EUR" }, cjson.decode(b2))

    -- step 5: /metrics counts the handled order
    local _, _, metrics = T.curl { base .. "/metrics" }
    assert.matches("\nosara_kafka_handled_total 1\n", metrics)

    -- step 6: the AsyncAPI document, served and printed
    local _, _, served = T.curl { base .. "/asyncapi.json" }
    assert.are.equal("3.0.0", cjson.decode(served).asyncapi)
    H.stop(p)
    local s2, doc = H.run { "docs", "examples/first_hour/app.lua", "--asyncapi" }
    assert.are.equal(0, s2)
    local payload = cjson.decode(doc).components.messages["orders.Order"].payload
    assert.are.same({ type = "number", minimum = 0 }, payload.properties.amount)
  end)
end)
