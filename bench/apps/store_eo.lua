-- osara side of the store_eo benchmark: consume orders and count them per
-- user in an LMDB store, exactly once: each message's state change and its
-- offset commit in one LMDB transaction (opts.store, msg.tx).
local osara = require "osara"

local N = tonumber(os.getenv("BENCH_N"))
local kafka = osara.kafka { ["bootstrap.servers"] = os.getenv("BENCH_BOOT"),
                            ["group.id"] = "osara-eo-" .. os.time() .. "-" .. math.random(1e6) }
local counts = osara.store("counts")
local done = require("rate")(N)

kafka:handle("bench.in", { store = counts }, function(msg)
  local user = msg.value.user
  msg.tx:set(user, (msg.tx:get(user) or 0) + 1)
  done()
end)
