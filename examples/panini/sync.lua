-- panini's "sync example" (app_strategy='sync', publish_sync): in osara there
-- is one style. Code reads as synchronous code; a call that waits yields its
-- coroutine and the loop keeps serving, so the "sync" program is the async
-- one and runs at full speed (panini's sync strategy was many times slower).
local osara = require "osara"

local nats = osara.nats {}
local msg = { key1 = "value1", key2 = 2, key3 = 3.0, key4 = { 1, 2, 3, 4 },
              key5 = { ["1"] = 1, ["2"] = 2, ["3"] = 3, ["4"] = 4, ["5"] = 5 },
              key6 = { subkey1 = "1", subkey2 = 2, ["3"] = 3, ["4"] = 4, ["5"] = 5 }, key7 = require("cjson").null }

osara.spawn(function()                                  -- @app.task()
  for _ = 1, 10 do
    nats:publish("some.publish.subject", msg)           -- app.publish_sync(...)
    osara.log.warn("send message %s", msg.key1)
  end
end)

osara.every(2, function()                               -- @app.timer_task(interval=2)
  for _ = 1, 10 do
    nats:publish("some.publish.subject", msg)
    osara.log.warn("send message from periodic task %s", msg.key1)
  end
end)

local got = 0
nats:handle("some.publish.subject", function(m)         -- @app.listen(...)
  got = got + 1
  osara.log.warn("got message %d: %s", got, m.value.key1)
end)
