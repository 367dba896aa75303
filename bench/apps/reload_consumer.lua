-- osara side of the reload benchmark (run with --watch). scripts/bench
-- rewrites VERSION while messages flow; the first message each version
-- handles logs the wall-clock time, and every message logs its id, so the
-- harness counts what was lost or handled twice across the reloads.
local osara = require "osara"

local VERSION = 0
local kafka = osara.kafka { ["bootstrap.servers"] = os.getenv("BENCH_BOOT"),
                            ["group.id"] = os.getenv("BENCH_GROUP") }
local first = true
kafka:handle("bench.reload", function(msg)
  if first then
    first = false
    osara.log.info("bench: v%d first_at=%.6f", VERSION, osara.now())
  end
  osara.log.info("h %s", msg.value.id)
end)
