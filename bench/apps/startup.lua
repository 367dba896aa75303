-- osara side of the startup benchmark: the embedded broker, one message
-- sent at load, and the wall-clock time its handler ran ("bench: first_at=").
-- scripts/bench subtracts the time it started the process.
local osara = require "osara"

local kafka = osara.kafka {}
kafka:handle("bench.start", function()
  osara.log.info("bench: first_at=%.6f", osara.now())
  osara._vm.stop(0)
end)
osara.after(0, function() kafka:topic("bench.start"):send({ hello = 1 }) end)
