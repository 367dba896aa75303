-- osara.middleware: code around every handler call and every outgoing
-- message, for every transport (panini's middlewares: before/after listen,
-- publish and request, global or per client).
--
--   osara.middleware {
--     before = function(ctx) ... end,          -- may change ctx.msg / ctx.value
--     after = function(ctx, ok, err) ... end,  -- ok: the call or send succeeded
--     client = kafka,                          -- only this client (default: all)
--     direction = "in",                        -- "in" (handlers), "out" (sends); default both
--   }
--
-- ctx = { kind = "kafka" | "nats" | ..., direction = "in" | "out", name =
-- topic or subject, client = the client, msg = the message (in), value =,
-- opts = (out) }. Befores run in registration order, afters in reverse (the
-- first registered wraps all others). A before that raises fails the call
-- (a handler takes its failure policy; a send raises); an after that raises
-- on the way in fails the call too. Registered while the script loads; a
-- reload registers the new version's.
local options = require "osara.options"

local M = {}
local chain = {} -- { {before=, after=, client=, direction=}, ... }

function M.add(spec)
  if type(spec) ~= "table" then options.raise("osara.middleware: expected a table") end
  spec = options.check("osara.middleware", spec)
  if not spec.before and not spec.after then
    options.raise("osara.middleware: give before, after or both")
  end
  chain[#chain + 1] = spec
end

function M.active() return #chain > 0 end

-- osara.testing: each loaded app has its own chain; swaps it in, returns
-- the previous one.
function M._capture(new)
  local old = chain
  chain = new
  return old
end

local function applies(m, ctx)
  return (m.client == nil or m.client == ctx.client)
     and (m.direction == nil or m.direction == ctx.direction)
end

local function run_befores(ctx)
  for i = 1, #chain do
    local m = chain[i]
    if m.before and applies(m, ctx) then m.before(ctx) end
  end
end

local function run_afters(ctx, ok, err)
  for i = #chain, 1, -1 do
    local m = chain[i]
    if m.after and applies(m, ctx) then m.after(ctx, ok, err) end
  end
end

-- call(ctx, fn, ...) -> pcall(fn, ...)'s results, with the chain around it.
function M.call(ctx, fn, ...)
  local ok, err = pcall(run_befores, ctx)
  if not ok then
    return false, err
  end
  local res = { n = 0, pcall(fn, ...) }
  ok, err = pcall(run_afters, ctx, res[1], not res[1] and res[2] or nil)
  if not ok then
    return false, err
  end
  return unpack(res, 1, table.maxn(res))
end

-- The coroutines inside a send's chain: a send that calls another send
-- method (a fast path falling back to the full one) runs the chain once.
local sending = setmetatable({}, { __mode = "k" })
local MAIN = {}

-- Outgoing: runs the chain around one send. name: topic or subject.
function M.around_send(kind, client, name, value, opts, send)
  local co = coroutine.running() or MAIN
  if sending[co] then return send(value, opts) end
  local ctx = { kind = kind, direction = "out", name = name, client = client, value = value, opts = opts }
  sending[co] = true
  local ok, err = pcall(run_befores, ctx)
  if not ok then
    sending[co] = nil
    error(err, 0)
  end
  local res = { n = 0, pcall(send, ctx.value, ctx.opts) }
  sending[co] = nil
  if not res[1] then error(res[2], 0) end
  run_afters(ctx, res[2] ~= nil and res[2] ~= false, res[2] == nil and res[3] or nil)
  return unpack(res, 2, table.maxn(res))
end

-- topic_send(kind, send) -> send wrapped: topic:send(value, opts).
function M.topic_send(kind, send)
  return function(topic, value, opts)
    if #chain == 0 then return send(topic, value, opts) end
    return M.around_send(kind, topic.client, topic.name, value, opts,
                       function(v, o) return send(topic, v, o) end)
  end
end

-- publish(kind, publish) -> publish wrapped: client:publish(subject, value, opts).
function M.publish(kind, publish)
  return function(client, subject, value, opts)
    if #chain == 0 then return publish(client, subject, value, opts) end
    return M.around_send(kind, client, subject, value, opts,
                       function(v, o) return publish(client, subject, v, o) end)
  end
end

return M
