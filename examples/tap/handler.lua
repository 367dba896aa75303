-- osara Tap's first example: a handler per topic.
--
--   tap = Tap({"bootstrap.servers": "127.0.0.1", "group.id": "demo"})
--   @tap.handler("topic_x")
--   def handle_x(msg): print("Got %s" % msg)
--
-- Without bootstrap.servers osara starts its embedded Kafka cluster, so the
-- example also produces a few messages to see something; point it at a real
-- cluster with OSARA_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 and drop the timer.
local osara = require "osara"
local kafka = osara.kafka { ["group.id"] = "demo" }

kafka:handle("topic_x", { codec = "raw" }, function(msg)
  print(("Got %s"):format(msg.value))
end)

-- demo input: three messages, then nothing (`tap.start().wait()` is `osara run`)
local topic_x = kafka:topic("topic_x", { codec = "raw" })
local sent = 0
osara.every(0.2, function()
  if sent < 3 then
    sent = sent + 1
    topic_x:send("hello " .. sent)
  end
end)
