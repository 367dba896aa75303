-- osara side of the http benchmark: a JSON route with a typed path
-- parameter, served with keep-alive on BENCH_LISTEN; wrk drives it.
local osara = require "osara"

osara.http { listen = os.getenv("BENCH_LISTEN") }

osara.route("GET", "/orders/{id:int}", function(req, id)
  return { id = id, user = "user-" .. id % 1000, amount = id % 997, status = "paid" }
end)
