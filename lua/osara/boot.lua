-- osara.boot: prepares a fresh VM for a user script.
--
-- Wires `require` so user modules resolve in the script's folder (and are
-- watched for --watch), makes globals strict (assigning an undeclared
-- global is an error naming file:line, since globals would otherwise leak
-- across reloads), and loads the script. `osara check` prints what the
-- script registered.
local vm = require "osara.vm_c"

local M = {}
local paths = vm.paths()
local mode = vm.mode()
local script_dir = paths.script_dir

-- The chunk sources of the user's own files: strict globals apply to them.
local user_sources = {}
local function track(file)
  user_sources["@" .. file] = true
  vm.track(file)
end

-- Finds user modules in the script folder first and records their files.
local function user_loader(name)
  local file = package.searchpath(name, script_dir .. "/?.lua;" .. script_dir .. "/?/init.lua")
  if not file then
    return "\n\tno file '" .. name .. "' in the script folder " .. script_dir
  end
  local chunk, err = loadfile(file, "t")
  if not chunk then
    error(err, 0)
  end
  track(file)
  return chunk
end
table.insert(package.loaders, 2, user_loader)

-- Only the user's files (and chunks they load from strings) are strict: a
-- module found on the system path, or a C module registering itself with
-- luaL_register, may set a global when required (lua-yaml sets `yaml` for
-- lyaml), which is its documented interface, not a leak of the user's.
local function strict_globals()
  setmetatable(_G, {
    __newindex = function(g, name, value)
      local source = debug.getinfo(2, "S").source
      if source == "=[C]" or (source:sub(1, 1) == "@" and not user_sources[source]) then
        rawset(g, name, value)
        return
      end
      error(("assignment to undeclared global '%s' (declare it local, or use "
        .. "rawset(_G, name, value) on purpose)"):format(tostring(name)), 2)
    end,
  })
end

local function pad(s, n)
  s = tostring(s)
  return s .. string.rep(" ", n - #s)
end

-- Prints the registrations and schemas as a table (osara check).
function M.report(path)
  local rows = vm.registered()
  local w = { 4, 3, 5 }
  for _, r in ipairs(rows) do
    w[1] = math.max(w[1], #r.kind)
    w[2] = math.max(w[2], #r.key)
    w[3] = math.max(w[3], #r.where)
  end
  local out = { ("%s: ok, %d registration(s)"):format(path, #rows) }
  if #rows > 0 then
    out[#out + 1] = pad("KIND", w[1] + 2) .. pad("KEY", w[2] + 2) .. pad("WHERE", w[3] + 2) .. "DETAIL"
    for _, r in ipairs(rows) do
      out[#out + 1] = pad(r.kind, w[1] + 2) .. pad(r.key, w[2] + 2) .. pad(r.where, w[3] + 2) .. r.detail
    end
  end
  local schema = package.loaded["osara.schema"]
  local schemas = schema and schema._declared
  if schemas and #schemas > 0 then
    for _, s in ipairs(schemas) do
      out[#out + 1] = ""
      out[#out + 1] = ("schema %s (%s)"):format(s.name or "?", s.where or "?")
      out[#out + 1] = schema.describe(s.schema)
    end
  end
  io.stdout:write(table.concat(out, "\n"), "\n")
  io.stdout:flush()
end

-- Loads and runs the script's main chunk (C applies the time limit).
function M.load_script(path)
  track(path)
  local chunk, err = loadfile(path, "t")
  if not chunk then
    if tostring(err):find("wrong mode", 1, true) then
      err = path .. ": not a Lua script (binary data)"
    end
    error(err, 0)
  end
  if mode ~= "test" then
    strict_globals()
  end
  chunk()
  local docs = mode == "check" and os.getenv("OSARA_DOCS") -- osara docs SCRIPT --asyncapi
  if docs then
    io.stdout:write(require("osara.docs").encode(docs), "\n")
    io.stdout:flush()
  elseif mode == "check" then
    M.report(path)
  end
end

return M
