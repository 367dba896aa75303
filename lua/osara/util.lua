-- osara.util: small helpers the API modules share.
local M = {}

-- "file:line" of the code `level` frames above the function calling where().
function M.where(level)
  local info = debug.getinfo(level + 1, "Sl")
  if not info then
    return "?"
  end
  return ("%s:%d"):format(info.short_src, info.currentline or 0)
end

-- A stable text of a table's scalar fields (sorted), to compare
-- configurations across reloads.
function M.signature(t)
  local keys = {}
  for k, v in pairs(t) do
    if type(v) ~= "table" and type(v) ~= "function" then keys[#keys + 1] = k end
  end
  table.sort(keys)
  local out = {}
  for i, k in ipairs(keys) do out[i] = k .. "=" .. tostring(t[k]) end
  return table.concat(out, ";")
end

return M
