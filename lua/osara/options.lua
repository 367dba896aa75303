-- osara.options: the one option checker. Every builder of the public API
-- (osara.kafka, kafka:handle, osara.nats, osara.http, osara.store, the
-- schema constructors, ...) checks its options table here, against the
-- builder's entry in osara.option_tables: { name, type, default, doc }.
--
--   local opts = options.check("nats:handle", opts)
--
-- An unknown key raises naming the key, the call and the user's file:line,
-- with the closest valid name; a value of the wrong type raises the same
-- way; absent options get their defaults (in a copy: the caller's table is
-- never changed). The same tables generate the option tables in docs/*.md
-- (options.markdown; spec/unit/options_docs_spec.lua keeps them in step).
local tables = require "osara.option_tables"

local M = { tables = tables.by_call, order = tables.order }

-- Frames of osara's own modules share the chunk-name prefix of this file:
-- "@osara/" when embedded, "@<OSARA_LUA_DIR>/osara/" in development.
local own_prefix = debug.getinfo(1, "S").source:gsub("options%.lua$", "")

-- "file:line" of the innermost frame outside osara's modules: the user's
-- call, however deep in osara the check runs.
function M.user_where()
  for level = 2, 64 do
    local info = debug.getinfo(level, "Sl")
    if not info then break end
    if info.what ~= "C" and info.source:sub(1, #own_prefix) ~= own_prefix then
      return ("%s:%d"):format(info.short_src, info.currentline or 0)
    end
  end
  return "?"
end

-- Raises msg at the user's file:line.
function M.raise(msg)
  error(M.user_where() .. ": " .. msg, 0)
end

-- ---- deprecations -------------------------------------------------------------

local warned = {}

-- Logs one WARN per deprecated spelling and call site.
function M.deprecated(old, new, at)
  at = at or M.user_where()
  local key = old .. "@" .. at
  if warned[key] then return end
  warned[key] = true
  require("osara.log_c").write("warn", ("%s: %s is deprecated, use %s (the old spelling goes in the next release)")
    :format(at, old, new))
end

-- ---- types --------------------------------------------------------------------

local TYPES = {
  string = { "a string", function(v) return type(v) == "string" end },
  number = { "a number", function(v) return type(v) == "number" and v == v end },
  integer = { "an integer", function(v) return type(v) == "number" and v == math.floor(v) end },
  boolean = { "a boolean", function(v) return type(v) == "boolean" end },
  table = { "a table", function(v) return type(v) == "table" end },
  ["function"] = { "a function", function(v) return type(v) == "function" end },
  any = { "any value", function() return true end },
  codec = { "a codec name or an {encode=, decode=} table",
            function(v) return type(v) == "string" or type(v) == "table" end },
  schema = { "an osara.schema", function(v) return type(v) == "table" and type(v.validate) == "function" end },
  list = { "a list", function(v) return type(v) == "table" end },
  topic = { "a kafka:topic() handle or a list of them", function(v) return type(v) == "table" end },
  store = { "an osara.store", function(v) return type(v) == "table" and type(v.begin) == "function" end },
  scalar = { "a string, number or boolean", function(v)
    local t = type(v)
    return t == "string" or t == "number" or t == "boolean"
  end },
}

-- The checker of a type spelled "string" or "string|list".
local checkers = {}
local function checker(spelling)
  local c = checkers[spelling]
  if c then return c end
  local parts, names = {}, {}
  for name in spelling:gmatch("[^|]+") do
    local t = TYPES[name] or error("osara.options: unknown type " .. name)
    parts[#parts + 1] = t[2]
    names[#names + 1] = t[1]
  end
  c = { text = table.concat(names, " or "), ok = function(v)
    for i = 1, #parts do
      if parts[i](v) then return true end
    end
    return false
  end }
  checkers[spelling] = c
  return c
end

-- ---- closest name -----------------------------------------------------------------

local function distance(a, b)
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur = { [0] = i }
    for j = 1, #b do
      local cost = a:byte(i) == b:byte(j) and 0 or 1
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
    end
    prev = cur
  end
  return prev[#b]
end

-- The valid name closest to `name`, when it is close enough to be a typo.
function M.closest(name, names)
  local best, best_d
  for _, n in ipairs(names) do
    local d = distance(name:lower(), n:lower())
    if n:find(name, 1, true) or name:find(n, 1, true) then d = math.min(d, 2) end
    if not best_d or d < best_d then best, best_d = n, d end
  end
  if best and best_d <= math.max(2, math.floor(#name / 3)) then return best end
  return nil
end

-- ---- checking -----------------------------------------------------------------

local function names_of(spec)
  local out = {}
  for _, e in ipairs(spec.list) do
    if not e.hidden then out[#out + 1] = e[1] end
  end
  return out
end

local function unknown(call, spec, key)
  if type(key) ~= "string" then
    M.raise(("unexpected value at [%s] in %s (options are name = value pairs)"):format(tostring(key), call))
  end
  local near = M.closest(key, names_of(spec))
  M.raise(("unknown option '%s' in %s%s"):format(key, call, near and (" (did you mean '%s'?)"):format(near) or ""))
end

local function check_entry(call, e, v)
  if e.unsupported then
    M.raise(("option '%s' in %s is not supported yet: %s"):format(e[1], call, e.unsupported))
  end
  local c = checker(e[2])
  if not c.ok(v) then
    M.raise(("option '%s' in %s must be %s, got %s"):format(e[1], call, c.text,
      type(v) == "string" and ("%q"):format(v) or type(v)))
  end
  if e.values and not e.values[v] then
    local list = {}
    for name in pairs(e.values) do list[#list + 1] = ("'%s'"):format(name) end
    table.sort(list)
    M.raise(("option '%s' in %s must be one of %s, got %q"):format(e[1], call, table.concat(list, ", "), tostring(v)))
  end
end

-- check(call, opts) -> a copy of opts with defaults applied. Raises at the
-- user's file:line on misuse. opts may be nil (all defaults).
function M.check(call, opts)
  local spec = tables.by_call[call] or error("osara.options: no option table for " .. call)
  if opts ~= nil and type(opts) ~= "table" then
    M.raise(("%s: options must be a table, got %s"):format(call, type(opts)))
  end
  local out = {}
  for k, v in pairs(opts or {}) do
    local e = spec.by_name[k]
    if e then
      check_entry(call, e, v)
      if e.renamed then
        M.deprecated(("option '%s' in %s"):format(k, call), ("'%s'"):format(e.renamed))
        k = e.renamed
      end
      out[k] = v
    elseif spec.passthrough and spec.passthrough(k) then
      local c = checker(spec.passthrough_type or "any")
      if not c.ok(v) then
        M.raise(("option '%s' in %s must be %s, got %s"):format(k, call, c.text, type(v)))
      end
      out[k] = v
    else
      unknown(call, spec, k)
    end
  end
  for _, e in ipairs(spec.list) do
    local name = e[1]
    if out[name] == nil then
      if e.required then M.raise(("%s: option '%s' is required"):format(call, name)) end
      if e[3] ~= nil and spec.keep_defaults ~= false then out[name] = e[3] end
    end
  end
  return out
end

-- ---- docs ---------------------------------------------------------------------

local function shown_default(e)
  if e.shown then return e.shown end
  if e.required then return "required" end
  if e[3] == nil then return "" end
  if type(e[3]) == "string" then return ("`%q`"):format(e[3]) end
  return ("`%s`"):format(tostring(e[3]))
end

-- markdown(call) -> the option table of one builder, as docs/*.md show it.
function M.markdown(call)
  local spec = tables.by_call[call] or error("osara.options: no option table for " .. call)
  local rows = { "| option | type | default | meaning |", "|---|---|---|---|" }
  for _, e in ipairs(spec.list) do
    if not e.hidden then
      local doc = e[4]
      if e.unsupported then doc = "**not supported yet**: " .. e.unsupported end
      if e.renamed then doc = ("deprecated spelling of `%s`"):format(e.renamed) end
      rows[#rows + 1] = ("| `%s` | %s | %s | %s |"):format(e[1], e[2]:gsub("|", " or "), shown_default(e), doc)
    end
  end
  return table.concat(rows, "\n")
end

-- summary(calls) -> a table of several builders and the names they take.
function M.summary(calls)
  local rows = { "| call | options |", "|---|---|" }
  for _, call in ipairs(calls) do
    local spec = M.tables[call] or error("osara.options: no option table for " .. call)
    local names = {}
    for _, e in ipairs(spec.list) do
      if not e.hidden then names[#names + 1] = "`" .. e[1] .. "`" end
    end
    rows[#rows + 1] = ("| `%s` | %s |"):format(call, table.concat(names, ", "))
  end
  return table.concat(rows, "\n")
end

-- Rewrites every generated block of `text` with the current tables:
--   <!-- options: CALL --> ... <!-- end options -->          one builder
--   <!-- option names: CALL CALL ... --> ... <!-- end options -->   a summary
-- Returns the new text and the calls it documents.
function M.render_docs(text)
  local seen = {}
  local out = text:gsub("(<!%-%- option([^\n]-) %-%->\n)(.-)(<!%-%- end options %-%->)", function(open, head, _, close)
    local one = head:match("^s: (%S+)$")
    if one then
      seen[#seen + 1] = one
      return open .. M.markdown(one) .. "\n" .. close
    end
    local calls = {}
    for call in (head:match("^ names: (.+)$") or error("osara.options: bad docs marker: " .. open)):gmatch("%S+") do
      calls[#calls + 1] = call
      seen[#seen + 1] = call
    end
    return open .. M.summary(calls) .. "\n" .. close
  end)
  return out, seen
end

return M
