-- osara side of the amqp_consume benchmark: consume a queue filled
-- beforehand, decode each JSON message (the default codec), count, ack.
-- Logs "bench: rate=..." after N messages, measured from the first one, as
-- the pika peer does.
local osara = require "osara"

local N = tonumber(os.getenv("BENCH_N"))
local amqp = osara.amqp { url = os.getenv("BENCH_AMQP"), prefetch = 256 }

local done = require("rate")(N)
amqp:handle({ exchange = "bench_amqp", routing_key = "m", queue = "bench_amqp" }, { retry = false },
  function(msg)
    if msg.value.i then done() end
  end)
