-- osara.config: the script's config.yaml with environment overrides
-- (docs/config.md). Read once per script version: a reload reads it again.
--   osara.config.database.host             -- the data, as a table
--   osara.cache "memcached"                -- constructors take a name from it
-- The file: --config FILE, else $OSARA_CONFIG, else config.yaml beside the
-- script (none there: an empty config). OSARA__A__B=value sets a.b, the
-- value typed as YAML types a scalar.
local yaml_c = require "osara.yaml_c"
local vm_c = require "osara.vm_c"

local M = {}

local loaded -- { data =, file = } once read

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local text = f:read("*a")
  f:close()
  return text
end

-- The file to read, and whether it must exist.
local function config_file()
  local given = os.getenv("OSARA_CONFIG")
  if given and given ~= "" then return given, true end
  local dir = vm_c.paths().script_dir
  return (dir ~= "" and dir or ".") .. "/config.yaml", false
end

-- A key of t matching name case-insensitively (env names are upper case).
local function find_key(t, name)
  if t[name] ~= nil then return name end
  local lower = name:lower()
  for k in pairs(t) do
    if type(k) == "string" and k:lower() == lower then return k end
  end
  return lower
end

-- "5" -> 5, "true" -> true, "[a, b]" -> { "a", "b" }, "" -> "", and
-- anything YAML cannot read stays the string it is.
local function typed(value)
  if value == "" then return "" end
  local v, err = yaml_c.load(value, "env")
  if err then return value end
  return v
end

-- Applies OSARA__A__B=v (sorted, so the result does not depend on the
-- environment's order) to data.
function M.apply_env(data, env)
  local names = {}
  for name in pairs(env) do
    if name:sub(1, 7) == "OSARA__" and #name > 7 then names[#names + 1] = name end
  end
  table.sort(names)
  for _, name in ipairs(names) do
    local t, parts = data, {}
    for part in (name:sub(8) .. "__"):gmatch("(.-)__") do
      if part ~= "" then parts[#parts + 1] = part end
    end
    for i = 1, #parts - 1 do
      local k = find_key(t, parts[i])
      if type(t[k]) ~= "table" then t[k] = {} end
      t = t[k]
    end
    if #parts > 0 then t[find_key(t, parts[#parts])] = typed(env[name]) end
  end
  return data
end

-- load(text, file) -> data: parses and applies the environment. Raises
-- "file:line:column: problem" for a malformed file.
function M.parse(text, file, env)
  local data, err = yaml_c.load(text, file)
  if err then error(err, 0) end
  if data == nil then data = {} end
  if type(data) ~= "table" or data[1] ~= nil then
    local what = type(data) == "table" and "list" or type(data)
    error(("%s:1:1: the top of a config file must be a mapping, got a %s"):format(file, what), 0)
  end
  return M.apply_env(data, env or vm_c.environ("OSARA__"))
end

-- The data of this script version (read on first use).
function M.load()
  if loaded then return loaded.data, loaded.file end
  local file, required = config_file()
  local text, err = read_file(file)
  if not text then
    if required then error(("config: cannot read %s: %s"):format(file, err), 0) end
    text, file = "", nil
  end
  if file then vm_c.track(file) end -- --watch reloads when it changes
  loaded = { data = M.parse(text, file or "config.yaml"), file = file }
  return loaded.data, loaded.file
end

function M.data() return (M.load()) end

-- section("cache", "memcached") -> config.cache.memcached, or raises
-- naming what is missing and where it was looked for.
function M.section(kind, name)
  local data, file = M.load()
  local t = data[kind]
  local v = type(t) == "table" and t[name] or nil
  if type(v) ~= "table" then
    require("osara.options").raise(("osara.%s: no '%s.%s' in %s")
      :format(kind, kind, name, file or "the config (no config.yaml beside the script)"))
  end
  local copy = {}
  for k, x in pairs(v) do copy[k] = x end
  return copy
end

-- resolve(kind, arg): a name (letters, digits, '_', '-') becomes its
-- section; anything else is the constructor's to check. For constructors:
-- osara.kafka "main" == osara.kafka(config.kafka.main).
function M.resolve(kind, arg)
  if type(arg) == "string" and arg:match("^[%w_%-]+$") then return M.section(kind, arg) end
  return arg
end

local function escape(s)
  return (tostring(s):gsub("[^%w%-%._~]", function(c) return ("%%%02X"):format(c:byte()) end))
end

-- database(name) -> url, opts: kata's `database:` section (or
-- databases.<name>, or database.<name>) as a URL osara.sql takes:
--   { url = ... }                              -> url
--   { type = "sqlite", path = ... }            -> sqlite:path
--   { host, port, user, password, name }       -> postgres://user:password@host:port/name
-- opts carries pool_size. nil when the config has no such database.
function M.database(name)
  local data = M.load()
  local d
  if name == nil then
    d = data.database
  else
    d = (type(data.databases) == "table" and data.databases[name])
        or (type(data.database) == "table" and data.database[name]) or nil
  end
  if type(d) ~= "table" then return nil end
  local opts = { pool_size = d.pool_size }
  if d.url then return d.url, opts end
  if d.type == "sqlite" or d.path then return "sqlite:" .. tostring(d.path or d.name or "osara.db"), opts end
  local auth = ""
  if d.user then auth = escape(d.user) .. (d.password and (":" .. escape(d.password)) or "") .. "@" end
  local url = ("postgres://%s%s:%s/%s"):format(auth, d.host or "127.0.0.1", tostring(d.port or 5432),
                                              escape(d.name or d.user or "postgres"))
  return url, opts
end

return M
