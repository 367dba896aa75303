-- slipstream's Conf: defaults merged under every client created after them.
--
--   Conf({'bootstrap_servers': 'localhost:29091', 'group_id': 'default-demo'})
--   topic1 = Topic('emoji', {'bootstrap_servers': 'localhost:29092'})
--   Conf({'security_protocol': 'SASL_SSL', 'sasl_mechanism': 'PLAIN', ...})
--   topic2 = Topic('conf', {'group_id': 'demo'})
--
-- osara uses librdkafka's property names (dots, not underscores). Run it
-- with `osara check examples/slipstream/conf.lua`: check mode connects
-- nothing, so the made-up brokers below are never dialled.
local osara = require "osara"

osara.kafka.defaults { ["bootstrap.servers"] = "localhost:29091", ["group.id"] = "default-demo" }
local topic1 = osara.kafka { ["bootstrap.servers"] = "localhost:29092" }

osara.kafka.defaults {
  ["security.protocol"] = "SASL_SSL", ["sasl.mechanism"] = "PLAIN",
  ["sasl.username"] = "myuser", ["sasl.password"] = "mypass",
}
local topic2 = osara.kafka { ["group.id"] = "demo" }

local SHOWN = { "bootstrap.servers", "group.id", "security.protocol", "sasl.mechanism",
                "sasl.username", "sasl.password" }
local function show(conf)
  local parts = {}
  for _, k in ipairs(SHOWN) do
    if conf[k] then parts[#parts + 1] = ("'%s': '%s'"):format(k, conf[k]) end
  end
  print("{" .. table.concat(parts, ", ") .. "}")
end
show(topic1.conf)
show(topic2.conf)
