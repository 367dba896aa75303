-- osara.testing: unit-test handlers without brokers.
--
--   local testing = require "osara.testing"
--   local app = testing.load("examples/app.lua")     -- captures registrations
--   local out = app:deliver("kafka", "orders", { value = { id = 1 } })
--   assert.are.same({ ... }, out.returned)            -- what the handler returned
--   assert.are.equal(1, #out.sent)                   -- what it sent (when the
--                                                    -- transport reports sends)
--   local clock = testing.clock()                    -- fake time for timers
--   clock:advance(5)                                 -- runs due timers in order
--
-- testing.load runs the script like `osara check` does (nothing connects)
-- but keeps its handler functions, so a spec can call them with a message
-- table. Transports may add adapters (testing.adapters[kind]) that build
-- their message shape and capture outputs; the default adapter runs the
-- shared handler path (codec, schema, function) from lua/osara/dispatch.lua.
local osara = require "osara"
local vm_c = require "osara.vm_c"
local dispatch = require "osara.dispatch"
local codec = require "osara.codec"

local M = { adapters = {} }

-- ---- capturing registrations ------------------------------------------------

local App = {}
App.__index = App

-- Loads `path` with registrations captured instead of started. Options:
-- env = { NAME = value } values visible through os.getenv while loading.
function M.load(path, opts)
  opts = opts or {}
  local captured = {}
  local real_register, real_mode, real_loading = vm_c.register, vm_c.mode, vm_c.loading
  local real_getenv = os.getenv
  vm_c.register = function(kind, key, sig, fn, o, where, detail)
    for _, r in ipairs(captured) do
      if r.kind == kind and r.key == key then
        error(("%s '%s' is already registered at %s"):format(kind, key, r.where), 2)
      end
    end
    captured[#captured + 1] = { kind = kind, key = key, sig = sig, fn = fn, opts = o,
                                where = where, detail = detail }
    return true
  end
  vm_c.mode = function() return "check" end
  vm_c.loading = function() return false end
  if opts.env then
    os.getenv = function(k)
      if opts.env[k] ~= nil then return opts.env[k] end
      return real_getenv(k)
    end
  end
  local chunk, err = loadfile(path, "t")
  local ok, lerr = false, err
  if chunk then
    ok, lerr = pcall(chunk)
  end
  vm_c.register, vm_c.mode, vm_c.loading = real_register, real_mode, real_loading
  os.getenv = real_getenv
  if not ok then
    error("osara.testing.load: " .. tostring(lerr), 2)
  end
  return setmetatable({ path = path, registrations = captured }, App)
end

-- Finds a registration by kind and key (the key `osara check` prints).
function App:find(kind, key)
  for _, r in ipairs(self.registrations) do
    if r.kind == kind and r.key == key then
      return r
    end
  end
  local keys = {}
  for _, r in ipairs(self.registrations) do
    keys[#keys + 1] = r.kind .. " " .. r.key
  end
  error(("no %s registration '%s' (registered: %s)"):format(kind, key,
    #keys > 0 and table.concat(keys, ", ") or "none"), 2)
end

-- ---- delivering messages ------------------------------------------------------

-- Delivers one message to the handler registered as (kind, key): the
-- transport's own handler path runs (codec, schema, function, outputs,
-- replies) with outputs captured instead of sent. msg may give `raw` bytes
-- or a `value` (encoded with the handler's codec). Returns
-- { ok=, reason=, error=, sent={ {to=, value=, meta=} }, returned=, msg= }.
function App:deliver(kind, key, msg)
  local reg = self:find(kind, key)
  local o = reg.opts or {}
  msg = msg or {}
  if msg.raw == nil and msg.value ~= nil then
    msg.raw = assert(codec.get(o.codec).encode(msg.value))
  end
  msg.raw = msg.raw or ""
  msg.headers = msg.headers or {}
  msg.topic = msg.topic or o.topic or key
  msg.subject = msg.subject or o.subject or key
  msg.partition = msg.partition or 0
  msg.offset = msg.offset or 0
  local sent, bad = {}, nil
  local real_bad = dispatch.bad_input
  dispatch.bad_input = function(_, _, reason, _, message)
    bad = { reason = reason, error = message }
  end
  M._sent = sent
  local res = { pcall(reg.fn, msg) }
  M._sent = nil
  dispatch.bad_input = real_bad
  local out = { sent = sent, msg = msg, returned = { select(2, unpack(res)) } }
  if not res[1] then
    out.ok, out.reason, out.error = false, "error", tostring(res[2])
  elseif bad then
    out.ok, out.reason, out.error = false, bad.reason, bad.error
  else
    out.ok = true
  end
  return out
end

-- Records an output a transport would have sent (transports call this in
-- check mode when a spec captures outputs).
function M.record_send(where, value, meta)
  if M._sent then
    M._sent[#M._sent + 1] = { to = where, value = value, meta = meta }
    return true
  end
  return false
end

-- ---- fake time ------------------------------------------------------------------

local Clock = {}
Clock.__index = Clock

-- Replaces osara.now/monotonic/sleep/every/after with a virtual clock until
-- clock:restore(). Timers created meanwhile fire only from clock:advance().
function M.clock(start)
  local c = setmetatable({ t = start or 1e9, timers = {}, seq = 0, saved = {} }, Clock)
  for _, k in ipairs { "now", "monotonic", "sleep", "every", "after" } do
    c.saved[k] = rawget(osara, k)
  end
  osara.now = function() return c.t end
  osara.monotonic = function() return c.t end
  osara.every = function(s, fn) return c:_add(s, fn, true) end
  osara.after = function(s, fn) return c:_add(s, fn, false) end
  osara.sleep = function(s)
    local token, seq = osara._sched.current()
    assert(token, "osara.sleep under a fake clock must run inside a coroutine")
    c:_add(s, function() osara._sched.wake(token, seq) end, false, true)
    osara._sched.park()
  end
  return c
end

function Clock:_add(s, fn, rep, internal)
  self.seq = self.seq + 1
  local t = { due = self.t + s, every = rep and s or nil, fn = fn, seq = self.seq,
              internal = internal, running = false }
  self.timers[#self.timers + 1] = t
  return { cancel = function() local was = not t.cancelled; t.cancelled = true; return was end }
end

local function earliest(c, limit)
  local best
  for _, t in ipairs(c.timers) do
    if not t.cancelled and t.due <= limit and (not best or t.due < best.due
        or (t.due == best.due and t.seq < best.seq)) then
      best = t
    end
  end
  return best
end

-- Moves time forward by `seconds`, running every timer due on the way, in
-- order; each tick runs in its own coroutine as it would for real.
function Clock:advance(seconds)
  local target = self.t + seconds
  while true do
    local t = earliest(self, target)
    if not t then break end
    self.t = t.due
    if t.every then t.due = t.due + t.every else t.cancelled = true end
    if t.internal then
      t.fn()
    elseif not t.running then
      t.running = true
      osara._sched.spawn(function()
        local ok, err = pcall(t.fn)
        t.running = false
        if not ok then error(err, 0) end
      end)
    end
    osara.yield() -- let woken coroutines run before the next event
  end
  self.t = target
  osara.yield()
end

function Clock:restore()
  for k, v in pairs(self.saved) do
    rawset(osara, k, v)
  end
end

return M
