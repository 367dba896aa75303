-- slipstream's Endpoint: a timer writes the time into a cache and prints it;
-- GET /updates streams every cache change as server-sent events.
--
--   @handle(timer(), sink=[cache, print])
--   def tick_tock(): yield 'time', strftime('%H:%M:%S')
--   @app.get('/updates') -> StreamingResponse(cache_value_updates(), 'text/event-stream')
--
--   curl -N http://127.0.0.1:8080/updates
--
-- osara's store feeds store:watch(prefix) on every set (slipstream's
-- `cache(key, val)`), and osara.sse turns the watch into an event stream;
-- the HTTP server is the host's own, no second server to start.
local osara = require "osara"
local cache = osara.store "db"

local function tick_tock(emit)
  emit("time", os.date("%H:%M:%S"))
end

osara.every(1.0, function()
  tick_tock(function(key, value)                 -- sink = [cache, print]
    cache:set(key, value)
    print(key, value)
  end)
end)

osara.route("GET", "/updates", function()
  return osara.sse(cache:watch(""), { format = function(_, value) return "data: " .. value .. "\n\n" end })
end)
