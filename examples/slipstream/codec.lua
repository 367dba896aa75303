-- slipstream's Codec: JsonCodec on a topic, and a custom codec (ICodec) such
-- as its AvroCodec.
--
--   topic = Topic('emoji', {...}, codec=JsonCodec())
--   await topic(key='fish', value={'msg': '🐟'})
--   async for msg in topic: print(msg.value)          -> {'msg': '🐟'}
--
-- JSON is osara's default codec. A custom codec is any table with
-- encode(value) -> bytes and decode(bytes) -> value; Avro is built in
-- (osara.codec.avro(schema_json), libavro) so AvroCodec is one line.
local osara = require "osara"
local codec = require "osara.codec"
local cjson = require "cjson"
local kafka = osara.kafka { ["group.id"] = "demo" }

local Emoji = codec.avro [[{"type": "record", "name": "Emoji", "fields": [{"name": "msg", "type": "string"}]}]]
local Upper = {                                  -- an ICodec of our own
  encode = function(v) return (v:upper()) end,
  decode = function(bytes) return bytes:lower() end,
}

local emoji = kafka:topic("emoji")               -- { codec = "json" } is the default
local avro = kafka:topic("emoji.avro", { codec = Emoji })
local shout = kafka:topic("shout", { codec = Upper })
local streams = { kafka:stream("emoji"), kafka:stream("emoji.avro", { codec = Emoji }),
                  kafka:stream("shout", { codec = Upper }) }

osara.spawn(function()
  emoji:send({ msg = "🐟" }, { key = "fish" }):wait()
  avro:send({ msg = "🐟" }, { key = "fish" }):wait()
  shout:send("fish", { key = "fish" }):wait()
  for i, stream in ipairs(streams) do
    local msg = stream()
    print(i, type(msg.value) == "table" and cjson.encode(msg.value) or msg.value)
    stream:close()
  end
end)
