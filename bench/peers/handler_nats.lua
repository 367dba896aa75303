-- c_lua peer, nats_handler scenario: decode and count, as the osara app does.
local decode = require("cjson").decode
local count = 0
return function(payload)
  decode(payload)
  count = count + 1
end
