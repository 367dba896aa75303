-- sse.lua: slipstream's /updates endpoint. A timer writes the time into a
-- store every second; GET /updates streams each change as a server-sent
-- event.   curl -N localhost:8080/updates
local osara = require "osara"

local cache = osara.store("cache", { memory = true })

osara.http { listen = "127.0.0.1:8080" }

osara.every(1, function()
  cache:set("time", os.date("!%H:%M:%S"))
end)

osara.route("GET", "/updates", function(req)
  return osara.sse(cache:watch(""), { format = function(key, value)
    return "data: " .. tostring(value) .. "\n\n"
  end })
end)
