local osara = require "osara"
local codec = require "osara.codec"
local cjson = require "cjson"

local function paths(errs)
  local out = {}
  for i, e in ipairs(errs) do out[i] = e.path .. ": " .. e.message end
  table.sort(out)
  return out
end

-- Address space of this process: decoders must not reserve memory on the
-- word of a garbage length prefix.
local function vm_data_kb()
  for line in io.lines("/proc/self/status") do
    local kb = line:match("^VmData:%s+(%d+)")
    if kb then return tonumber(kb) end
  end
end

describe("osara.schema", function()
  local Order = osara.schema {
    id = "integer", user = "string",
    amount = osara.number { min = 0, max = 1000 },
    tags = osara.array "string",
    note = osara.optional "string",
    status = osara.field("string", { default = "new", enum = { "new", "paid" } }),
    address = { street = "string", zip = osara.string { pattern = "^%d%d%d%d%d$" } },
    meta = osara.map "number",
    extra = osara.nullable "integer",
    code = osara.string { min_len = 2, max_len = 4, check = function(v) return v ~= "XX", "XX is reserved" end },
  }
  local function good()
    return { id = 1, user = "ann", amount = 5, tags = { "a", "b" }, address = { street = "x", zip = "12345" },
             meta = { a = 1 }, extra = cjson.null, code = "AB" }
  end

  it("accepts a valid value and applies defaults", function()
    local v = assert(Order:validate(good()))
    assert.are.equal("new", v.status)
  end)

  it("reports every error with a path, not just the first", function()
    local v = good()
    v.id = 1.5
    v.user = 3
    v.amount = -1
    v.tags[2] = 7
    v.address.zip = 12345
    v.meta.b = "x"
    v.extra = "y"
    v.status = "lost"
    v.code = "XX"
    local ok, errs = Order:validate(v)
    assert.is_nil(ok)
    assert.are.same({
      "/address/zip: expected string, got integer",
      "/amount: must be >= 0, got -1",
      "/code: XX is reserved",
      "/extra: expected integer, got string",
      "/id: expected integer, got number",
      "/meta/b: expected number, got string",
      "/status: expected one of new, paid, got lost",
      "/tags/2: expected string, got integer",
      "/user: expected string, got integer",
    }, paths(errs))
    assert.matches("/id: expected integer", errs.text)
  end)

  it("requires fields that are not optional, rejects null unless nullable", function()
    local v = good()
    v.user = nil
    v.id = cjson.null
    local _, errs = Order:validate(v)
    assert.are.same({ "/id: must not be null", "/user: required" }, paths(errs))
  end)

  it("checks lengths and patterns", function()
    local v = good()
    v.code = "ABCDE"
    v.address.zip = "12a45"
    local _, errs = Order:validate(v)
    assert.are.same({ "/address/zip: does not match pattern ^%d%d%d%d%d$",
                      "/code: length must be <= 4, got 5" }, paths(errs))
  end)

  it("deep-copies table defaults", function()
    local S = osara.schema { tags = osara.field(osara.array "string", { default = { "x" } }) }
    local a = assert(S:validate({}))
    local b = assert(S:validate({}))
    a.tags[1] = "changed"
    assert.are.equal("x", b.tags[1])
  end)

  it("handles unknown fields: allow, strip, reject", function()
    local allow = osara.schema { a = "integer" }
    local strip = osara.schema({ a = "integer" }, { unknown = "strip" })
    local reject = osara.schema({ a = "integer" }, { unknown = "reject" })
    assert.are.equal(2, assert(allow:validate({ a = 1, b = 2 })).b)
    assert.is_nil(assert(strip:validate({ a = 1, b = 2 })).b)
    local _, errs = reject:validate({ a = 1, b = 2 })
    assert.are.same({ "/b: unknown field" }, paths(errs))
  end)

  it("nests schemas and reports nested paths", function()
    local Address = osara.schema { zip = "string" }
    local Person = osara.schema { home = Address, friends = osara.array(Address) }
    local _, errs = Person:validate({ home = { zip = 1 }, friends = { { zip = "1" }, { zip = false } } })
    assert.are.same({ "/friends/2/zip: expected string, got boolean", "/home/zip: expected string, got integer" }, paths(errs))
  end)

  it("caps the number of errors", function()
    local S = osara.schema { xs = osara.array "string" }
    local xs = {}
    for i = 1, 100 do xs[i] = i end
    local _, errs = S:validate({ xs = xs })
    assert.are.equal(20, #errs)
    assert.matches("more errors not shown", errs.text)
  end)

  it("rejects an unknown type name at declaration", function()
    assert.has_error(function() osara.schema { a = "strng" } end)
  end)

  it("describes its fields", function()
    local text = require("osara.schema").describe(Order)
    assert.matches("amount: number, min 0, max 1000", text)
    assert.matches("zip: string, pattern", text)
  end)
end)

describe("codecs", function()
  it("round-trip json, msgpack, raw and string", function()
    local v = { a = 1, b = { "x", "y" }, c = true }
    for _, name in ipairs { "json", "msgpack" } do
      local c = codec.get(name)
      local back = assert(c.decode(assert(c.encode(v))))
      assert.are.same(v, back)
    end
    local bin = "\0\1\2\255binary"
    assert.are.equal(bin, codec.get("raw").decode(codec.get("raw").encode(bin)))
    assert.are.equal("text", codec.get("string").decode("text"))
  end)

  it("returns nil, err on bad input instead of raising", function()
    local v, err = codec.get("json").decode("{not json")
    assert.is_nil(v)
    assert.matches("^json:", err)
    v, err = codec.get("json").decode(string.rep("[", 1000))
    assert.is_nil(v)
    assert.matches("too many nested", err)
    v, err = codec.get("json").decode('{"a":"\255\254"}')
    assert.is_nil(v)
    assert.are.equal("json: invalid UTF-8 at byte 7", err)
    assert.is_truthy(codec.get("json").decode('{"a":"héllo ✓"}'))
    v, err = codec.get("msgpack").decode("\193")
    assert.is_nil(v)
    assert.matches("^msgpack:", err)
  end)

  it("wraps custom codecs and catches their errors", function()
    local c = codec.get { encode = function(v) return "<" .. v .. ">" end,
                          decode = function(s) if s == "bad" then error("nope") end return s:sub(2, -2) end }
    assert.are.equal("<x>", c.encode("x"))
    assert.are.equal("x", c.decode("<x>"))
    local v, err = c.decode("bad")
    assert.is_nil(v)
    assert.matches("nope", err)
  end)

  it("survives random bytes in every decoder (bounded fuzz)", function()
    local deadline = osara.monotonic() + 1
    local n = 0
    while osara.monotonic() < deadline do
      local len = math.random(0, 64)
      local bytes = {}
      for i = 1, len do bytes[i] = string.char(math.random(0, 255)) end
      local s = table.concat(bytes)
      for _, name in ipairs { "json", "msgpack", "raw", "string" } do
        local ok = pcall(codec.get(name).decode, s)
        assert.is_true(ok)
      end
      n = n + 1
    end
    assert.is_true(n > 100)
  end)
end)

describe("msgpack codec (libmsgpack)", function()
  local cjson = require "cjson"
  local mp = codec.get("msgpack")

  it("round-trips numbers, strings, arrays, maps, booleans and null", function()
    local v = { n = -42, big = 2 ^ 40, f = 1.5, s = "héllo\0bin", list = { 1, "two", { 3 } },
                map = { [1] = "x", [3] = "y" }, yes = true, no = false, none = cjson.null, empty = {} }
    local back = assert(mp.decode(assert(mp.encode(v))))
    assert.are.same(v, back)
    assert.are.equal(cjson.null, back.none)
    assert.are.equal("\147\1\2\3", mp.encode({ 1, 2, 3 })) -- fixarray, fixints
  end)

  it("refuses what it cannot encode and what is not msgpack", function()
    local v, err = mp.encode({ f = print })
    assert.is_nil(v)
    assert.matches("^msgpack: cannot encode a function", err)
    local t = {}
    t.self = t
    assert.matches("too deeply nested", select(2, mp.encode(t)))
    assert.matches("trailing bytes", select(2, mp.decode("\1\2")))
    assert.matches("truncated", select(2, mp.decode("\146\1")))
    assert.matches("truncated", select(2, mp.decode(string.rep("\145", 200) .. "\1")))
  end)

  it("rejects a huge count before allocating anything", function()
    local before = vm_data_kb()
    for _ = 1, 100 do
      assert.is_nil((mp.decode("\221\255\255\255\255\1")))   -- array32 of 4 G elements
      assert.is_nil((mp.decode("\219\127\255\255\255abc")))   -- str32 of 2 GiB
    end
    assert.is_true(vm_data_kb() - before < 64 * 1024, "address space grew")
  end)
end)

describe("avro codec", function()
  local cjson = require "cjson"
  local SCHEMA = [[{
    "type": "record", "name": "Order", "fields": [
      {"name": "id", "type": "long"},
      {"name": "user", "type": "string"},
      {"name": "amount", "type": "double"},
      {"name": "note", "type": ["null", "string"]},
      {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["NEW", "PAID"]}},
      {"name": "tags", "type": {"type": "array", "items": "string"}},
      {"name": "attrs", "type": {"type": "map", "values": "long"}},
      {"name": "address", "type": {"type": "record", "name": "Address", "fields": [
        {"name": "zip", "type": "string"}, {"name": "raw", "type": "bytes"}]}}
    ]}]]

  it("round-trips a record with a nested record, a union, an enum, arrays and maps", function()
    local c = codec.get { avro = SCHEMA }
    local v = { id = 7, user = "ann", amount = 12.5, note = "hi", status = "PAID",
                tags = { "a", "b" }, attrs = { x = 1 }, address = { zip = "12345", raw = "\0\1\255" } }
    local bytes = assert(c.encode(v))
    assert.are.same(v, assert(c.decode(bytes)))
    v.note = cjson.null
    local back = assert(c.decode(assert(c.encode(v))))
    assert.are.equal(cjson.null, back.note)
  end)

  it("returns nil, err for values that do not fit and for bad bytes", function()
    local c = codec.get { avro = SCHEMA }
    local v, err = c.encode({ id = "x" })
    assert.is_nil(v)
    assert.matches("^avro: field id: expected an integer", err)
    v, err = c.encode({ id = 1, user = "u", amount = 1, note = 5, status = "NEW", tags = {}, attrs = {}, address = { zip = "", raw = "" } })
    assert.matches("no union branch", err)
    v, err = c.encode({ id = 1, user = "u", amount = 1, status = "LOST", tags = {}, attrs = {}, address = { zip = "", raw = "" } })
    assert.matches("not a symbol of the enum: LOST", err)
    assert.is_nil((c.decode("\255\255\255\255\255\255\255\255\255\255")))
  end)

  it("rejects an invalid schema at declaration", function()
    assert.has_error(function() codec.avro('{"type": "nope"}') end)
  end)

  -- gh_13: libavro memsets a fixed's size unchecked and recurses forever on
  -- a record that holds itself; both crashed the host at declaration
  -- gh_13 (found by the avro_value fuzz target): a long past 2^63 as a
  -- double was converted to int64 unchecked (undefined behaviour), and
  -- longs past 2^53 lost digits silently
  it("keeps longs past 2^53 exact as strings and refuses out-of-range integers", function()
    local c = codec.avro('{"type":"record","name":"R","fields":[{"name":"n","type":"long"},{"name":"i","type":"int"}]}')
    local v = c.decode(assert(c.encode { n = "9223372036854775807", i = 1 }))
    assert.are.same({ "9223372036854775807", 1 }, { v.n, v.i })
    assert.are.equal(2 ^ 53, c.decode(assert(c.encode { n = 2 ^ 53, i = 0 })).n)
    assert.matches("integer out of range for long", select(2, c.encode { n = 2 ^ 63, i = 1 }))
    assert.matches("integer out of range for int", select(2, c.encode { n = 1, i = 2 ^ 31 }))
    assert.matches("expected an integer, got the string '12x'", select(2, c.encode { n = "12x", i = 1 }))
  end)

  it("rejects a fixed of negative or huge size at declaration", function()
    for _, size in ipairs { -1, 16 * 1024 * 1024 + 1 } do
      local ok, err = pcall(codec.avro, ('{"type":"fixed","name":"F","size":%d}'):format(size))
      assert.is_false(ok)
      assert.matches("fixed 'F' needs a size from 0 to 16777216", err)
    end
  end)

  it("rejects a recursive type, naming it (libavro crashes or leaks on them)", function()
    for name, s in pairs {
      R = '{"type":"record","name":"R","fields":[{"name":"r","type":"R"}]}',
      A = '{"type":"record","name":"A","fields":[{"name":"x","type":{"type":"record","name":"B","fields":[{"name":"a","type":"A"}]}}]}',
      Node = '{"type":"record","name":"Node","fields":[{"name":"v","type":"int"},{"name":"next","type":["null","Node"]}]}',
    } do
      local ok, err = pcall(codec.avro, s)
      assert.is_false(ok)
      assert.matches("type '" .. name .. "' refers to itself: recursive types are not supported", err, 1, true)
    end
  end)

  -- libavro allocates a string from its length prefix before reading it and
  -- leaks it on failure; the host checks lengths first, so address space stays flat

  it("survives random bytes without growing the address space (bounded fuzz)", function()
    local c = codec.get { avro = SCHEMA }
    local before = vm_data_kb()
    local deadline = osara.monotonic() + 1
    while osara.monotonic() < deadline do
      local b = {}
      for i = 1, math.random(0, 64) do b[i] = string.char(math.random(0, 255)) end
      assert.is_true((pcall(c.decode, table.concat(b))))
    end
    assert.is_true(vm_data_kb() - before < 64 * 1024, "address space grew while decoding garbage")
  end)

  it("rejects a length prefix longer than the data before allocating", function()
    local c = codec.get { avro = SCHEMA }
    -- id=1, then a user string claiming 2^40 bytes
    local v, err = c.decode("\2\128\128\128\128\128\128\2abc")
    assert.is_nil(v)
    assert.matches("truncated or malformed", err)
  end)
end)

describe("osara.schema lax mode (coerce = true)", function()
  local Lax = osara.schema({
    n = "integer", x = "number", ok = "boolean", name = "string",
    items = osara.array "integer", inner = { count = "integer" },
  }, { coerce = true })

  it("turns strings that spell a value into that value", function()
    local v = assert(Lax:validate { n = "5", x = " 2.5 ", ok = "true", name = "ann",
                                    items = { "1", 2 }, inner = { count = "7" } })
    assert.are.same({ 5, 2.5, true, 1, 2, 7 }, { v.n, v.x, v.ok, v.items[1], v.items[2], v.inner.count })
    assert.are.equal(false, assert(Lax:validate { n = 1, x = 1, ok = "no", name = "a", items = {}, inner = { count = 1 } }).ok)
  end)

  it("keeps the usual error paths when a string cannot be converted", function()
    local v, errs = Lax:validate { n = "5.5", x = "abc", ok = "maybe", name = 5, items = { "x" }, inner = { count = "1e400" } }
    assert.is_nil(v)
    assert.are.same({ "/inner/count: expected integer, got string", "/items/1: expected integer, got string",
                      "/n: expected integer, got string", "/name: expected string, got integer",
                      "/ok: expected boolean, got string", "/x: expected number, got string" }, paths(errs))
  end)

  it("is off by default: a strict schema refuses \"5\"", function()
    local _, errs = osara.schema({ n = "integer" }):validate { n = "5" }
    assert.are.same({ "/n: expected integer, got string" }, paths(errs))
  end)
end)

describe("schema:methods", function()
  local Order = osara.schema({ price = "number", qty = "integer" }):methods {
    total = function(self) return self.price * self.qty end,
  }

  it("gives validated values the methods, and encoding sees only the fields", function()
    local v = assert(Order:validate { price = 2.5, qty = 4 })
    assert.are.equal(10, v:total())
    assert.are.same({ price = 2.5, qty = 4 }, cjson.decode(cjson.encode(v)))
    assert.are.same({ price = 2.5, qty = 4 }, codec.get("msgpack").decode(codec.get("msgpack").encode(v)))
  end)

  it("refuses a method named like a field, and a non-function", function()
    local ok, err = pcall(function() osara.schema({ total = "number" }):methods { total = function() end } end)
    assert.is_false(ok)
    assert.matches("schema:methods: 'total' is also a field", err, 1, true)
    assert.has_error(function() osara.schema({ a = "number" }):methods { b = 1 } end)
  end)
end)
