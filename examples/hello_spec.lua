-- Runs examples/hello.lua with the real binary: the pipeline on the
-- embedded broker, and kcat reading the enriched topic from outside.
local osara = require "osara"
local H = require "spec.helpers.host"
local K = require "spec.helpers.kafka"

describe("examples/hello.lua", function()
  after_each(H.cleanup)

  it("produces, enriches and logs orders on the embedded broker", function()
    local p = H.osara { "run", "examples/hello.lua" }
    local boot = H.expect(p, "kafka at"):match("kafka at ([%d.]+:%d+)")
    H.expect(p, "order 1 from user1: 10", 10)
    H.expect(p, "order 2 from user2: 20", 5)
    local out = K.eventually(boot, "orders.enriched", function(m) return #m >= 2 end, 10, "enriched orders")
    assert.matches('"vip":false', out[1].value)
    H.stop(p)
  end)

  it("passes osara check", function()
    local status, out = H.run { "check", "examples/hello.lua" }
    assert.are.equal(0, status)
    assert.matches("timer%s+every 1 #1", out)
    assert.matches("kafka%s+orders %(group hello%)", out)
    assert.matches("kafka%s+orders.enriched %(group hello%)", out)
  end)
end)
