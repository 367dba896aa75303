-- Runs examples/hello.lua with the real binary: the pipeline on the
-- embedded broker, and kcat reading the enriched topic from outside.
local osara = require "osara"
local H = require "spec.helpers.host"
local K = require "spec.helpers.kafka"
local T = require "spec.helpers.http"
local cjson = require "cjson"

describe("examples/hello.lua", function()
  after_each(H.cleanup)

  it("produces, enriches and logs orders on the embedded broker", function()
    local p = H.osara { "run", "--http", "127.0.0.1:0", "examples/hello.lua" }
    local port = T.listening(p)
    local boot = H.expect(p, "kafka at"):match("kafka at ([%d.]+:%d+)")
    assert.matches("try: curl http://127%.0%.0%.1:" .. port .. "/users/user1/last", H.expect(p, "try:"))
    assert.matches("Ctrl%-C or SIGTERM stops it", H.expect(p, "running examples/hello.lua"))
    H.expect(p, "order 1 from user1: 10", 10)
    H.expect(p, "order 2 from user2: 20", 5)
    local out = K.eventually(boot, "orders.enriched", function(m) return #m >= 2 end, 10, "enriched orders")
    assert.matches('"vip":false', out[1].value)
    local status, _, body = T.curl { "http://127.0.0.1:" .. port .. "/users/user1/last" }
    assert.are.equal(200, status)
    assert.are.equal("user1", cjson.decode(body).user)
    assert.are.equal(404, (T.curl { "http://127.0.0.1:" .. port .. "/users/nobody/last" }))
    assert.are.equal(200, (T.curl { "http://127.0.0.1:" .. port .. "/asyncapi.json" }))
    H.stop(p)
    assert.matches("stopped examples/hello.lua %(exit status 0%)\n$", p:output())
  end)

  it("passes osara check", function()
    local status, out = H.run { "check", "examples/hello.lua" }
    assert.are.equal(0, status)
    assert.matches("timer%s+every 1 #1", out)
    assert.matches("kafka%s+orders %(group hello%)", out)
    assert.matches("kafka%s+orders.enriched %(group hello%)", out)
    assert.matches("route%s+GET /users/{user}/last", out)
  end)
end)
