-- The bench apps' counter: rate(n) returns a function to call once per
-- message handled; the first call starts the clock, the n-th logs
-- "bench: rate=<msgs/s> n=<n> secs=<s>" and stops the host.
local osara = require "osara"

return function(n)
  local handled, t0 = 0, nil
  return function()
    t0 = t0 or osara.monotonic()
    handled = handled + 1
    if handled == n then
      local secs = osara.monotonic() - t0
      osara.log.info("bench: rate=%.0f n=%d secs=%.3f", n / secs, n, secs)
      osara._vm.stop(0)
    end
  end
end
