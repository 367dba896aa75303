-- Time per SQLite call on the loop thread (docs/sql.md, "What blocks"):
--   osara run bench/apps/sqlite_calls.lua
-- 20 000 calls per operation, a return to the loop every 50 calls (as
-- handlers do), p50/p99/max per call, and how many WAL checkpoints ran on
-- the thread pool meanwhile. The database is bench.db in the data folder.
local osara = require "osara"

local function measure(label, n, fn)
  local ts = {}
  for i = 1, n do
    local t0 = osara.monotonic()
    fn(i)
    ts[i] = (osara.monotonic() - t0) * 1e6
    if i % 50 == 0 then osara.sleep(0.0005) end
  end
  table.sort(ts)
  print(("%-28s n=%d p50=%.0fus p99=%.0fus max=%.0fus"):format(label, n,
    ts[math.floor(n * 0.5)], ts[math.floor(n * 0.99)], ts[n]))
end

osara.spawn(function()
  local db = osara.sql("sqlite:bench.db")
  assert(db:exec("DROP TABLE IF EXISTS t"))
  assert(db:exec("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, n INTEGER)"))
  measure("insert (autocommit)", 20000, function(i)
    assert(db:exec("INSERT INTO t (name, n) VALUES ($1, $2)", "name" .. i, i))
  end)
  measure("select by id", 20000, function(i) assert(db:query("SELECT * FROM t WHERE id = $1", i)) end)
  measure("update by id", 20000, function(i) assert(db:exec("UPDATE t SET n = n + 1 WHERE id = $1", i)) end)
  measure("tx of 10 inserts", 2000, function()
    assert(db:tx(function(tx)
      for j = 1, 10 do tx:exec("INSERT INTO t (name, n) VALUES ($1, $2)", "x", j) end
    end))
  end)
  measure("select 100 rows", 2000, function(i) assert(db:query("SELECT * FROM t WHERE id > $1 LIMIT 100", i)) end)
  osara.sleep(0.5)
  print("checkpoints off the loop:", db:stats().checkpoints)
  require("osara.vm_c").stop(0)
end)
