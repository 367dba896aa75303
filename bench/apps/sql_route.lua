-- osara side of the sql_route benchmark: an HTTP route that reads one row
-- by id from PostgreSQL through the pool on every request (libpq's
-- asynchronous API on the loop, a prepared statement per connection).
-- BENCH_LISTEN ("host:port"), BENCH_PG (URL), BENCH_POOL (connections).
local osara = require "osara"

osara.http { listen = os.getenv("BENCH_LISTEN") }
local size = tonumber(os.getenv("BENCH_POOL"))
-- pool_min: opened at start, as the aiohttp peer's asyncpg pool (min_size)
local db = osara.sql(os.getenv("BENCH_PG"), { pool_size = size, pool_min = size })

osara.route("GET", "/orders/{id:int}", function(req, id)
  local rows, err = db:query("SELECT id, user_name, amount, status FROM orders WHERE id = $1", id)
  if not rows then return 503, { error = err } end
  if not rows[1] then return 404, { error = "no such order" } end
  return rows[1]
end)
