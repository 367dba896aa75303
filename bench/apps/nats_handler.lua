-- osara side of the nats_handler benchmark: a handler decodes each JSON
-- message (the default codec) and counts. Logs "bench: ready" once its
-- subscription is on the server and "bench: rate=..." after N messages,
-- measured from the first message, as the peers do.
local osara = require "osara"

local N = tonumber(os.getenv("BENCH_N"))
local nats = osara.nats { servers = os.getenv("BENCH_NATS") }

local done = require("rate")(N)
-- unlimited pending, as the peers: the publisher outruns every subscriber
nats:handle("bench.nats", { pending_msgs = -1, pending_bytes = -1 }, function(msg)
  done()
end)

osara.after(0, function() osara.log.info("bench: ready") end)
