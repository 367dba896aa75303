-- micro_framework's main.py (seed 004), ported: its routes as handlers.
--
--   Python                                     osara
--   config AMQP_URI / SERVICE_NAME             osara.amqp{ url =, service = }
--   MAX_WORKERS = 3                            max_inflight = 3 on each handler
--   CallbackRoute(..., callback_target=,      retry = { max = 5, backoff = 10 },
--     backoff=AsyncBackOff(5, 10000))           on_failure = tasks.test_failure
--   EventListener(source_service, event_name)  amqp:handle{ exchange =, routing_key = }
--   payload_filter=lambda payload: ...         filter = function(msg) ... end
--   Route('tasks.Class', method_name=...)      a handler calling the instance's method
--
-- AsyncBackOff needs RabbitMQ's delayed-message plugin; osara's retries use
-- a per-message TTL and a dead-letter exchange (docs/amqp.md). Run with
-- `osara run examples/micro_framework/main.lua` (OSARA_AMQP_URL overrides
-- the broker's URL, --http the WebSocket address, RPC_URL the caller's
-- target; MICRO_FRAMEWORK_FAST=1 shortens the waits, for the spec).
local osara = require "osara"
local tasks = require "tasks"

local amqp = osara.amqp { url = "amqp://guest:guest@localhost:5672/", service = "my_service" }
local MAX_WORKERS = 3
local interval = tasks.fast and 0.1 or 10
-- AsyncBackOff(max_retries=5, interval=10000): the same wait before every retry
local backoff = { max = 5, backoff = interval, max_backoff = interval, jitter = 0 }

-- CallbackRoute('tasks.test', callback_target='tasks.test_failure', ...)
amqp:handle({ exchange = "my_exchange", routing_key = "my_routing_key", queue = "my_service.tasks.test" },
  { max_inflight = MAX_WORKERS, retry = backoff, on_failure = tasks.test_failure },
  tasks.test)

-- Route(test2, EventListener(..., payload_filter=lambda payload: payload['some_key'] == 'some_value'))
amqp:handle({ exchange = "my_service", routing_key = "event_name", queue = "my_service.tasks.test2" },
  { max_inflight = MAX_WORKERS, filter = function(msg) return msg.value.some_key == "some_value" end },
  tasks.test2)

-- Route('tasks.Class', method_name='class_method', ...)
local instance = tasks.Class.new(amqp)
amqp:handle({ exchange = "my_service", routing_key = "event_name", queue = "my_service.tasks.Class.class_method" },
  { max_inflight = MAX_WORKERS, retry = backoff },
  function(msg) return instance:class_method(msg) end)

-- WEBSOCKET_IP / WEBSOCKET_PORT: the HTTP server, where /rpc is served
osara.http { listen = "127.0.0.1:8765" }

-- Route('tasks.websocket_task', entrypoint=WebSocketEntrypoint())
osara.rpc.expose("websocket_task", tasks.websocket_task, { doc = tasks.websocket_task_doc })

-- Route('tasks.websocket_caller', entrypoint=TimeEntrypoint(10),
--       dependencies={'service_rpc': WebSocketRPCClient('127.0.0.1', 8765)})
local service_rpc = osara.rpc.client(os.getenv("RPC_URL") or "ws://127.0.0.1:8765/rpc")
osara.every(tasks.fast and 1 or 10, function() tasks.websocket_caller(service_rpc) end)
