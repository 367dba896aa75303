-- osara Tap's schema example: a pydantic model attached to a topic.
--
--   @tap.schema("topic_x")
--   class X(BaseModel): msg: str
--   @tap.handler("topic_x")
--   def handle_x(msg): print("Got %s" % msg.model().msg)
--
-- msg.value is the validated model (msg.model()); a message that does not
-- fit never reaches the handler: it is logged, counted in
-- osara_bad_input_total{reason="schema"} and committed (or dead-lettered with
-- opts.dlq, see docs/delivery.md).
local osara = require "osara"
local kafka = osara.kafka { ["group.id"] = "demo" }

local X = osara.schema { msg = "string" }

kafka:handle("topic_x", { schema = X }, function(msg)
  print(("Got %s"):format(msg.value.msg))
end)

-- demo input: one good message and one that violates the schema
local topic_x = kafka:topic("topic_x", { codec = "raw" })
osara.after(0.2, function()
  topic_x:send('{"msg": "hello"}')
  topic_x:send('{"msg": 42}')
end)
