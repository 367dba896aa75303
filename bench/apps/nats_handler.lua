-- osara side of the nats_handler benchmark: a handler decodes each JSON
-- message (the default codec) and counts. Logs "bench: ready" once its
-- subscription is on the server and "bench: rate=..." after N messages,
-- measured from the first message, as the peers do.
local osara = require "osara"

local N = tonumber(os.getenv("BENCH_N"))
local nats = osara.nats { servers = os.getenv("BENCH_NATS") }

local handled, t0 = 0, nil
-- unlimited pending, as the peers: the publisher outruns every subscriber
nats:handle("bench.nats", { pending_msgs = -1, pending_bytes = -1 }, function(msg)
  t0 = t0 or osara.monotonic()
  handled = handled + 1
  if handled == N then
    local secs = osara.monotonic() - t0
    osara.log.info("bench: rate=%.0f n=%d secs=%.3f", N / secs, N, secs)
    osara._vm.stop(0)
  end
end)

osara.after(0, function() osara.log.info("bench: ready") end)
