-- osara side of the kafka_pipeline / kafka_consume benchmarks: consume,
-- decode, validate a 3-field schema, produce one enriched output (offsets
-- stored after delivery, as always). Logs "bench: rate=..." after N messages.
local osara = require "osara"

local N = tonumber(os.getenv("BENCH_N"))
local MODE = os.getenv("BENCH_MODE") or "pipeline"
local kafka = osara.kafka { ["bootstrap.servers"] = os.getenv("BENCH_BOOT"),
                            ["group.id"] = "osara-bench-" .. os.time() .. "-" .. math.random(1e6) }
local Order = osara.schema { id = "integer", user = "string", amount = "integer" }
local out = kafka:topic("bench.out")

local done = require("rate")(N)

if MODE == "pipeline" then
  kafka:handle("bench.in", { schema = Order, sink = out }, function(msg)
    local o = msg.value
    done()
    return { id = o.id, user = o.user, amount = o.amount, vip = o.amount > 500 }
  end)
else
  kafka:handle("bench.in", function(msg)
    done()
  end)
end
