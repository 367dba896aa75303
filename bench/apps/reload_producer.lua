-- Steady load for the reload benchmark: BENCH_N messages with ids 1..N to
-- bench.reload at BENCH_RATE per second, then "bench: produced".
local osara = require "osara"

local N, RATE = tonumber(os.getenv("BENCH_N")), tonumber(os.getenv("BENCH_RATE"))
local kafka = osara.kafka { ["bootstrap.servers"] = os.getenv("BENCH_BOOT") }
local topic = kafka:topic("bench.reload")
local sent = 0
osara.every(0.01, function()
  local last
  for _ = 1, RATE / 100 do
    if sent == N then return end
    sent = sent + 1
    last = topic:send({ id = sent })
  end
  if sent == N then
    assert(last:wait())
    osara.log.info("bench: produced %d", N)
    osara._vm.stop(0)
  end
end)
