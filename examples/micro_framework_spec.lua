-- Runs micro_framework's ported main.py/tasks.py (examples/micro_framework/)
-- against a real rabbitmq-server, with pika publishing as another service.
local H = require "spec.helpers.host"
local R = require "spec.helpers.rabbitmq"
local redis = require "spec.helpers.redis"

local TOOL = "spec/tools/amqp_tool.py"

describe("micro_framework example", function()
  local server
  setup(function() server = R.start() end)
  teardown(function() if server then server:stop() end end)
  after_each(H.cleanup)

  local function pub(exchange, key, body)
    H.finish(H.child({ "/usr/bin/python3", TOOL, "pub", server.url, exchange, key, "1", body },
      { name = "amqp_tool" }), { timeout = 60 })
  end

  -- The example on a free port for its WebSocket server, its waits short.
  local function start()
    local port = redis.free_port()
    return H.osara({ "run", "--data", H.tmpdir(), "--http", "127.0.0.1:" .. port,
                     "examples/micro_framework/main.lua" },
      { OSARA_AMQP_URL = server.url, MICRO_FRAMEWORK_FAST = "1",
        RPC_URL = ("ws://127.0.0.1:%d/rpc"):format(port) },
      { errors = { "amqp my_exchange/my_routing_key: handler failed at" } })
  end

  it("runs the CallbackRoute with retries and its failure callback, the filtered listener and the class method", function()
    local p = start()
    for _, route in ipairs { "my_exchange/my_routing_key", "my_service/event_name", "my_service/event_name" } do
      H.expect(p, "amqp: consuming " .. route, 30)
    end
    -- tasks.test produces 'event_name' {}: test2's filter skips it, the class method runs
    pub("my_exchange", "my_routing_key", '{"id": {i}}')
    local function logged(text)
      H.eventually(function() return p:output():find(text, 1, true) end, 15, text)
    end
    logged("test handled 1 (attempt 1)")
    logged("class_method handled attempt 1")
    -- a payload the filter keeps
    pub("my_service", "event_name", '{"some_key": "some_value"}')
    H.expect(p, "Called after test function: some_value", 15)
    -- a failing test: five retries, then the failure callback
    pub("my_exchange", "my_routing_key", '{"id": 7, "fail": true}')
    local line = H.expect(p, "Called after test failed and the max_retries is reached: 7 after 6 attempts", 30)
    assert.matches("test failed for 7", line)
    H.stop(p)
    local out = p:output()
    assert.is_nil(out:find("Called after test function: nil", 1, true), "the filter let {} through")
    local _, retries = out:gsub("handler failed at my_exchange/my_routing_key %(queue my_service.tasks.test%) %(attempt", "")
    assert.equal(5, retries)
  end)

  it("runs the WebSocket task and its caller on a timer", function()
    local p = start()
    H.expect(p, "targets: websocket_task", 20)
    H.expect(p, "My Docstring", 5)
    H.expect(p, "Sync Response: argument3 - argument4", 10)
    H.expect(p, "Async Response result will lock until response: argument1 - argument2", 10)
    H.stop(p)
  end)
end)
