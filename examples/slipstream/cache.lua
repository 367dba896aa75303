-- slipstream's Cache: a persistent key-value store, iterated in key order.
--
--   cache = Cache('db'); cache['prize'] = '🏆'; cache['phone'] = '📞'
--   for x, y in cache.items(): print(x, y)        -> phone 📞 / prize 🏆
--   with cache.transaction('fish'): cache['fish'] = '🐟'
--
-- osara.store is LMDB in the data folder. db:transaction(key, fn) runs fn
-- holding the key's lock (other transactions on that key wait; plain reads do
-- not), as slipstream's transaction does, and commits fn's writes at once.
local osara = require "osara"
local cache = osara.store "db"

cache:set("prize", "🏆")
cache:set("phone", "📞")
for x, y in cache:pairs() do
  print(x, y)
end

osara.spawn(function()
  cache:transaction("fish", function(tx)
    tx:set("fish", "🐟")
  end)
  print("fish", cache:get("fish"))
end)
