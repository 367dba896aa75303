-- panini's "request" example: classical request/response.
local osara = require "osara"

local nats = osara.nats {}

osara.spawn(function()
  for i = 1, 10 do
    local result, err = nats:request("some.request.subject.123", { n = i }, { timeout = 2 })
    osara.log.warn("response %d: %s", i, result and result.value.data or err)
  end
end)

nats:handle("some.request.subject.123", function(msg)
  osara.log.warn("request %d has been processed", msg.value.n)
  return { success = true, data = "request has been processed" }
end)
