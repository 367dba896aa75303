-- The app of README's "Your first hour": a Kafka handler with a schema
-- keeps totals per user in a store; a route reads them.
local osara = require "osara"

local kafka = osara.kafka { ["group.id"] = "shop" }         -- the embedded broker
local Order = osara.schema({ id = "integer", user = "string",
                             amount = osara.number { min = 0 } }, { name = "Order" })
local totals = osara.store "totals"

kafka:handle("orders", { schema = Order, store = totals }, function(msg)
  local total = (msg.tx:get(msg.value.user) or 0) + msg.value.amount
  msg.tx:set(msg.value.user, total)                         -- committed with the offset
  return { user = msg.value.user, total = total }
end)

osara.route("GET", "/totals/{user}", function(req, user)
  return { user = user, total = totals:get(user) or 0 }
end)

osara.http { docs = true }                                  -- /asyncapi.json, /openapi.json
