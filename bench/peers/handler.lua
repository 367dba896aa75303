-- The handler the c_lua peer calls with lua_pcall: the same work as the
-- osara app (decode, check 3 fields, build the enriched output).
local cjson = require "cjson"
local encode, decode = cjson.encode, cjson.decode
return function(payload)
  local v = decode(payload)
  if type(v.id) ~= "number" or type(v.user) ~= "string" or type(v.amount) ~= "number" then
    return nil
  end
  return encode { id = v.id, user = v.user, amount = v.amount, vip = v.amount > 500 }
end
