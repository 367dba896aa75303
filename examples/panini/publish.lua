-- panini's "publish" example: a task publishes, a timer publishes
-- periodically, a listener receives. Runs on the embedded nats-server.
local osara = require "osara"

local nats = osara.nats {}
local msg = { key1 = "value1", key2 = 2, key3 = 3.0, key4 = { 1, 2, 3, 4 },
              key5 = { ["1"] = 1, ["2"] = 2 }, key6 = { subkey1 = "1", subkey2 = 2 } }

osara.spawn(function()                       -- @app.task()
  for _ = 1, 10 do
    nats:publish("some.publish.subject", msg)
    osara.log.warn("send message %s", msg.key1)
  end
end)

osara.every(2, function()                    -- @app.timer_task(interval=2)
  for _ = 1, 10 do
    nats:publish("some.publish.subject", msg)
  end
  osara.log.warn("send 10 messages from periodic task")
end)

local got = 0
nats:handle("some.publish.subject", function(m)   -- @app.listen(...)
  got = got + 1
  osara.log.warn("got message %d: %s", got, m.value.key1)
end)
