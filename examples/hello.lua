-- hello.lua: a pipeline on the embedded Kafka broker (nothing to install).
-- A timer produces an order every second; a handler enriches it into a
-- second topic; a second handler logs the enriched events. Point it at a
-- real cluster with OSARA_KAFKA_BOOTSTRAP_SERVERS=host:9092.
local osara = require "osara"

local kafka = osara.kafka { ["group.id"] = "hello" }
local orders = kafka:topic("orders")
local enriched = kafka:topic("orders.enriched")

local n = 0
osara.every(1, function()
  n = n + 1
  orders:send({ id = n, user = "user" .. (n % 3), amount = n * 10 }, { key = "user" .. (n % 3) })
end)

kafka:handle("orders", { sink = enriched }, function(msg)
  local o = msg.value
  return { id = o.id, user = o.user, amount = o.amount, vip = o.amount >= 50,
           at = osara.now() }
end)

local last = {} -- the last enriched order of each user (this version's memory)
kafka:handle("orders.enriched", function(msg)
  local e = msg.value
  last[e.user] = e
  osara.log.info("order %d from %s: %d%s", e.id, e.user, e.amount, e.vip and " (vip)" or "")
end)

-- An HTTP route, and the generated AsyncAPI/OpenAPI documents beside it.
osara.http { docs = true }
osara.route("GET", "/users/{user}/last", function(req, user)
  return last[user] or osara.response { status = 404, body = { error = "no order from " .. user .. " yet" } }
end)

local http = osara.http.address()
osara.log.info("hello from osara %s: kafka at %s", osara.version, kafka:bootstrap())
osara.log.info("try: curl http://%s/users/user1/last (or /metrics, /readyz, /asyncapi.json); "
  .. "osara docs examples/hello.lua --asyncapi; edit this file under --watch", http)
