-- slipstream's Topic: produce two keyed messages, then iterate the topic.
--
--   topic = Topic('emoji', {..., 'auto_offset_reset': 'earliest', 'group_id': 'demo'})
--   await topic(key='trophy', value='🏆'); await topic(key='fish', value='🐟')
--   async for msg in topic: print(msg.key, msg.value)
--
-- Prints "trophy 🏆" and "fish 🐟". osara reads from the earliest offset by
-- default; both go to one partition here so they print in order.
local osara = require "osara"
local kafka = osara.kafka { ["group.id"] = "demo", ["osara.partitions"] = 1 }

local emoji = kafka:topic("emoji", { codec = "raw" })
local stream = kafka:stream("emoji", { codec = "raw" })

osara.spawn(function()
  emoji:send("🏆", { key = "trophy" }):wait()
  emoji:send("🐟", { key = "fish" }):wait()
  for msg in stream do
    print(msg.key, msg.value)
  end
end)
