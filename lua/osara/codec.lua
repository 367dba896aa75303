-- osara.codec: bytes <-> values. Minimal registry (json, raw, string);
-- the schema/codec work extends it (msgpack, avro, custom codecs).
-- A codec never raises on bad input: decode/encode return nil, "why".
local cjson = require "cjson"
local codec_c = require "osara.codec_c"

local M = {}
local registry = {}

local json = cjson.new()
json.decode_max_depth(128)
json.encode_max_depth(128)
json.encode_sparse_array(true)

registry.json = {
  name = "json",
  decode = function(bytes)
    -- cjson does not check UTF-8; reject it here rather than pass it on.
    local valid, at = codec_c.utf8_valid(bytes)
    if not valid then
      return nil, ("json: invalid UTF-8 at byte %d"):format(at)
    end
    local ok, v = pcall(json.decode, bytes)
    if not ok then
      return nil, "json: " .. tostring(v)
    end
    return v
  end,
  encode = function(v)
    local ok, s = pcall(json.encode, v)
    if not ok then
      return nil, "json: " .. tostring(s)
    end
    return s
  end,
}

local function identity_codec(name)
  return {
    name = name,
    decode = function(bytes) return bytes end,
    encode = function(v)
      if type(v) ~= "string" then
        return nil, name .. ": expected a string, got " .. type(v)
      end
      return v
    end,
  }
end
registry.raw = identity_codec("raw")
registry.string = identity_codec("string")

-- msgpack through libmsgpack (host/codec/codec_msgpack.c): measured 5x faster
-- than Debian's pure-Lua lua-messagepack (bench/RESULTS.md).
local function msgpack_codec()
  local mp = require "osara.msgpack_c"
  return { name = "msgpack", decode = mp.decode, encode = mp.encode }
end

-- codec.avro(schema_json) -> codec: binary Avro (libavro) for that schema.
function M.avro(schema_json)
  local avro = require "osara.avro_c"
  local s, err = avro.schema(schema_json)
  if not s then error(err, 2) end
  return {
    name = "avro", _osara_codec = true,
    decode = function(bytes) return avro.decode(s, bytes) end,
    encode = function(v) return avro.encode(s, v) end,
  }
end

function M.register(name, c)
  registry[name] = M.get(c)
  registry[name].name = name
end

-- get(name | {encode=, decode=}) -> codec; raises on an unknown name (a
-- configuration error, reported at load with the script's file:line).
function M.get(c)
  if c == nil then
    return registry.json
  end
  if type(c) == "string" then
    if c == "msgpack" and not registry.msgpack then
      registry.msgpack = msgpack_codec()
    end
    local found = registry[c]
    if not found then
      error(("unknown codec '%s'"):format(c), 3)
    end
    return found
  end
  if type(c) == "table" and c.avro then
    return M.avro(c.avro)
  end
  if type(c) == "table" and type(c.decode) == "function" and type(c.encode) == "function" then
    if c._osara_codec then
      return c
    end
    local user = c
    return {
      _osara_codec = true,
      name = user.name or "custom",
      decode = function(bytes)
        local ok, v, err = pcall(user.decode, bytes)
        if not ok then return nil, "codec: " .. tostring(v) end
        if v == nil and err then return nil, tostring(err) end
        return v
      end,
      encode = function(v)
        local ok, s, err = pcall(user.encode, v)
        if not ok then return nil, "codec: " .. tostring(s) end
        if s == nil and err then return nil, tostring(err) end
        return s
      end,
    }
  end
  error("codec must be a name or a table with encode and decode functions", 3)
end

return M
