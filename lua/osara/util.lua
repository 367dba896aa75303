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

-- A text that changes when a handler's options change (a reload reports
-- the handler as updated): scalars, and tables to a few levels, with sorted
-- keys; functions and userdata count by type only (they are new objects
-- on every load). `skip` names keys left out (those the resource uses).
function M.options_signature(opts, skip, depth)
  depth = depth or 0
  if type(opts) ~= "table" then
    local t = type(opts)
    return (t == "function" or t == "userdata" or t == "thread") and t or tostring(opts)
  end
  if depth > 3 then return "{...}" end
  if getmetatable(opts) and type(rawget(opts, "name")) == "string" then
    return "@" .. rawget(opts, "name") -- a topic, a store: by name
  end
  local keys = {}
  for k in pairs(opts) do
    if not (skip and skip[k]) then keys[#keys + 1] = tostring(k) end
  end
  table.sort(keys)
  local out = {}
  for i, k in ipairs(keys) do
    local v = opts[k]
    if v == nil then v = opts[tonumber(k)] end
    out[i] = k .. "=" .. M.options_signature(v, nil, depth + 1)
  end
  return "{" .. table.concat(out, ",") .. "}"
end

-- The separator between the part of a registration's signature that needs
-- a restart and the options part (registry.h OSARA_REG_SIG_OPTIONS).
M.SIG_OPTIONS = "\31"

-- log(level, msg [, fields [, where [, err]]]): one line through the C
-- logger. fields show in text and JSON lines; the running entry's context
-- (handler, topic, partition, offset, subject, route, request_id), where
-- (file:line) and err only in JSON lines (the text already says them).
function M.log(level, msg, fields, where, err)
  local log_c = require "osara.log_c"
  if not log_c.enabled(level) then return end
  log_c.write(level, msg, fields, M.log_context(), where, err)
end

-- The running entry's log context: a handler's message (set by the
-- failure policy, seen through its place fields) or a table of fields.
function M.log_context()
  local ctx = require("osara.sched_c").context()
  if ctx and ctx._handler then
    return { handler = ctx._handler, topic = ctx.topic, partition = ctx.partition,
             offset = ctx.offset, subject = ctx.subject }
  end
  return ctx
end

-- The "file:line" an error message starts with, or nil.
function M.err_where(err)
  return type(err) == "string" and err:match("^([^%s:]+:%d+):") or nil
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
