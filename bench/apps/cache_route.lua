-- osara side of the cache_route benchmark: an HTTP route whose answer is
-- read from redis (osara.cache, hiredis on the loop) on every request.
-- BENCH_LISTEN, BENCH_REDIS ("host:port"); scripts/bench fills order:1..1000.
local osara = require "osara"

osara.http { listen = os.getenv("BENCH_LISTEN") }
local orders = osara.cache { type = "redis", host = os.getenv("BENCH_REDIS"), prefix = "bench:" }

osara.route("GET", "/orders/{id:int}", function(req, id)
  local order = orders:get("order:" .. id)
  if order == nil then return 404, { error = "no such order" } end
  return order
end)
