-- osara.http: routes, resources, formats, server-sent events and the
-- built-in /healthz and /metrics, on host/http/http.c's server. See docs/http.md.
local util = require "osara.util"
local where, signature = util.where, util.signature
local http_c = require "osara.http_c"
local vm_c = require "osara.vm_c"
local sched = require "osara.sched_c"
local codec = require "osara.codec"
local codec_c = require "osara.codec_c"
local metrics = require "osara.metrics_c"
local log = require "osara.log_c"
local cjson = require "cjson"
local options = require "osara.options"

local M = {}
local routes = {}          -- this script version's routes, in registration order
local server = nil         -- { listen=, addr=, healthz=, metrics= }
local capturing = false    -- osara.testing is loading a script: start no server
local METHODS = { GET = true, POST = true, PUT = true, PATCH = true, DELETE = true,
                  HEAD = true, OPTIONS = true }


-- ---- server -------------------------------------------------------------------

-- osara.http{listen="127.0.0.1:8080", healthz="/healthz"|false, readyz="/readyz"|false,
--            metrics="/metrics"|false, max_body=, max_header=,
--            request_timeout=, idle_timeout=, max_connections=}
local function start_server(opts)
  opts = options.check("osara.http", opts)
  local listen = os.getenv("OSARA_HTTP_LISTEN") or opts.listen
  server = { listen = listen, healthz = opts.healthz, readyz = opts.readyz, metrics = opts.metrics,
             docs = opts.docs }
  if capturing then return server end -- osara.testing: routes without a socket
  local ok, addr, created = pcall(http_c.listen, listen, opts)
  if not ok then
    local msg = tostring(addr):gsub("^[^:]*:%d+: ", "")
    if os.getenv("OSARA_HTTP_LISTEN") then msg = msg .. " (from --http or OSARA_HTTP_LISTEN)" end
    options.raise(msg)
  end
  server.addr = addr
  if created and vm_c.mode() == "run" then log.write("info", "http: listening on http://" .. addr) end
  return server
end

function M.address()
  return server and server.addr
end

-- This version's routes, in registration order (osara.docs reads them).
function M._routes()
  return routes
end

-- Starts the server with its defaults unless one runs (osara.rpc needs it).
function M._ensure_server()
  if not server and not capturing then start_server() end
end

-- ---- routes ---------------------------------------------------------------------

-- Path parameter types. A segment that does not convert does not match (a
-- request no route matches answers 404). int: decimal digits only, exact in
-- a double (|n| <= 2^53), so 99999999999999999999999 is not an int; number:
-- a finite decimal (no hex, inf or nan).
local EXACT = "9007199254740992" -- 2^53: compared as digits, before rounding
local function int_param(s)
  local sign, digits = s:match("^(%-?)0*(%d+)$")
  if not digits or #digits > #EXACT or (#digits == #EXACT and digits > EXACT) then return nil end
  return tonumber(sign .. digits)
end
local function number_param(s)
  local mantissa, exponent = s:match("^%-?([%d.]+)(.*)$")
  if not mantissa or not (mantissa:match("^%d+$") or mantissa:match("^%d*%.%d+$")) then return nil end
  if exponent ~= "" and not exponent:match("^[eE][+-]?%d+$") then return nil end
  local n = tonumber(s)
  if n == nil or n ~= n or n == math.huge or n == -math.huge then return nil end
  return n
end
local TYPES = {
  int = int_param,
  number = number_param,
  str = function(s) return s end,
}

-- A decoded segment a `*` parameter may hold: joined onto a folder, the
-- rest never leaves it (no "." or "..", no slash or NUL hidden as %2F).
local function safe_segment(seg)
  return seg ~= "." and seg ~= ".." and not seg:find("[/\\%z]")
end

-- "/foo/{id:int}/{name}/*" -> list of segments
local function compile(pattern)
  if type(pattern) ~= "string" or pattern:sub(1, 1) ~= "/" then
    options.raise("route: a pattern starts with '/', got " .. tostring(pattern))
  end
  local segs = {}
  for seg in pattern:gmatch("[^/]+") do
    local name, typ = seg:match("^{([%w_]+):?([%w]*)}$")
    if seg == "**" then
      segs[#segs + 1] = { rest = true, raw = true }
    elseif seg == "*" or seg:match("^{[%w_]*%*}$") then
      segs[#segs + 1] = { rest = true, param = seg:match("^{([%w_]+)%*}$") }
    elseif name then
      typ = typ ~= "" and typ or "str"
      if not TYPES[typ] then options.raise(("route: unknown parameter type '%s' (int, number, str)"):format(typ)) end
      segs[#segs + 1] = { param = name, conv = TYPES[typ], typ = typ }
    else
      segs[#segs + 1] = { lit = seg }
    end
  end
  return segs
end

-- parts: the path's segments decoded; raw: as sent (still %-encoded).
local function match(segs, parts, raw)
  local params = {}
  for i, s in ipairs(segs) do
    if s.rest and s.raw then
      params[#params + 1] = table.concat(raw, "/", i)
      return params
    elseif s.rest then
      for j = i, #parts do
        if not safe_segment(parts[j]) then return nil end
      end
      params[#params + 1] = table.concat(parts, "/", i)
      return params
    end
    local p = parts[i]
    if p == nil then return nil end
    if s.lit then
      if s.lit ~= p then return nil end
    else
      local v = s.conv(p)
      if v == nil then return nil end
      params[#params + 1] = v
    end
  end
  if #parts ~= #segs then return nil end
  return params
end

local FORMATS

local function check_formats(format)
  for _, f in ipairs(type(format) == "table" and format or { format }) do
    if not FORMATS[f] then
      options.raise(("option 'format' in osara.route: unknown format '%s' (json, msgpack, html, text)"):format(tostring(f)))
    end
  end
end

local function add_route(method, pattern, fn, opts, at)
  if type(method) ~= "string" or not METHODS[method:upper()] then
    options.raise("route: unknown method " .. tostring(method))
  end
  method = method:upper()
  if type(fn) ~= "function" then options.raise("route: expected a handler function") end
  opts = options.check("osara.route", opts)
  check_formats(opts.format)
  local r = { method = method, pattern = pattern, segs = compile(pattern), fn = fn, opts = opts, where = at }
  routes[#routes + 1] = r
  if not server and not capturing and vm_c.mode() ~= "test" then start_server() end
  local sig = ("format=%s schema=%s"):format(tostring(opts.format), tostring(opts.schema ~= nil))
  if vm_c.loading() then
    local ok, err = pcall(vm_c.register, "route", method .. " " .. pattern, sig, fn, nil, at,
      type(opts.format) == "table" and table.concat(opts.format, "|") or tostring(opts.format or "json"))
    if not ok then error(at .. ": " .. tostring(err):gsub("^[^:]*:%d+: ", ""), 0) end
  end
  return r
end

-- osara.route(method, pattern, fn [, opts]): fn(req, params...) -> response
function M.route(method, pattern, fn, opts)
  return add_route(method, pattern, fn, opts, options.user_where())
end

-- osara.resource(pattern, {get=, post=, put=, patch=, delete=} [, opts]):
-- kata's Resource / aiohttp's View. Missing methods answer 405 with Allow.
function M.resource(pattern, handlers, opts)
  if type(handlers) ~= "table" then options.raise("osara.resource: expected a table of method = handler") end
  local at = options.user_where()
  for method, fn in pairs(handlers) do
    add_route(method, pattern, fn, opts, at)
  end
end

-- ---- requests ---------------------------------------------------------------------

local function percent_decode(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- a query or form value: '+' is a space there (not in paths)
local function unescape(s)
  return percent_decode(s:gsub("+", " "))
end

local function parse_query(q)
  local out = {}
  for pair in q:gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    k, v = unescape(k), unescape(v)
    if out[k] == nil then out[k] = v
    elseif type(out[k]) == "table" then table.insert(out[k], v)
    else out[k] = { out[k], v } end
  end
  return out
end

local Request = {}
-- req.value is the decoded body, as msg.value on the brokers: validated
-- when the route has a schema, else decoded by content type on first use.
Request.__index = function(req, k)
  local method = Request[k]
  if method ~= nil or k ~= "value" then return method end
  local v = req:data()
  rawset(req, "value", v)
  return v
end

-- req:header(name) -> value (case-insensitive)
function Request:header(name)
  return self.headers[name:lower()]
end

-- req:json() -> decoded body | nil, err
function Request:json()
  return codec.get("json").decode(self.body)
end

-- req:data() -> the body decoded by its content type (json, msgpack, form)
function Request:data()
  local ct = (self.headers["content-type"] or ""):lower()
  if ct:find("msgpack", 1, true) then return codec.get("msgpack").decode(self.body) end
  if ct:find("x-www-form-urlencoded", 1, true) then return parse_query(self.body) end
  if ct:find("json", 1, true) or self.body:match("^%s*[{%[]") then return self:json() end
  return self.body
end

-- ---- responses ----------------------------------------------------------------------

local RESPONSE, SSE = {}, {}

-- osara.response{status=, body=, headers=, format=}
function M.response(t)
  options.check("osara.response", t)
  if t and t.format then check_formats(t.format) end
  return setmetatable(t or {}, RESPONSE)
end

-- osara.sse(iterator_or_function [, {keepalive=15, format=fn(...)}])
function M.sse(source, opts)
  return setmetatable({ source = source, opts = options.check("osara.sse", opts) }, SSE)
end

FORMATS = {
  json = { type = "application/json", encode = function(v) return cjson.encode(v) end },
  msgpack = { type = "application/msgpack", encode = function(v) return assert(codec.get("msgpack").encode(v)) end },
  html = { type = "text/html; charset=utf-8", encode = tostring, scalars = true },
  text = { type = "text/plain; charset=utf-8", encode = tostring, scalars = true },
}

-- Whether format f can send body (html and text send strings and numbers,
-- never a table's address).
local function can_encode(f, body)
  return not (FORMATS[f].scalars and type(body) == "table")
end

-- Picks the route's format for body, honouring Accept when it allows
-- several: the first allowed format Accept names that can encode the body,
-- else the first that can (a table asked for as text/html goes out as
-- JSON when the route also allows JSON).
local function negotiate(req, allowed, body)
  if type(allowed) ~= "table" then allowed = { allowed or "json" } end
  local accept = req.headers["accept"] or ""
  local fallback
  for _, f in ipairs(allowed) do
    if can_encode(f, body) then
      if accept:find(FORMATS[f].type:match("^[^;]+"), 1, true) then return f end
      fallback = fallback or f
    end
  end
  if fallback then return fallback end
  local route = req.route and (" " .. req.route) or ""
  error(("route %s%s returned a table, but its format %s sends strings (return a string, "
    .. "or allow \"json\" or \"msgpack\")"):format(req.method, route, table.concat(allowed, "|")), 0)
end

local function json_error(status, msg, extra)
  local body = { error = msg }
  for k, v in pairs(extra or {}) do body[k] = v end
  return status, { ["Content-Type"] = "application/json" }, cjson.encode(body)
end

local function render(req, route, a, b, c)
  if getmetatable(a) == RESPONSE then
    local fmt = FORMATS[negotiate(req, a.format or (route and route.opts.format), a.body)]
    local body = a.body
    local headers = a.headers or {}
    if type(body) == "table" then body = fmt.encode(body) end
    if not headers["Content-Type"] then headers["Content-Type"] = fmt.type end
    return a.status or 200, headers, body or ""
  end
  local status, body, headers = 200, a, nil
  if type(a) == "number" then status, body, headers = a, b, c end
  headers = headers or {}
  local fmt = FORMATS[negotiate(req, route and route.opts.format, body)]
  if type(body) == "table" or (body ~= nil and type(body) ~= "string") then
    body = fmt.encode(body)
  elseif body == nil then
    body = ""
  elseif route and not route.opts.format and not headers["Content-Type"] then
    fmt = FORMATS.text -- a plain string from a json route is text
  end
  if not headers["Content-Type"] then headers["Content-Type"] = fmt.type end
  return status, headers, body
end

-- ---- server-sent events ------------------------------------------------------------

local function sse_frame(opts, a, b)
  if opts.format then return opts.format(a, b) end
  local data, id, event = a, nil, nil
  if b ~= nil then data = { key = a, value = b } end
  if type(a) == "table" and (a.data ~= nil or a.event ~= nil) and b == nil then
    data, id, event = a.data, a.id, a.event
  end
  if type(data) ~= "string" then data = cjson.encode(data) end
  local out = {}
  if id then out[#out + 1] = "id: " .. tostring(id) end
  if event then out[#out + 1] = "event: " .. tostring(event) end
  for line in (data .. "\n"):gmatch("([^\n]*)\n") do out[#out + 1] = "data: " .. line end
  return table.concat(out, "\n") .. "\n\n"
end

-- Streams events until the source ends or the client goes away. The source
-- runs in its own task so that a client that leaves is noticed (keep-alive
-- comments) even while the source waits; a source with :close() is closed.
local function stream(req, sse)
  local token = req._token
  local opts = sse.opts
  http_c.start(token, 200, { ["Content-Type"] = "text/event-stream", ["Cache-Control"] = "no-cache",
                             ["X-Request-Id"] = req.id })
  local queue, ended, waiter = {}, false, nil
  local source = sse.source
  local function wake()
    if waiter then
      local w = waiter
      waiter = nil
      sched.wake(w[1], w[2], true)
    end
  end
  sched.spawn(function()
    local ok, err = pcall(function()
      while not ended do
        local a, b = source()
        if a == nil then break end
        queue[#queue + 1] = { a, b }
        wake()
      end
    end)
    if not ok then
      sched.error()
      log.write("error", "sse source failed: " .. tostring(err))
    end
    ended = true
    wake()
  end)
  local keepalive = opts.keepalive
  local timer_c = require "osara.timer_c"
  local last_write = timer_c.monotonic()
  -- Wake at least every 0.25 s: a client that left (or a host that stops)
  -- ends the stream promptly even when the source is quiet.
  while true do
    while #queue > 0 do
      local e = table.remove(queue, 1)
      if not http_c.write(token, sse_frame(opts, e[1], e[2])) then ended = true break end
      last_write = timer_c.monotonic()
    end
    if ended or not http_c.alive(token) or vm_c.stats().stopping then break end
    waiter = { sched.current() }
    sched.park(math.min(keepalive, 0.25))
    waiter = nil
    if timer_c.monotonic() - last_write >= keepalive then
      if not http_c.write(token, ": keep-alive\n\n") then break end
      last_write = timer_c.monotonic()
    end
  end
  ended = true
  local mt = getmetatable(source)
  local close = type(source) == "table" and source.close or (mt and mt.__index and type(mt.__index) == "table" and mt.__index.close)
  if close then pcall(close) end
  http_c.finish(token)
end

-- ---- dispatch (called by host/http/http.c for each request) -----------------------------

local function observe(route_name, status, t0)
  local labels = { route = route_name, status = tostring(status) }
  metrics.add("osara_http_requests_total", labels, "HTTP requests by route and status")
  metrics.observe("osara_http_request_seconds", { route = route_name }, "HTTP request latency",
    require("osara.timer_c").monotonic() - t0)
end

local function builtin(req, path)
  if server and server.healthz and path == server.healthz then
    local body = { status = "ok", generation = vm_c.stats().generation, inflight = sched.stats().inflight }
    return 200, { ["Content-Type"] = "application/json" }, cjson.encode(body)
  end
  if server and server.readyz and path == server.readyz then
    local ready, list = require("osara.health").readiness()
    local body = { status = ready and "ready" or "not ready", checks = list }
    local waiting = {}
    for _, c in ipairs(list) do
      if not c.ready then waiting[#waiting + 1] = c.name .. ": " .. c.reason end
    end
    if #waiting > 0 then body.not_ready = waiting end
    return ready and 200 or 503, { ["Content-Type"] = "application/json" }, cjson.encode(body)
  end
  if server and server.docs and (path == "/asyncapi.json" or path == "/openapi.json") then
    local kind = path == "/openapi.json" and "openapi" or "asyncapi"
    return 200, { ["Content-Type"] = "application/json" }, require("osara.docs").encode(kind)
  end
  if server and server.metrics and path == server.metrics then
    return 200, { ["Content-Type"] = "text/plain; version=0.0.4" }, metrics.render()
  end
end

local function find(method, parts, raw)
  local allowed, any = {}, false
  for _, r in ipairs(routes) do
    local params = match(r.segs, parts, raw)
    if params then
      any = true
      if r.method == method or (method == "HEAD" and r.method == "GET") then
        return r, params
      end
      allowed[r.method] = true
    end
  end
  if not any then return nil end
  local list = {}
  for m in pairs(allowed) do list[#list + 1] = m end
  if allowed.GET then list[#list + 1] = "HEAD" end
  list[#list + 1] = "OPTIONS"
  table.sort(list)
  return nil, nil, table.concat(list, ", ")
end

local function handle(req)
  local target = req.target
  local raw_path, query = target:match("^([^?]*)%??(.*)$")
  local path = percent_decode(raw_path)
  if not codec_c.utf8_valid(path) then
    return "-", json_error(400, "invalid UTF-8 in the path")
  end
  req.path, req.raw_path = path, raw_path
  req.query = parse_query(query or "")
  local b1, b2, b3 = builtin(req, path)
  if b1 then return path, b1, b2, b3 end
  -- split before decoding: an encoded slash (%2F) stays inside its segment
  local parts, raw = {}, {}
  for seg in raw_path:gmatch("[^/]+") do
    raw[#raw + 1] = seg
    parts[#parts + 1] = percent_decode(seg)
  end
  local route, params, allow = find(req.method, parts, raw)
  if not route then
    if allow then
      if req.method == "OPTIONS" then
        return "-", 204, { Allow = allow }, ""
      end
      return "-", 405, { Allow = allow, ["Content-Type"] = "application/json" },
        cjson.encode { error = "method not allowed" }
    end
    return "-", json_error(404, "not found")
  end
  req.route = route.pattern
  sched.set_context { route = route.pattern, request_id = req.id } -- JSON log fields
  if route.opts.schema then
    local data, err = req:data()
    if data == nil and err then return route.pattern, json_error(400, "invalid body: " .. tostring(err)) end
    local v, errs = route.opts.schema:validate(data)
    if v == nil then
      local list = {}
      for i, e in ipairs(errs) do list[i] = { path = e.path, message = e.message } end
      return route.pattern, json_error(400, "invalid body", { errors = list })
    end
    req.value = v
  end
  local res = { pcall(route.fn, req, unpack(params)) }
  if not res[1] then
    sched.error()
    util.log("error", ("http %s %s failed (request id %s, %s): %s"):format(req.method, path,
      req.id, route.where, tostring(res[2])), nil, util.err_where(res[2]) or route.where, tostring(res[2]))
    return route.pattern, json_error(500, "internal error", { request_id = req.id })
  end
  if getmetatable(res[2]) == SSE then
    stream(req, res[2])
    return route.pattern, "stream"
  end
  return route.pattern, render(req, route, res[2], res[3], res[4])
end

-- Request ids: the client's X-Request-Id when it is a plain token (so a
-- request is traced across services), else one generated here: a prefix
-- drawn once per process and the server's request counter, in hex.
local id_prefix
local function request_id(req)
  local given = req.headers["x-request-id"]
  if given and #given <= 128 and given:match("^[%w%-_.:/+=@]+$") then return given end
  if not id_prefix then
    local f = io.open("/dev/urandom", "rb")
    local bytes = f and f:read(4) or tostring(os.time())
    if f then f:close() end
    id_prefix = ("%02x%02x%02x%02x"):format(bytes:byte(1, 4))
  end
  return ("%s%08x"):format(id_prefix, req.id % 4294967296)
end

function M._dispatch(req)
  setmetatable(req, Request)
  req.id = request_id(req)
  local ok, route_name, status, headers, body = pcall(handle, req)
  if not ok then
    log.write("error", ("http %s %s failed (request id %s): %s"):format(req.method, req.target, req.id, tostring(route_name)))
    route_name, status, headers, body = "-", json_error(500, "internal error", { request_id = req.id })
  end
  if status == "stream" then
    observe(route_name, 200, req.t0)
    return
  end
  headers["X-Request-Id"] = tostring(req.id)
  observe(route_name, status, req.t0)
  return status, headers, body
end

-- osara.testing swaps this version's routes and server for its own set
-- ({ routes =, server = }) and back; it returns the previous set. While a
-- set is swapped in, routes and osara.http{} start no server.
function M._capture(state)
  local old = { routes = routes, server = server, capturing = capturing }
  routes, server = state.routes or {}, state.server
  capturing = state.capturing == nil or state.capturing
  return old
end

-- osara.http(opts) starts the server (also started by the first route).
setmetatable(M, { __call = function(_, opts) return start_server(opts) end })

return M
