-- hello.lua: the smallest osara app. A timer ticks every second and logs;
-- a background task says hello once. (The Kafka pipeline version arrives
-- with the Kafka subsystem.)
local osara = require "osara"

local ticks = 0

osara.every(1, function()
  ticks = ticks + 1
  osara.log.info("tick %d at %.3f", ticks, osara.now())
end)

osara.spawn(function()
  osara.sleep(0.1)
  osara.log.info("hello from osara %s", osara.version)
end)
