-- c_lua peer, consume scenario: decode only.
local decode = require("cjson").decode
return function(payload)
  decode(payload)
  return nil
end
