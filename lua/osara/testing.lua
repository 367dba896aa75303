-- osara.testing: unit-test handlers without brokers.
--
--   local testing = require "osara.testing"
--   local app = testing.load("examples/app.lua")     -- captures registrations
--   local out = app:deliver("kafka", "orders", { value = { id = 1 } })
--   assert.are.same({ ... }, out.returned)            -- what the handler returned
--   assert.are.equal(1, #out.sent)                   -- what it sent
--   local res = app:request("GET", "/totals/ann")     -- through the real router
--   assert.are.equal(200, res.status)                -- res.body is decoded
--   app:tick("every 1 #1")                           -- runs a timer once
--   app:close()                                      -- removes its data folder
--   local clock = testing.clock()                    -- fake time for timers
--   clock:advance(5)                                 -- runs due timers in order
--
-- testing.load runs the script like `osara check` does (nothing connects)
-- but keeps its handler functions, routes, timers and tasks, so a spec can
-- call them. Each load gets a fresh data folder (stores, offsets), so runs
-- never see each other's state, and deliveries get offsets in sequence per
-- topic and partition. Transports may add adapters (testing.adapters[kind]) that build
-- their message shape and capture outputs; the default adapter runs the
-- shared handler path (codec, schema, function) from lua/osara/dispatch.lua.
local osara = require "osara"
local vm_c = require "osara.vm_c"
local dispatch = require "osara.dispatch"
local codec = require "osara.codec"
local http = require "osara.http"
local cjson = require "cjson"

local M = { adapters = {} }
local folders = {} -- data folders of loaded apps, removed by close/cleanup

local function pack(...) return { n = select("#", ...), ... } end

-- A fresh, empty data folder path (the store creates it on first use).
local function fresh_folder()
  local p = os.tmpname()
  os.remove(p)
  p = p .. ".osara-test"
  folders[p] = true
  return p
end

local function remove_tree(path)
  local ok, lfs = pcall(require, "lfs") -- busted's dependency: there under osara test
  if not ok or lfs.attributes(path, "mode") ~= "directory" then
    os.remove(path)
    return
  end
  for name in lfs.dir(path) do
    if name ~= "." and name ~= ".." then
      remove_tree(path .. "/" .. name)
    end
  end
  os.remove(path)
end

-- Runs fn(...) with the app's data folder as the VM's data folder, so a
-- store opened by the script (at load or later in a handler) lands there.
-- Runs fn as the app: its data folder and its middleware chain.
local function in_app(app, fn, ...)
  local real = vm_c.paths
  vm_c.paths = function()
    local p = real()
    p.data_dir = app.data_dir
    return p
  end
  local middleware = require "osara.middleware"
  local outer = middleware._capture(app.middleware or {})
  local res = pack(pcall(fn, ...))
  app.middleware = middleware._capture(outer)
  vm_c.paths = real
  return unpack(res, 1, res.n)
end

-- ---- capturing registrations ------------------------------------------------

local App = {}
App.__index = App

-- Loads `path` with registrations captured instead of started. Options:
-- env = { NAME = value } values visible through os.getenv while loading.
function M.load(path, opts)
  opts = require("osara.options").check("osara.testing.load", opts)
  local captured = {}
  local app = setmetatable({ path = path, registrations = captured, timers = {}, tasks = {},
                             offsets = {}, data_dir = opts.data_dir or fresh_folder() }, App)
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
  local real_timers = { every = osara.every, after = osara.after, spawn = osara.spawn }
  osara.every = function(s, fn, o) return app:_timer("every", s, fn, o) end
  osara.after = function(s, fn, o) return app:_timer("after", s, fn, o) end
  osara.spawn = function(fn, ...)
    app.tasks[#app.tasks + 1] = { fn = fn, args = { n = select("#", ...), ... } }
    return true
  end
  local saved_http = http._capture({})
  local chunk, err = loadfile(path, "t")
  local ok, lerr = false, err
  if chunk then
    ok, lerr = in_app(app, chunk)
  end
  local http_state = http._capture(saved_http)
  app.routes, app.server = http_state.routes, http_state.server
  for k, v in pairs(real_timers) do osara[k] = v end
  vm_c.register, vm_c.mode, vm_c.loading = real_register, real_mode, real_loading
  os.getenv = real_getenv
  if not ok then
    error("osara.testing.load: " .. tostring(lerr), 2)
  end
  return app
end

-- Timers are captured, not started: app:tick(key) runs one. The key is the
-- one `osara check` prints: "every <name>" with { name = }, else
-- "every <seconds> #<n>" (n counts timers of that period, from 1).
function App:_timer(kind, seconds, fn, o)
  local base = ("%s %g"):format(kind, seconds)
  local key = o and o.name and (kind .. " " .. o.name)
  if not key then
    local n = 1
    for _, t in ipairs(self.timers) do
      if t.base == base then n = n + 1 end
    end
    key = ("%s #%d"):format(base, n)
  end
  self.timers[#self.timers + 1] = { key = key, base = not (o and o.name) and base or nil,
                                    fn = fn, seconds = seconds }
  return { cancel = function() return false end }
end

-- Runs the timer registered under key (see App:_timer) once, in the
-- caller's coroutine. Returns { ok =, error = }.
function App:tick(key)
  for _, t in ipairs(self.timers) do
    if t.key == key then
      local ok, err = in_app(self, t.fn)
      return { ok = ok, error = not ok and tostring(err) or nil }
    end
  end
  local keys = {}
  for _, t in ipairs(self.timers) do keys[#keys + 1] = t.key end
  error(("no timer '%s' (timers: %s)"):format(key, #keys > 0 and table.concat(keys, ", ") or "none"), 2)
end

-- Removes the app's data folder (M.cleanup at the end of `osara test`
-- removes what was not closed).
function App:close()
  if self.data_dir and folders[self.data_dir] then
    remove_tree(self.data_dir)
    folders[self.data_dir] = nil
  end
end

function M.cleanup()
  for dir in pairs(folders) do
    remove_tree(dir)
  end
  folders = {}
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
-- { ok=, reason=, error=, sent={ {to=, value=, meta=} }, returned=, msg= };
-- a failure taken by the failure policy also gives attempts= and
-- dead_letter= (its topic or subject, when one is configured).
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
  if msg.offset == nil then -- in sequence per topic and partition, from 0
    local at = msg.topic .. "|" .. msg.partition
    msg.offset = self.offsets[at] or 0
    self.offsets[at] = msg.offset + 1
  end
  local sent, bad, returned = {}, nil, {}
  local real_bad = dispatch.bad_input
  dispatch.bad_input = function(_, _, reason, _, message, dead_letter, attempts)
    bad = { reason = reason, error = message, dead_letter = dead_letter, attempts = attempts }
  end
  dispatch.on_return = function(...) returned = { ... } end
  M._sent = sent
  local res = { in_app(self, reg.fn, msg) }
  M._sent = nil
  dispatch.bad_input, dispatch.on_return = real_bad, nil
  local out = { sent = sent, msg = msg, returned = returned }
  if not res[1] then
    out.ok, out.reason, out.error = false, "error", tostring(res[2])
  elseif bad then
    out.ok, out.reason, out.error = false, bad.reason, bad.error
    out.dead_letter, out.attempts = bad.dead_letter, bad.attempts
  else
    out.ok, out.skipped = true, msg.skipped
  end
  return out
end

-- ---- HTTP requests without a socket ----------------------------------------------

local request_id = 0

-- app:request(method, target [, { body =, headers = }]) runs the request
-- through the real router, schema checks, formats and error mapping.
-- A table body is sent as JSON. Returns { status =, headers =, body =
-- (decoded by its content type: JSON and msgpack to tables), raw = }.
-- Server-sent-event routes need a connection: test their source instead.
function App:request(method, target, o)
  o = require("osara.options").check("app:request", o)
  local headers = {}
  for k, v in pairs(o.headers or {}) do headers[k:lower()] = v end
  local body = o.body
  if type(body) == "table" then
    body = cjson.encode(body)
    headers["content-type"] = headers["content-type"] or "application/json"
  end
  request_id = request_id + 1
  local req = { method = method:upper(), target = target, headers = headers, body = body or "",
                id = request_id, t0 = osara.monotonic() }
  local saved = http._capture({ routes = self.routes,
                                server = self.server or { healthz = "/healthz", readyz = "/readyz", metrics = "/metrics" } })
  local ok, status, rheaders, raw = in_app(self, http._dispatch, req)
  http._capture(saved)
  if not ok then
    error("app:request: " .. tostring(status), 2)
  end
  if status == nil then
    error("app:request: " .. target .. " streams server-sent events; test its source instead", 2)
  end
  local res = { status = status, headers = rheaders, raw = raw, body = raw }
  local ct = (rheaders["Content-Type"] or ""):lower()
  if ct:find("json", 1, true) and raw ~= "" then
    res.body = codec.get("json").decode(raw)
  elseif ct:find("msgpack", 1, true) then
    res.body = codec.get("msgpack").decode(raw)
  end
  return res
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
