-- Store speed (osara side of the `store` scenario): puts in transactions of
-- 1000, then random gets. Prints "bench: <what> rate=<per second>".
local osara = require "osara"
local N = tonumber(os.getenv("BENCH_N")) or 100000
local db = osara.store("bench", { codec = "raw", dir = os.getenv("BENCH_DIR") })

osara.after(0, function()
  local t0 = osara.monotonic()
  for b = 0, N / 1000 - 1 do
    local batch = {}
    for i = 1, 1000 do
      local k = b * 1000 + i
      batch[("key%08d"):format((k * 7919) % N)] = "value-" .. k
    end
    db:set_many(batch)
  end
  local secs = osara.monotonic() - t0
  osara.log.info("bench: put rate=%.0f", N / secs)
  t0 = osara.monotonic()
  local hits = 0
  for i = 1, N do
    if db:get(("key%08d"):format(math.random(0, N - 1))) then hits = hits + 1 end
  end
  secs = osara.monotonic() - t0
  osara.log.info("bench: get rate=%.0f hits=%d", N / secs, hits)
  osara._vm.stop(0)
end)
