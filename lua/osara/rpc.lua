-- osara.rpc: plain functions exposed over WebSocket, and a client for them
-- (micro_framework's WebSocketEntrypoint and WebSocketRPCClient). Messages
-- are JSON-RPC 2.0 text frames (docs/rpc.md); host/ws does the
-- WebSocket side: each call arrives here in its own coroutine.
local ws_c = require "osara.ws_c"
local vm_c = require "osara.vm_c"
local sched = require "osara.sched_c"
local log = require "osara.log_c"
local options = require "osara.options"

local json = require("cjson").new()
json.encode_sparse_array(true)
json.decode_max_depth(64)

local M = {}

-- JSON-RPC 2.0 error codes; application errors use SERVER unless the
-- function raises a { code =, message = } table of its own.
local CODE = { PARSE = -32700, INVALID = -32600, METHOD = -32601, PARAMS = -32602,
               INTERNAL = -32603, SERVER = -32000 }
M.codes = CODE

local exposed = {}   -- this script version's functions: name -> { fn, doc, args, where }
local endpoint = nil -- the served path's options, once served

-- ---- server ------------------------------------------------------------------------

-- osara.rpc.serve{ path =, max_message =, max_inflight = }: where the
-- functions are served (the first expose serves "/rpc" with the defaults).
function M.serve(opts)
  opts = options.check("osara.rpc.serve", opts)
  endpoint = opts
  if vm_c.mode() ~= "run" then return end -- check and test load no sockets
  require("osara.http")._ensure_server()
  ws_c.serve(opts.path, opts)
end

-- The parameter names of a Lua function, for rpc.targets.
local function arg_names(fn)
  local names, info = {}, debug.getinfo(fn, "u")
  for i = 1, info.nparams or 0 do names[i] = debug.getlocal(fn, i) end
  if info.isvararg then names[#names + 1] = "..." end
  return names
end

local function expose_one(name, fn, opts, at)
  if type(name) ~= "string" or name == "" or name:sub(1, 4) == "rpc." then
    options.raise("osara.rpc.expose: a name is a non-empty string not starting with 'rpc.', got "
      .. tostring(name))
  end
  if type(fn) ~= "function" then
    options.raise(("osara.rpc.expose: %s must be a function, got %s"):format(name, type(fn)))
  end
  opts = options.check("osara.rpc.expose", opts)
  if exposed[name] then
    options.raise(("osara.rpc.expose: %s is already exposed (at %s)"):format(name, exposed[name].where))
  end
  exposed[name] = { fn = fn, doc = opts.doc or "", args = arg_names(fn), where = at }
  if vm_c.loading() then
    vm_c.register("rpc", name, "", fn, nil, at, (endpoint and endpoint.path or "/rpc") .. " " .. name)
  end
end

-- osara.rpc.expose(name, fn [, { doc = }]) or osara.rpc.expose{ name = fn
-- or { fn, doc = }, ... }: callable over WebSocket from then on.
function M.expose(name, fn, opts)
  local at = options.user_where()
  if type(name) == "table" then
    for k, v in pairs(name) do
      if type(v) == "table" then
        expose_one(k, v[1], { doc = v.doc }, at)
      else
        expose_one(k, v, nil, at)
      end
    end
  else
    expose_one(name, fn, opts, at)
  end
  if not endpoint then M.serve() end
end

local function detail(name)
  local e = exposed[name]
  return { target = name, args = e.args, doc = e.doc }
end

local BUILTIN = {
  ["rpc.targets"] = function()
    local names, list = {}, {}
    for name in pairs(exposed) do names[#names + 1] = name end
    table.sort(names)
    for i, name in ipairs(names) do list[i] = detail(name) end
    return list
  end,
  ["rpc.info"] = function(name)
    if type(name) ~= "string" or not exposed[name] then
      error({ code = CODE.METHOD, message = "no such method: " .. tostring(name) }, 0)
    end
    return detail(name)
  end,
}

local function fail(id, code, message)
  return { jsonrpc = "2.0", id = id, error = { code = code, message = message } }
end

-- An error raised by a function as the caller sees it: its own { code,
-- message } table, or the message without the file:line prefix.
local function error_object(err)
  if type(err) == "table" and type(err.code) == "number" then
    return { code = err.code, message = tostring(err.message or ""), data = err.data }
  end
  local msg = tostring(err):gsub("^[^\n]-:%d+: ", "")
  return { code = CODE.SERVER, message = msg }
end

-- The positional arguments of a request's params, or nil for bad params.
local function arguments(params)
  if params == nil then return { n = 0 } end
  if type(params) ~= "table" then return nil end
  if params[1] == nil and next(params) ~= nil then return { params, n = 1 } end -- named: one table
  local args = { n = #params }
  for i = 1, args.n do
    local v = params[i]
    if v ~= json.null then args[i] = v end
  end
  return args
end

local function traceback(err)
  return { err = err, trace = debug.traceback("", 2) }
end

local function run(name, id, args)
  local fn = BUILTIN[name] or (exposed[name] and exposed[name].fn)
  if not fn then
    return fail(id, CODE.METHOD, "no such method: " .. name)
  end
  local ok, res = xpcall(fn, traceback, unpack(args, 1, args.n))
  if ok then
    if res == nil then res = json.null end
    return { jsonrpc = "2.0", id = id, result = res }
  end
  local e = error_object(res.err)
  if not BUILTIN[name] then
    -- a { code, message } table is the function's answer; anything else a failure
    local deliberate = type(res.err) == "table" and type(res.err.code) == "number"
    log.write(deliberate and "info" or "error", ("rpc %s failed (%s): %s"):format(name,
      exposed[name].where, deliberate and (e.code .. " " .. e.message) or tostring(res.err)))
    if log.enabled("debug") then log.write("debug", "rpc " .. name .. res.trace) end
  end
  return { jsonrpc = "2.0", id = id, error = e }
end

local function encode(msg)
  local ok, text = pcall(json.encode, msg)
  if ok then return text end
  return json.encode(fail(msg.id, CODE.INTERNAL, "the result is not JSON: " .. tostring(text)))
end

-- Called by host/ws for every text message, in its own coroutine: returns
-- the reply text (nil for a notification: a request without id) and
-- whether it is an error (host/ws counts both in osara_rpc_calls_total).
function M._dispatch(text)
  local ok, msg = pcall(json.decode, text)
  if not ok then
    return encode(fail(json.null, CODE.PARSE, "parse error: " .. tostring(msg):gsub("^.-: ", ""))), true
  end
  if type(msg) ~= "table" or type(msg.method) ~= "string" then
    local id = type(msg) == "table" and msg.id or json.null
    return encode(fail(id, CODE.INVALID, "invalid request: expected {id, method, params}")), true
  end
  local id = msg.id
  local args = arguments(msg.params)
  local reply = args and run(msg.method, id == nil and json.null or id, args)
    or fail(id, CODE.PARAMS, "invalid params: expected an array or an object")
  if id == nil then return nil, reply.error ~= nil end
  return encode(reply), reply.error ~= nil
end

-- ---- client ------------------------------------------------------------------------

local Client, Target, Future = {}, {}, {}

-- A call's future: result(timeout) yields until the reply.
Future.__index = Future

function Future:result(timeout)
  if not self.done then
    local token, seq = sched.current()
    if not token then error("osara.rpc: result() waits, so it must run in a handler or task", 2) end
    if self.waiter then error("osara.rpc: another coroutine already waits for this result", 2) end
    self.waiter = { token, seq }
    sched.park(timeout or self.client._timeout)
    self.waiter = nil
    if not self.done then
      return nil, "timeout"
    end
  end
  if self.err then return nil, self.err, self.error end
  return self.value
end

local function settle(fut, value, err, error_obj)
  if fut.done then return end
  fut.done, fut.value, fut.err, fut.error = true, value, err, error_obj
  fut.client._pending[fut.id] = nil
  if fut.waiter then sched.wake(fut.waiter[1], fut.waiter[2], true) end
end

-- ws://host[:port][/path]
local function parse_url(url)
  if type(url) ~= "string" then return nil end
  local host, rest = url:match("^ws://([^/:]+)(.*)$")
  if not host then return nil end
  local port, path = rest:match("^:(%d+)(.*)$")
  path = port and path or rest
  return host, tonumber(port or 80), path ~= "" and path or "/"
end

local function wake_all(list, ...)
  for _, w in ipairs(list) do sched.wake(w[1], w[2], ...) end
end

-- Events of the current connection (earlier connections' are ignored).
function Client:_event(gen, kind, data)
  if gen ~= self._gen then return end
  if kind == "open" then
    self._state, self._backoff = "open", 0
    local openers = self._openers
    self._openers = {}
    wake_all(openers, true)
  elseif kind == "message" then
    local ok, msg = pcall(json.decode, data)
    local fut = ok and type(msg) == "table" and self._pending[msg.id]
    if not fut then return end
    if type(msg.error) == "table" then
      settle(fut, nil, tostring(msg.error.message), msg.error)
    else
      settle(fut, msg.result ~= json.null and msg.result or nil)
    end
  elseif kind == "close" then
    self:_lost(data)
  end
end

-- The connection is gone: callers waiting to connect and calls in flight
-- fail; the next call reconnects.
function Client:_lost(why)
  if self._state == "connecting" then -- a failed connect: wait longer before the next
    self._backoff = math.min(math.max(self._backoff * 2, 0.05), self._max_backoff)
  end
  self._state, self._conn = "closed", nil
  self._gen = self._gen + 1
  local openers = self._openers
  self._openers = {}
  wake_all(openers, nil, "connect " .. self._url .. ": " .. tostring(why))
  local pending = self._pending
  self._pending = {}
  for _, fut in pairs(pending) do settle(fut, nil, "connection lost: " .. tostring(why)) end
end

-- Connects unless connected; yields until open. true | nil, err
function Client:_connect()
  if self._state == "open" then return true end
  local token, seq = sched.current()
  if not token then error("osara.rpc: a call waits, so it must run in a handler or task", 3) end
  if self._state == "closed" then
    if self._backoff > 0 then require("osara").sleep(self._backoff) end
    if self._state == "open" then return true end
  end
  if self._state == "closed" then
    self._state = "connecting"
    local gen = self._gen
    self._conn = ws_c.connect(self._host, self._port, self._path, function(kind, data)
      self:_event(gen, kind, data)
    end, { max_message = self._max_message })
  end
  self._openers[#self._openers + 1] = { token, seq }
  local ok, err = sched.park(self._timeout)
  if ok then return true end
  if err == "timeout" and self._state == "connecting" then
    if self._conn then self._conn:close() end
    self:_lost("timeout")
  end
  return nil, err == "timeout" and ("connect " .. self._url .. ": timeout") or err
end

-- client:call_async(method, ...) -> future (its :result(timeout) yields)
function Client:call_async(method, ...)
  if type(method) ~= "string" then error("osara.rpc: the method name must be a string", 2) end
  local fut = setmetatable({ client = self, method = method }, Future)
  local ok, err = self:_connect()
  if not ok then
    fut.done, fut.err = true, err
    return fut
  end
  self._next_id = self._next_id + 1
  fut.id = self._next_id
  local n = select("#", ...)
  local params = { ... }
  for i = 1, n do
    if params[i] == nil then params[i] = json.null end
  end
  local encoded, text = pcall(json.encode, { jsonrpc = "2.0", id = fut.id, method = method,
                                              params = n > 0 and params or nil })
  if not encoded then error("osara.rpc: arguments are not JSON: " .. tostring(text), 2) end
  self._pending[fut.id] = fut
  local sent, why = self._conn:send(text)
  if not sent then settle(fut, nil, "connection lost: " .. tostring(why)) end
  return fut
end

-- client:call(method, ...) -> result | nil, err, error_object
function Client:call(method, ...)
  return self:call_async(method, ...):result()
end

-- client:targets() -> { { target =, args =, doc = }, ... } | nil, err
function Client:targets()
  return self:call("rpc.targets")
end

-- client:info(name) -> { target =, args =, doc = } (tostring gives text) | nil, err
local Info = { __tostring = function(t)
  return ("RPC target %s(%s)\n%s"):format(t.target, table.concat(t.args or {}, ", "), t.doc or "")
end }

function Client:info(name)
  local d, err, e = self:call("rpc.info", name)
  if not d and e and e.code == CODE.METHOD and e.message:find("rpc.info", 1, true) then
    -- a server with rpc.targets only: pick the entry from the list
    local list
    list, err, e = self:targets()
    for _, t in ipairs(list or {}) do
      if t.target == name then d = t end
    end
    err = err or (not d and "no such method: " .. tostring(name)) or nil
  end
  if not d then return nil, err, e end
  return setmetatable(d, Info)
end

function Client:close()
  if self._conn then self._conn:close() end
  self:_lost("closed by the client")
end

Client.__index = function(self, k)
  local m = Client[k]
  if m then return m end
  if type(k) ~= "string" or k:sub(1, 1) == "_" then return nil end
  local t = setmetatable({ client = self, name = k }, Target)
  rawset(self, k, t)
  return t
end

-- client.name(...) calls; client.name:call_async(...) returns a future;
-- client.name.info is its description.
Target.__call = function(t, ...) return t.client:call(t.name, ...) end
Target.__index = function(t, k)
  if k == "call_async" then
    return function(self, ...) return self.client:call_async(self.name, ...) end
  elseif k == "info" then
    return t.client:info(t.name)
  end
  return nil
end

-- osara.rpc.client("ws://127.0.0.1:8080/rpc" [, { timeout =, ... }]): the
-- connection opens at the first call and reopens after a loss.
function M.client(url, opts)
  opts = options.check("osara.rpc.client", opts)
  local host, port, path = parse_url(url)
  if not host then options.raise("osara.rpc.client: expected a ws://host[:port]/path URL, got " .. tostring(url)) end
  return setmetatable({
    _url = url, _host = host, _port = port, _path = path, _timeout = opts.timeout,
    _max_message = opts.max_message, _max_backoff = opts.max_backoff, _backoff = 0,
    _state = "closed", _gen = 0, _next_id = 0, _pending = {}, _openers = {},
  }, Client)
end

return M
