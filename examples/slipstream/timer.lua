-- slipstream's Timer: an async generator that triggers a handler.
--
--   @handle(timer())
--   def handler(): print(strftime('%H:%M:%S', localtime()))
--
-- osara.every(seconds, fn) runs fn on the loop; ticks never overlap (a slow
-- tick delays the next instead of stacking).
local osara = require "osara"

osara.every(1.0, function()
  print(os.date("%H:%M:%S"))
end)
