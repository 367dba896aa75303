-- scripts/bench ws_rpc: one exposed function, called over WebSocket by
-- build-bench/ws_load with 64 calls in flight.
local osara = require "osara"
osara.http { listen = os.getenv("BENCH_LISTEN") or "127.0.0.1:8080" }
osara.rpc.expose("add", function(a, b) return a + b end)
