-- osara side of the memory benchmark: a slow handler (it yields 1 ms per
-- message, like a call to another service) over N messages. In-flight is
-- bounded per partition and overall, so RSS must stay flat however long the
-- backlog; scripts/bench samples it. Logs "bench: rate=" at the end.
local osara = require "osara"

local N = tonumber(os.getenv("BENCH_N"))
local kafka = osara.kafka { ["bootstrap.servers"] = os.getenv("BENCH_BOOT"),
                            ["group.id"] = "osara-mem-" .. os.time() .. "-" .. math.random(1e6) }
local done = require("rate")(N)
kafka:handle("bench.in", function(msg)
  osara.sleep(0.001)
  done()
end)
