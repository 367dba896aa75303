-- osara Tap's "produce, then consume":
--
--   for msg in tap.map_reduce("topic_x", b"hello", topic_filter=["topic_x"]):
--       print(msg)
--       if msg.value == b"hello": break
--
-- kafka:stream(topic) iterates a topic from a coroutine; its offsets are
-- committed as the loop moves on. For request/reply with correlation ids
-- (the usual reason for map_reduce) see kafka:request in docs/kafka.md.
local osara = require "osara"
local kafka = osara.kafka { ["group.id"] = "demo" }

local replies = kafka:stream("topic_x", { codec = "raw" })
local topic_x = kafka:topic("topic_x", { codec = "raw" })

osara.spawn(function()
  topic_x:send("hello")
  for msg in replies do
    print(("%s/%d@%d %s"):format(msg.topic, msg.partition, msg.offset, msg.value))
    if msg.value == "hello" then break end
  end
  replies:close()
  print("map_reduce done")
end)
