-- micro_framework's tasks.py (seed 004), ported. A task is a plain
-- function of (msg, event): msg.value is micro_framework's `payload`,
-- msg.attempt its injected retry info (BackOffData), and event(name, value)
-- its injected Producer.
local osara = require "osara"

local M = {}

-- The spec runs the example fast: 0.1 s retries, 0.3 s tasks, a 1 s timer.
M.fast = os.getenv("MICRO_FRAMEWORK_FAST") == "1"

function M.test(msg, event)
  -- business logic
  if msg.value.fail then
    error("test failed for " .. tostring(msg.value.id))
  end
  assert(event("event_name", {}))
  osara.log.info("test handled %s (attempt %d)", tostring(msg.value.id), msg.attempt)
end

function M.test2(msg)
  osara.log.info("Called after test function: %s", tostring(msg.value.some_key))
end

-- CallbackRoute's callback_target: called once, after the last retry.
function M.test_failure(msg, err, attempts)
  osara.log.info("Called after test failed and the max_retries is reached: %s after %d attempts (%s)",
    tostring(msg.value.id), attempts, err)
end

-- A class whose method is the route (Route('tasks.Class', method_name=...)).
-- Its Producer is the client's amqp:event, given to the instance.
M.Class = {}
M.Class.__index = M.Class

function M.Class.new(amqp)
  return setmetatable({ producer = function(name, value) return amqp:event(name, value) end }, M.Class)
end

function M.Class:class_method(msg)
  -- business logic. (micro_framework's example produces 'event_name' here,
  -- the event this route listens to, which would loop forever; it
  -- announces that it ran instead.)
  assert(self.producer("class_method_done", { attempt = msg.attempt }))
  osara.log.info("class_method handled attempt %d", msg.attempt)
end

-- ---- WebSocket RPC examples ----------------------------------------------

M.websocket_task_doc = [[
My Docstring
:param arg1:
:param arg2:
:return:]]

-- time.sleep(3) yields here: other calls and messages keep running.
function M.websocket_task(arg1, arg2)
  osara.log.info("Websocket Task Called with %s and %s", tostring(arg1), tostring(arg2))
  osara.sleep(M.fast and 0.3 or 3)
  return ("%s - %s"):format(tostring(arg1), tostring(arg2))
end

-- The caller on a timer, with the RPC client as its dependency.
function M.websocket_caller(service_rpc)
  local targets = assert(service_rpc:targets())
  local names = {}
  for i, t in ipairs(targets) do names[i] = t.target end
  osara.log.info("targets: %s", table.concat(names, ", "))
  osara.log.info("%s", tostring(service_rpc.websocket_task.info))
  local async_response = service_rpc.websocket_task:call_async("argument1", "argument2")
  osara.log.info("This is an async response future %s", tostring(async_response))
  local response = service_rpc.websocket_task("argument3", "argument4")
  osara.log.info("Sync Response: %s", tostring(response))
  osara.log.info("Async Response result will lock until response: %s", tostring(async_response:result()))
end

return M
