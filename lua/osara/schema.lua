-- osara.schema: record schemas compiled once into validators (closures).
--
--   local Order = osara.schema {
--     id = "integer", user = "string",
--     amount = osara.number { min = 0 },
--     tags = osara.array "string",
--     note = osara.optional "string",
--     address = { street = "string", zip = "string" },
--   }
--   local v, errs = Order:validate(value)
--   -- v: the value with defaults applied; errs: { {path=, message=}, ..., text= }
--
-- Types: string, integer, number, boolean, any, array-of, map-of, a nested
-- record (plain table or another schema). Modifiers: optional, nullable,
-- default (deep-copied), enum, min/max, min_len/max_len, pattern (a Lua
-- pattern), check (a function returning true, or false/nil plus a message).
-- Unknown record fields: opts.unknown = "allow" (default) | "strip" | "reject".
-- opts.coerce = true is pydantic's lax mode: "5" -> 5, "true" -> true.
-- schema:methods{ total = fn } gives validated values those methods.
local util = require "osara.util"
local where, signature = util.where, util.signature
local cjson = require "cjson"
local options = require "osara.options"

local M = {}
local MAX_ERRORS = 20
local null = cjson.null

local Schema = {}
Schema.__index = Schema

local SPEC = {} -- marks field specs made by the constructors

local function spec(kind, opts)
  local s = { kind = kind }
  for k, v in pairs(opts or {}) do s[k] = v end
  return setmetatable(s, SPEC)
end

local function is_spec(t) return getmetatable(t) == SPEC end

local SCALARS = { string = true, integer = true, number = true, boolean = true, any = true }

-- Normalises "string" | spec | plain record table | schema to a spec.
local function to_spec(t, where, inherit)
  if type(t) == "string" then
    if not SCALARS[t] then
      options.raise(("schema: unknown type '%s'%s (string, integer, number, boolean, any)"):format(t, where or ""))
    end
    return spec(t)
  end
  if getmetatable(t) == Schema then return spec("record", { schema = t }) end
  if is_spec(t) then return t end
  if type(t) == "table" then return spec("record", { schema = M.new(t, inherit) }) end
  options.raise("schema: a field type must be a type name, a table or a schema, got " .. type(t))
end

-- Constructors: osara.string{...}, osara.array("string", {...}), ...
-- Their options are checked against osara.option_tables ("osara.string", ...).
for name in pairs(SCALARS) do
  if name ~= "any" then
    M[name] = function(opts) return spec(name, options.check("osara." .. name, opts)) end
  end
end
M.any = spec("any")

function M.array(of, opts)
  local s = spec("array", options.check("osara.array", opts))
  s.of = to_spec(of)
  return s
end

function M.map(of, opts)
  local s = spec("map", options.check("osara.map", opts))
  s.of = to_spec(of)
  return s
end

-- A copy of t's spec with the modifier `key` set and opts ({default=}, ...) applied.
local function with(t, key, opts)
  opts = options.check("osara." .. key, opts)
  local c = spec(to_spec(t).kind, to_spec(t))
  for k, v in pairs(opts) do c[k] = v end
  c[key] = true
  return c
end
function M.optional(t, opts) return with(t, "optional", opts) end
function M.nullable(t, opts) return with(t, "nullable", opts) end

function M.enum(values, opts)
  if type(values) ~= "table" or #values == 0 then
    options.raise("osara.enum: expected a non-empty list of values")
  end
  local s = spec("any", options.check("osara.enum", opts))
  s.enum = values
  return s
end

-- field(type, {default=, optional=, ...}): any type with modifiers.
function M.field(t, opts)
  local s = spec(to_spec(t).kind, to_spec(t))
  for k, v in pairs(options.check("osara.field", opts)) do s[k] = v end
  return s
end

local function deep_copy(v)
  if type(v) ~= "table" then return v end
  local c = {}
  for k, x in pairs(v) do c[k] = deep_copy(x) end
  return setmetatable(c, getmetatable(v))
end

local function type_name(v)
  if v == null then return "null" end
  local t = type(v)
  if t == "number" and v == math.floor(v) then return "integer" end
  return t
end

-- ---- compilation -------------------------------------------------------------
-- A checker is check(v, path, errs) -> v' (the value to keep). It appends
-- {path=, message=} to errs on failure.

local function add(errs, path, msg)
  if #errs < MAX_ERRORS then
    errs[#errs + 1] = { path = path == "" and "/" or path, message = msg }
  end
end

local function is_array(t)
  local n = 0
  for k in pairs(t) do
    if type(k) ~= "number" then return false end
    n = n + 1
  end
  return n == #t
end

local compile

-- Lax conversions (pydantic v2's lax mode): only strings that spell a value
-- exactly are converted; anything else keeps failing with the usual error.
local BOOLEAN_WORDS = { ["true"] = true, ["false"] = false, yes = true, no = false,
                        on = true, off = false, ["1"] = true, ["0"] = false }
local function lax_number(v)
  if type(v) ~= "string" then return v end
  local n = v:match("^%s*(.-)%s*$")
  if not n:find("^[-+]?%d*%.?%d+[eE]?[-+]?%d*$") then return v end
  return tonumber(n) or v
end
local COERCE = {
  number = lax_number,
  integer = function(v)
    local n = lax_number(v)
    if type(n) == "number" and n == math.floor(n) and math.abs(n) <= 2 ^ 53 then return n end
    return v
  end,
  boolean = function(v)
    if type(v) == "string" then
      local b = BOOLEAN_WORDS[v:lower()]
      if b ~= nil then return b end
    elseif v == 0 or v == 1 then
      return v == 1
    end
    return v
  end,
}

local function compile_base(s)
  local kind = s.kind
  local lax = s.coerce and COERCE[kind]
  if lax then
    local strict = compile_base(setmetatable({ kind = kind }, SPEC))
    return function(v, path, errs) return strict(lax(v), path, errs) end
  end
  if kind == "string" then
    return function(v, path, errs)
      if type(v) ~= "string" then add(errs, path, "expected string, got " .. type_name(v)) end
      return v
    end
  elseif kind == "integer" then
    return function(v, path, errs)
      if type(v) ~= "number" or v ~= math.floor(v) or v ~= v then
        add(errs, path, "expected integer, got " .. type_name(v))
      end
      return v
    end
  elseif kind == "number" then
    return function(v, path, errs)
      if type(v) ~= "number" or v ~= v then add(errs, path, "expected number, got " .. type_name(v)) end
      return v
    end
  elseif kind == "boolean" then
    return function(v, path, errs)
      if type(v) ~= "boolean" then add(errs, path, "expected boolean, got " .. type_name(v)) end
      return v
    end
  elseif kind == "any" then
    return function(v) return v end
  elseif kind == "array" then
    local item = compile(s.of, s.coerce)
    return function(v, path, errs)
      if type(v) ~= "table" or not is_array(v) then
        add(errs, path, "expected array, got " .. type_name(v))
        return v
      end
      for i = 1, #v do
        v[i] = item(v[i], path .. "/" .. i, errs)
      end
      return v
    end
  elseif kind == "map" then
    local item = compile(s.of, s.coerce)
    return function(v, path, errs)
      if type(v) ~= "table" then
        add(errs, path, "expected object, got " .. type_name(v))
        return v
      end
      for k, x in pairs(v) do
        if type(k) ~= "string" then
          add(errs, path, "expected string keys, got " .. type(k))
        else
          v[k] = item(x, path .. "/" .. k, errs)
        end
      end
      return v
    end
  elseif kind == "record" then
    local sch = s.schema
    return function(v, path, errs) return sch:_check(v, path, errs) end
  end
  error("schema: unknown kind " .. tostring(kind))
end

-- Wraps the base checker with the modifiers that apply to present values.
local function compile_constraints(s, base)
  local min, max, min_len, max_len = s.min, s.max, s.min_len, s.max_len
  local pattern, check, enum = s.pattern, s.check, s.enum
  if not (min or max or min_len or max_len or pattern or check or enum) then
    return base
  end
  local allowed
  if enum then
    allowed = {}
    for _, x in ipairs(enum) do allowed[x] = true end
  end
  return function(v, path, errs)
    local before = #errs
    v = base(v, path, errs)
    if #errs > before then return v end
    if allowed and not allowed[v] then
      local names = {}
      for i, x in ipairs(enum) do names[i] = tostring(x) end
      add(errs, path, ("expected one of %s, got %s"):format(table.concat(names, ", "), tostring(v)))
    end
    if type(v) == "number" then
      if min and v < min then add(errs, path, ("must be >= %s, got %s"):format(min, v)) end
      if max and v > max then add(errs, path, ("must be <= %s, got %s"):format(max, v)) end
    end
    local len = (type(v) == "string" or type(v) == "table") and #v or nil
    if len then
      if min_len and len < min_len then add(errs, path, ("length must be >= %d, got %d"):format(min_len, len)) end
      if max_len and len > max_len then add(errs, path, ("length must be <= %d, got %d"):format(max_len, len)) end
    end
    if pattern and type(v) == "string" and not v:find(pattern) then
      add(errs, path, ("does not match pattern %s"):format(pattern))
    end
    if check then
      local ok, res, msg = pcall(check, v)
      if not ok then add(errs, path, "check failed: " .. tostring(res))
      elseif not res then add(errs, path, msg or "check failed") end
    end
    return v
  end
end

-- Handles absence (nil), null and defaults around the constrained checker.
-- coerce: the schema's lax mode, applied to fields that do not say otherwise.
function compile(s, coerce)
  if coerce and s.coerce == nil and s.kind ~= "record" then
    s = spec(s.kind, s)
    s.coerce = true
  end
  local inner = compile_constraints(s, compile_base(s))
  local optional, nullable, default = s.optional, s.nullable, s.default
  local has_default = default ~= nil
  return function(v, path, errs)
    if v == nil then
      if has_default then return deep_copy(default) end
      if not optional then add(errs, path, "required") end
      return nil
    end
    if v == null then
      if nullable then return v end
      if has_default and default == null then return v end
      add(errs, path, "must not be null")
      return v
    end
    return inner(v, path, errs)
  end
end

-- ---- schemas -----------------------------------------------------------------

local declared = {}
M._declared = declared


-- schema(def [, {name=, unknown=}]) -> schema
function M.new(def, opts)
  if type(def) ~= "table" then
    options.raise("osara.schema: expected a table of fields")
  end
  opts = options.check("osara.schema", opts)
  local unknown, coerce = opts.unknown, opts.coerce
  local inherit = coerce and { coerce = true } or nil
  local fields, names = {}, {}
  for name, t in pairs(def) do
    if type(name) ~= "string" then
      options.raise("osara.schema: field names must be strings")
    end
    names[#names + 1] = name
  end
  table.sort(names)
  for i, name in ipairs(names) do
    local s = to_spec(def[name], (" for field '%s'"):format(name), inherit)
    fields[i] = { name = name, spec = s, check = compile(s, coerce) }
  end
  local known = {}
  for _, f in ipairs(fields) do known[f.name] = true end
  return setmetatable({ name = opts.name, fields_ = fields, known = known, unknown = unknown,
                        coerce = coerce }, Schema)
end

-- schema:methods{ name = function(self, ...) end } -> schema. Values the
-- schema validates answer v:name(...) (pydantic models with methods, Tap's
-- msg.model()). The methods live in a metatable, so encoding the value
-- (JSON, msgpack) still sees only its fields. Fields shadow methods.
function Schema:methods(fns)
  if type(fns) ~= "table" then
    options.raise("schema:methods: expected a table of functions")
  end
  local index = {}
  for name, fn in pairs(fns) do
    if type(name) ~= "string" or type(fn) ~= "function" then
      options.raise(("schema:methods: '%s' must be a function"):format(tostring(name)))
    end
    if self.known[name] then
      options.raise(("schema:methods: '%s' is also a field"):format(name))
    end
    index[name] = fn
  end
  self.value_mt = { __index = index }
  return self
end

function Schema:_check(v, path, errs)
  if type(v) ~= "table" or (next(v) ~= nil and is_array(v) and #v > 0) then
    add(errs, path, "expected object, got " .. (type(v) == "table" and "array" or type_name(v)))
    return v
  end
  for _, f in ipairs(self.fields_) do
    local x = f.check(v[f.name], path .. "/" .. f.name, errs)
    if x ~= nil then v[f.name] = x end
  end
  if self.value_mt and getmetatable(v) == nil then setmetatable(v, self.value_mt) end
  if self.unknown ~= "allow" then
    for k in pairs(v) do
      if not self.known[k] then
        if self.unknown == "strip" then
          v[k] = nil
        else
          add(errs, path .. "/" .. tostring(k), "unknown field")
        end
      end
    end
  end
  return v
end

local function errors_text(errs)
  local parts = {}
  for i, e in ipairs(errs) do parts[i] = e.path .. ": " .. e.message end
  return table.concat(parts, "; ")
end

-- schema:validate(v) -> v (defaults applied, in place) | nil, errs
function Schema:validate(v)
  local errs = {}
  local out = self:_check(v, "", errs)
  if #errs > 0 then
    errs.text = errors_text(errs)
    if #errs == MAX_ERRORS then errs.text = errs.text .. "; (more errors not shown)" end
    return nil, errs
  end
  return out
end

local function describe_spec(s)
  local parts = { s.kind }
  if s.kind == "array" or s.kind == "map" then parts[1] = s.kind .. " of " .. describe_spec(s.of) end
  if s.kind == "record" then parts[1] = "record" end
  for _, k in ipairs { "optional", "nullable" } do
    if s[k] then parts[#parts + 1] = k end
  end
  if s.default ~= nil then parts[#parts + 1] = "default " .. (type(s.default) == "table" and "{...}" or tostring(s.default)) end
  for _, k in ipairs { "min", "max", "min_len", "max_len", "pattern" } do
    if s[k] ~= nil then parts[#parts + 1] = k .. " " .. tostring(s[k]) end
  end
  if s.enum then parts[#parts + 1] = "enum" end
  if s.check then parts[#parts + 1] = "check" end
  return table.concat(parts, ", ")
end

-- schema:fields() -> { {name=, type=}, ... } for printing.
function Schema:fields()
  local out = {}
  for i, f in ipairs(self.fields_) do
    out[i] = { name = f.name, type = describe_spec(f.spec), spec = f.spec }
  end
  return out
end

-- describe(schema) -> multi-line text (osara check).
function M.describe(s, indent)
  indent = indent or "  "
  local lines = {}
  for _, f in ipairs(s:fields()) do
    lines[#lines + 1] = indent .. f.name .. ": " .. f.type
    if f.spec.kind == "record" then
      lines[#lines + 1] = M.describe(f.spec.schema, indent .. "  ")
    end
  end
  return table.concat(lines, "\n")
end

setmetatable(M, {
  __call = function(_, def, opts)
    local s = M.new(def, opts)
    declared[#declared + 1] = { schema = s, name = (opts and opts.name) or ("schema #" .. (#declared + 1)),
                                where = where(2) }
    return s
  end,
})

return M
