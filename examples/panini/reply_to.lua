-- panini's "reply_to" example: the response goes to a third subject.
local osara = require "osara"

local nats = osara.nats {}

osara.spawn(function()
  for i = 1, 10 do
    nats:publish("some.subject.for.request.with.response.to.another.subject", { n = i },
                 { reply_to = "reply.to.subject" })
  end
  osara.log.warn("sent 10 requests")
end)

nats:handle("some.subject.for.request.with.response.to.another.subject", function(msg)
  return { success = true, data = "request has been processed", n = msg.value.n }
end)

nats:handle("reply.to.subject", function(msg)
  osara.log.warn("received response %d on %s", msg.value.n, msg.subject)
end)
