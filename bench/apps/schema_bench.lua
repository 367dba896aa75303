-- Schema validation and codec speed, per message (osara side of the
-- `schema` scenario). Prints "bench: <what> rate=<per second>" lines.
local osara = require "osara"
local codec = require "osara.codec"
local N = tonumber(os.getenv("BENCH_N")) or 200000

local Address = osara.schema { street = "string", city = "string", zip = osara.string { pattern = "^%d+$" } }
local Order = osara.schema {
  id = "integer", user = "string", amount = osara.number { min = 0 }, currency = osara.enum { "EUR", "USD" },
  paid = "boolean", tags = osara.array "string", note = osara.optional "string",
  qty = osara.integer { min = 1 }, sku = osara.string { min_len = 3 }, address = Address,
}
local msg = { id = 1, user = "ann", amount = 12.5, currency = "EUR", paid = true, tags = { "a", "b" },
              qty = 2, sku = "ABC-1", address = { street = "Main 1", city = "X", zip = "12345" } }
local AVRO = [[{"type":"record","name":"O","fields":[{"name":"id","type":"long"},{"name":"user","type":"string"},
  {"name":"amount","type":"double"},{"name":"currency","type":"string"},{"name":"paid","type":"boolean"},
  {"name":"tags","type":{"type":"array","items":"string"}},{"name":"qty","type":"long"},{"name":"sku","type":"string"},
  {"name":"address","type":{"type":"record","name":"A","fields":[{"name":"street","type":"string"},
  {"name":"city","type":"string"},{"name":"zip","type":"string"}]}}]}]]

local function measure(what, fn)
  local t0 = osara.monotonic()
  for _ = 1, N do fn() end
  local secs = osara.monotonic() - t0
  osara.log.info("bench: %s rate=%.0f ns_per_msg=%.0f", what, N / secs, secs / N * 1e9)
end

osara.after(0, function()
  measure("validate", function() assert(Order:validate(msg)) end)
  for _, name in ipairs { "json", "msgpack" } do
    local c = codec.get(name)
    local bytes = c.encode(msg)
    measure(name, function() c.encode(c.decode(bytes)) end)
  end
  local av = codec.avro(AVRO)
  local abytes = assert(av.encode(msg))
  measure("avro", function() av.encode(av.decode(abytes)) end)
  osara._vm.stop(0)
end)
