-- targets.lua: one function per fuzz target (spec/fuzz/fuzz.c calls the one
-- its executable was built for with the fuzzer's bytes). A target returns
-- normally for any input; raising is a finding, as is any crash below it.
-- The contract: bad input gives nil, err (or false, reason, err from the
-- dispatch path), never an error and never a value that cannot be encoded
-- back.
local osara = require "osara"
local codec = require "osara.codec"
local dispatch = require "osara.dispatch"

local function check(cond, what)
  if not cond then error(what, 2) end
end

-- The handler path a Kafka/NATS message takes: codec, then schema.
local Order = osara.schema {
  id = "integer",
  user = osara.string { min_len = 1, max_len = 64, pattern = "^%w+$" },
  amount = osara.number { min = 0 },
  status = osara.enum { "NEW", "PAID" },
  tags = osara.array "string",
  attrs = osara.map "number",
  note = osara.optional "string",
  address = { street = "string", zip = osara.nullable "string" },
}
local function handler_path(codec_name)
  local h = dispatch.handler { kind = "fuzz", name = codec_name, codec = codec_name,
                               schema = Order, fn = function() end }
  local enc = codec.get(codec_name)
  return function(bytes)
    local msg = { raw = bytes }
    local ok, reason, err = h:decode(msg)
    if ok then
      local again = enc.encode(msg.value)
      check(type(again) == "string", "a validated value did not encode back")
      local msg2 = { raw = again }
      check(h:decode(msg2), "a value encoded from a valid one did not validate")
    else
      check(reason == "decode" or reason == "schema", "unknown failure kind " .. tostring(reason))
      check(type(err) == "string", "failure without a message")
    end
  end
end

local M = {}

M.json = handler_path("json")
M.msgpack = handler_path("msgpack")

-- Any value msgpack decodes must encode again (the schema aside).
function M.msgpack_any(bytes)
  local c = codec.get("msgpack")
  local v, err = c.decode(bytes)
  if v == nil then
    check(err == nil or type(err) == "string", "bad error")
    return
  end
  check(type(c.encode(v)) == "string", "a decoded value did not encode back")
end

local ORDER_AVRO = [[{
  "type": "record", "name": "Order", "fields": [
    {"name": "id", "type": "long"},
    {"name": "user", "type": "string"},
    {"name": "amount", "type": "double"},
    {"name": "note", "type": ["null", "string"]},
    {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["NEW", "PAID"]}},
    {"name": "tags", "type": {"type": "array", "items": "string"}},
    {"name": "attrs", "type": {"type": "map", "values": "long"}},
    {"name": "address", "type": {"type": "record", "name": "Address", "fields": [
      {"name": "zip", "type": "string"}, {"name": "raw", "type": "bytes"},
      {"name": "code", "type": {"type": "fixed", "name": "Code", "size": 4}}]}}
  ]}]]
local order_avro = codec.avro(ORDER_AVRO)

function M.avro_value(bytes)
  local v, err = order_avro.decode(bytes)
  if v == nil then
    check(type(err) == "string", "avro decode failed without a message")
    return
  end
  check(type(order_avro.encode(v)) == "string", "a decoded avro value did not encode back")
end

-- Schemas are user input too (a registry, a config file): declaring one
-- may raise (documented), but never crash, and a schema that compiles must
-- survive decoding arbitrary bytes.
local probes = { "", "\0", "\2\4abcd", ("\255"):rep(12), "\1\2\3\4\5\6\7\8" }
function M.avro_schema(text)
  local ok, c = pcall(codec.avro, text)
  if not ok then
    check(type(c) == "string", "declaration raised a non-string")
    return
  end
  for _, p in ipairs(probes) do
    local v = c.decode(p)
    if v ~= nil then
      c.encode(v)
    end
  end
end

-- The HTTP request path: the server's parser and limits (host/http/http.c,
-- without a socket), then the router with typed parameters, wildcards,
-- schemas and formats (lua/osara/http.lua). Any status is fine; a raise, a
-- status outside 100-599, a body that is not a string or a table's address
-- in a body is a finding.
local http = require "osara.http"
local http_c = require "osara.http_c"
local LIMITS = { max_header = 2048, max_body = 4096 }
local http_routes
local function capture_routes()
  local prev = http._capture { capturing = true }
  local Item = osara.schema { name = "string", qty = osara.integer { min = 1 }, tags = osara.optional(osara.array "string") }
  osara.route("GET", "/users/{id:int}", function(_, id) return { id = id } end)
  osara.route("GET", "/n/{x:number}/{name}", function(_, x, name) return { x = x, name = name } end)
  osara.route("GET", "/files/*", function(_, rest) return { rest = rest } end)
  osara.route("GET", "/raw/**", function(_, rest) return rest end, { format = "text" })
  osara.route("POST", "/items", function(req) return 201, { name = req.value.name } end, { schema = Item })
  osara.route("POST", "/echo", function(req) return { data = req:data(), q = req.query } end,
    { format = { "json", "msgpack" } })
  osara.route("GET", "/neg", function() return { x = 1 } end, { format = { "json", "msgpack", "html" } })
  osara.route("GET", "/page", function() return "<p>hi</p>" end, { format = "html" })
  osara.resource("/things/{id}", { get = function(_, id) return { id = id } end,
                                   delete = function() return 204, "" end })
  http_routes = http._capture(prev)
end
capture_routes()

function M.http(bytes)
  local reqs, status, upgrade = http_c.parse(bytes, LIMITS)
  check(type(reqs) == "table", "parse returned no list")
  check(status == nil or status == 400 or status == 413 or status == 431, "refusal " .. tostring(status))
  check(type(upgrade) == "boolean", "upgrade flag")
  local prev = http._capture(http_routes)
  local ok, err = pcall(function()
    for _, req in ipairs(reqs) do
      check(#req.body <= LIMITS.max_body, "a body over max_body was accepted")
      local code, headers, body = http._dispatch(req)
      check(type(code) == "number" and code >= 100 and code <= 599, "status " .. tostring(code))
      check(type(headers) == "table" and type(body) == "string", "response shape")
      -- /echo sends the request's own bytes back: they may say anything
      check(req.path == "/echo" or not body:find("table: 0x", 1, true), "a table's address in a body")
    end
  end)
  http._capture(prev)
  if not ok then error(err, 0) end
end

return M
