-- osara side of the nats_request benchmarks. BENCH_MODE:
--   respond  answer bench.req with the request's bytes (codec raw)
--   req_seq  N requests to bench.req, one at a time
--   req_64   N requests to bench.req from 64 coroutines at once
-- Logs "bench: ready" (respond) or "bench: rate=..." (requests).
local osara = require "osara"

local N = tonumber(os.getenv("BENCH_N"))
local MODE = os.getenv("BENCH_MODE")
local nats = osara.nats { servers = os.getenv("BENCH_NATS") }

local function order(i)
  return ('{"id":%d,"user":"user-%04d","amount":%d,"note":"benchmark order payload"}'):format(i, i % 1000, i % 997)
end

if MODE == "respond" then
  nats:handle("bench.req", { codec = "raw" }, function(msg) return msg.value end)
  osara.after(0, function() osara.log.info("bench: ready") end)
  return
end

local OPTS = { codec = "raw", timeout = 5 }
local function report(t0)
  local secs = osara.monotonic() - t0
  osara.log.info("bench: rate=%.0f n=%d secs=%.3f", N / secs, N, secs)
  osara._vm.stop(0)
end

osara.after(0, function()
  local t0 = osara.monotonic()
  if MODE == "req_seq" then
    for i = 1, N do
      assert(nats:request("bench.req", order(i), OPTS))
    end
    return report(t0)
  end
  local next_id, done = 0, 0
  for _ = 1, 64 do
    osara.spawn(function()
      while next_id < N do
        next_id = next_id + 1
        assert(nats:request("bench.req", order(next_id), OPTS))
        done = done + 1
        if done == N then report(t0) end
      end
    end)
  end
end)
