-- panini's "validators" example: messages are validated before the
-- listener runs; invalid ones take the bad-input path.
local osara = require "osara"

local nats = osara.nats {}

local SubTest = osara.schema { subkey1 = "string", subkey2 = "integer" }
local Test = osara.schema {
  key1 = "string", key2 = "integer", key3 = "number",
  key4 = osara.array "any", key5 = osara.map "any", key6 = SubTest,
  key7 = osara.nullable "integer",
  key8 = osara.field(osara.nullable "integer", { default = require("cjson").null }),
}

local msg = { key1 = "value1", key2 = 2, key3 = 3.0, key4 = { 1, 2, 3, 4 },
              key5 = { ["1"] = 1, ["2"] = 2 }, key6 = { subkey1 = "1", subkey2 = 2 },
              key7 = require("cjson").null }

osara.spawn(function()
  for _ = 1, 3 do nats:publish("some.publish.subject", msg) end
  nats:publish("some.publish.subject", { key1 = 1 })          -- invalid: logged, not handled
end)

local got = 0
nats:handle("some.publish.subject", { schema = Test }, function(m)
  got = got + 1
  osara.log.warn("got valid message %d: %s", got, m.value.key1)
end)
