-- micro_framework's tasks.py (seed 004), ported. A task is a plain
-- function of (msg, event): msg.value is micro_framework's `payload`,
-- msg.attempt its injected retry info (BackOffData), and event(name, value)
-- its injected Producer.
local osara = require "osara"

local M = {}

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

return M
