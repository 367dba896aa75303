-- osara.nats: NATS clients, handlers, publish, request/reply (panini's API
-- as Lua). C (host/nats/natsio.c) owns the connection; see docs/nats.md.
local util = require "osara.util"
local where, signature = util.where, util.signature
local natsio = require "osara.natsio_c"
local vm_c = require "osara.vm_c"
local codec = require "osara.codec"
local dispatch = require "osara.dispatch"
local sched = require "osara.sched_c"
local options = require "osara.options"

local M = {}
local Client = {}
Client.__index = Client

-- The outputs of the handler call running in a coroutine (guard_outputs):
-- the first publish nats.c refused and the JetStream publishes whose ack
-- is still to come.
local outputs_of = setmetatable({}, { __mode = "k" })


-- Subjects: tokens separated by dots, no whitespace, no empty token;
-- wildcards only as whole tokens ("*" anywhere, ">" last) when allowed.
local function check_subject(subject, wildcards, level)
  local bad
  if type(subject) ~= "string" or subject == "" then
    bad = "a subject must be a non-empty string"
  elseif subject:find("[%s%c]") then
    bad = "whitespace or control characters"
  else
    local tokens = {}
    for t in (subject .. "."):gmatch("([^.]*)%.") do tokens[#tokens + 1] = t end
    for i, t in ipairs(tokens) do
      if t == "" then bad = "empty token" break end
      if (t:find("[*>]") and (#t > 1 or not wildcards)) or (t == ">" and i ~= #tokens) then
        bad = "misplaced wildcard"
        break
      end
    end
  end
  if bad then
    options.raise(("nats: invalid subject %q (%s)"):format(tostring(subject), bad))
  end
end


-- osara.nats{servers=, name=, user=, password=, token=, creds=, tls=, ca=}
local function new(conf)
  local c = options.check("osara.nats", conf)
  if type(c.servers) == "table" then c.servers = table.concat(c.servers, ",") end
  c.servers = os.getenv("OSARA_NATS_SERVERS") or c.servers
  local key = signature(c)
  local ok, client = pcall(natsio.client, c, key, vm_c.mode() == "check")
  if not ok then
    options.raise(tostring(client):gsub("^[^:]*:%d+: ", ""))
  end
  -- key: a handler follows its client; a reload that changes the client
  -- restarts the client's handlers on the new connection.
  if vm_c.mode() ~= "check" then
    require("osara.health").add("nats " .. client:url(), function() return client:health() end)
  end
  return setmetatable({ c = client, key = key, checking = vm_c.mode() == "check" }, Client)
end

setmetatable(M, { __call = function(_, conf) return new(require("osara.config").resolve("nats", conf)) end })

function Client:url()
  return self.c:url()
end

-- An encode failure is the caller's misuse: it raises at the call site.
local function encode(value, c, what)
  local bytes, err = codec.get(c).encode(value)
  if bytes == nil then options.raise(what .. ": cannot encode: " .. tostring(err)) end
  return bytes
end

-- nats:publish(subject, value, {headers=, reply_to=, codec=}) -> true | nil, err
function Client:publish(subject, value, opts)
  check_subject(subject, false, 2)
  opts = options.check("nats:publish", opts)
  local bytes = encode(value, opts.codec, "nats:publish")
  if self.checking then
    local testing = package.loaded["osara.testing"]
    return testing and testing.record_send(subject, value, opts) or true
  end
  local ok, err = self.c:publish(subject, bytes, opts.reply_to, opts.headers)
  if not ok then
    local o = outputs_of[coroutine.running()]
    if o and not o.failed then o.failed = err end
  end
  return ok, err
end

-- Messages: msg.value is the decoded payload, as on every transport;
-- msg.data, NATS's old name for it, still reads it for one release, with a
-- warning naming the line that used it.
local Msg = {
  __index = function(msg, k)
    if k == "data" then
      options.deprecated("msg.data", "msg.value")
      return rawget(msg, "value")
    end
  end,
}

-- nats:request(subject, value, {timeout=, headers=, codec=}) -> msg | nil, err
-- msg.value is the decoded reply; err is "timeout", "no responders" or,
-- when the responder's handler failed, "<kind>: <error>" (e.g. "handler:
-- internal error") with the error reply (its JSON body decoded) third.
function Client:request(subject, value, opts)
  check_subject(subject, false, 2)
  opts = options.check("nats:request", opts)
  local c = codec.get(opts.codec)
  local msg, err = self.c:request(subject, encode(value, c, "nats:request"), opts.timeout, opts.headers)
  if not msg then return nil, err end
  local failed = msg.headers["osara-error"]
  if failed then
    msg.value = codec.get("json").decode(msg.raw)
    return nil, ("%s: %s"):format(tostring(msg.headers["osara-error-kind"]), failed), setmetatable(msg, Msg)
  end
  local v, derr = c.decode(msg.raw)
  if v == nil and derr then return nil, derr end
  msg.value = v
  return setmetatable(msg, Msg)
end

-- The (msg, emit) half every transport shares: emit(value, publish_opts)
-- publishes to the handler's sink subjects; a handler's return values go
-- to msg.reply when the message has one, else to the sinks.
local function make_outputs(self, subject, sink)
  local sinks = type(sink) == "string" and { sink } or sink
  for _, s in ipairs(sinks or {}) do check_subject(s, false, 3) end
  local function emit(value, publish_opts)
    if not sinks then error("emit: this handler has no sink (opts.sink)", 2) end
    for i = 1, #sinks do
      local ok, err = self:publish(sinks[i], value, publish_opts)
      if not ok then return nil, err end
    end
    return true
  end
  -- Results of a message without msg.reply, published to the sinks;
  -- raises when one cannot be encoded or published.
  local function results(msg, ...)
    if not sinks or msg.reply then return end
    for i = 1, select("#", ...) do
      local v = select(i, ...)
      if v ~= nil then assert(emit(v)) end
    end
  end
  return emit, results
end

-- fn(msg, emit) wrapped so that its outputs fail its call, and so take the
-- failure policy, instead of vanishing: a publish nats.c refused (its
-- reconnect buffer full, the connection closed) even when the handler let
-- the nil, err go; a JetStream publish whose ack does not come (awaited
-- here); a return value for the sinks (published here) that cannot be
-- published.
local function guard_outputs(fn, results)
  local function finish(co, o, msg, ok, ...)
    local err = not ok and (...) or nil
    if ok then ok, err = pcall(results, msg, ...) end
    outputs_of[co] = nil
    if not ok then error(err, 0) end
    for _, r in ipairs(o.pending) do
      local seq, err = r:wait()
      if not seq and not o.failed then o.failed = err end
    end
    if o.failed then error("an output was not published: " .. tostring(o.failed), 0) end
    return ...
  end
  return function(msg, emit)
    local co = coroutine.running()
    local o = { pending = {} }
    outputs_of[co] = o
    return finish(co, o, msg, pcall(fn, msg, emit))
  end
end

local function subject_of(msg) return msg.subject end

-- The dead letter of a failed message: its payload and headers plus the
-- policy's osara-* headers, published to the dlq subject; raises when the
-- publish is refused.
function Client:_dead_letter(dlq, msg, headers)
  if self.checking then
    local testing = package.loaded["osara.testing"]
    if testing then testing.record_send(dlq, msg.raw, { headers = headers, dead_letter = true }) end
    return
  end
  local ok, err = self.c:publish(dlq, msg.raw, nil, headers)
  if not ok then
    error(("nats %s: dead letter to %s not published: %s"):format(msg.subject, dlq, tostring(err)), 0)
  end
end

-- The answer to a request whose handler failed, as HTTP's 400/500: the
-- osara-error and osara-error-kind headers and a JSON body naming the kind,
-- never the handler's error text.
local ERROR_BODIES = {
  decode = function(msg) return { error = "invalid body", kind = "decode" } end,
  schema = function(msg) return { error = "invalid body", kind = "schema", errors = msg.invalid } end,
  too_large = function(msg) return { error = "payload too large", kind = "too_large" } end,
}
local function error_reply(self, msg)
  local kind = msg.failed or "handler"
  local body = (ERROR_BODIES[kind] or function() return { error = "internal error", kind = kind } end)(msg)
  local headers = { ["osara-error"] = body.error, ["osara-error-kind"] = kind }
  if self.checking then
    local testing = package.loaded["osara.testing"]
    if testing then testing.record_send(msg.reply, body, { reply = true, headers = headers }) end
    return
  end
  local ok, err = self.c:reply(msg.reply, codec.get("json").encode(body), nil, headers)
  if not ok then
    require("osara.log_c").write("error", ("nats %s: error reply not sent: %s"):format(msg.subject, tostring(err)))
  end
end

-- Builds the function C calls for each message of one subscription.
local function make_runner(self, subject, opts, fn, at)
  local h = dispatch.handler { kind = "nats", name = subject, codec = opts.codec,
                               schema = opts.schema, fn = fn, where = at }
  local max_bytes = opts.max_bytes
  local reply_empty = opts.reply_empty
  local emit, results = make_outputs(self, subject, opts.sink)
  local call = guard_outputs(fn, results)
  local policy = dispatch.policy { kind = "nats", name = subject, opts = opts, client = self,
    where = subject_of, origin = subject_of,
    dead_letter = opts.dlq and function(msg, headers) self:_dead_letter(opts.dlq, msg, headers) end }
  return function(msg)
    setmetatable(msg, Msg)
    if policy:too_large(msg, max_bytes) or not policy:decode(h, msg) then
      if msg.reply then error_reply(self, msg) end
      return
    end
    local res = { policy:call(msg, call, emit) }
    if not res[1] then -- filtered, or the failure policy took it
      if msg.reply and msg.failed then error_reply(self, msg) end
      return
    end
    if dispatch.on_return then dispatch.on_return(unpack(res, 2, table.maxn(res))) end
    if msg.reply and (res[2] ~= nil or reply_empty) then
      local bytes = res[2] == nil and "" or h:encode(res[2])
      if bytes == nil then
        dispatch.bad_input("nats", subject, "encode", msg.subject, "cannot encode the reply")
        return
      end
      if self.checking then
        local testing = package.loaded["osara.testing"]
        if testing then testing.record_send(msg.reply, res[2], { reply = true }) end
      else
        local ok, err = self.c:reply(msg.reply, bytes)
        if not ok then -- the requester times out: say why here
          require("osara.log_c").write("error", ("nats %s: reply not sent: %s"):format(msg.subject, tostring(err)))
        end
      end
    end
  end
end

-- nats:handle(subject, [opts,] fn): fn(msg, emit) -> the reply (when
-- msg.reply is set) or values for opts.sink. opts: the "nats:handle" table
-- in osara.option_tables.
function Client:handle(subject, opts, fn)
  if fn == nil and type(opts) == "function" then opts, fn = nil, opts end
  opts = options.check("nats:handle", opts)
  check_subject(subject, true, 2)
  if type(fn) ~= "function" then options.raise("nats:handle: expected a handler function") end
  local at = options.user_where()
  if opts.dlq then check_subject(opts.dlq, false, 2) end
  local docs = require "osara.docs"
  docs.note { transport = "nats", server = self.c:url(), address = subject, action = "receive",
              schema = opts.schema, codec = opts.codec, where = at }
  for _, to in ipairs(type(opts.sink) == "string" and { opts.sink } or opts.sink or {}) do
    docs.note { transport = "nats", server = self.c:url(), address = to, action = "send",
                codec = opts.codec, where = at }
  end
  if opts.durable then
    return self:_durable(subject, opts, fn, at)
  end
  local key = subject .. (opts.queue and (" (queue " .. opts.queue .. ")") or "")
  -- what the subscription uses needs a restart; the rest (codec, schema,
  -- retry, dlq, sink...) lives in the runner: changed, it is updated in place
  local SUBSCRIPTION = { max_inflight = true, max_waiting = true, pending_msgs = true,
                         pending_bytes = true, queue = true }
  local sig = signature { client = self.key, max_inflight = opts.max_inflight,
                          max_waiting = opts.max_waiting, pending_msgs = opts.pending_msgs,
                          pending_bytes = opts.pending_bytes }
    .. util.SIG_OPTIONS .. util.options_signature(opts, SUBSCRIPTION)
  local detail = ("%s%scodec %s%s"):format(opts.queue and ("queue " .. opts.queue) or "",
    opts.queue and ", " or "", type(opts.codec) == "table" and "custom" or tostring(opts.codec or "json"),
    opts.schema and ", schema" or "")
  vm_c.register("nats", key, sig, make_runner(self, subject, opts, fn, at),
    { client = self.c, subject = subject, queue = opts.queue, max_inflight = opts.max_inflight,
      max_waiting = opts.max_waiting, pending_msgs = opts.pending_msgs,
      pending_bytes = opts.pending_bytes, codec = opts.codec, fn = fn },
    at, detail)
end

-- nats:add_stream{name=, subjects={...}, retention="limits"|"workqueue"|"interest",
--                 max_age=seconds, max_msgs=, storage="file"|"memory"}: creates
-- the JetStream stream, or updates it (idempotent), off the loop. At load
-- -> true at once (the outcome is logged; retried while the server is not
-- there yet); inside a handler or task -> true | nil, err once done.
function Client:add_stream(cfg)
  cfg = options.check("nats:add_stream", cfg)
  for _, s in ipairs(cfg.subjects) do check_subject(s, true, 2) end
  if self.checking then return true end
  local ok, res, err = pcall(self.c.stream, self.c, cfg)
  if not ok then options.raise(tostring(res):gsub("^[^:]*:%d+: ", "")) end
  return res, err
end

-- nats:stream(subject, opts) -> iterator for `for msg in s do ... end` in a
-- task, as kafka:stream: each message's handler call ends when the loop asks
-- for the next one (so max_inflight bounds what waits). Takes nats:handle's
-- options. The old nats:stream{name=, subjects=} (creating a JetStream
-- stream) still works for one release, with a warning: use nats:add_stream.
function Client:stream(subject, opts)
  if type(subject) == "table" then
    options.deprecated("nats:stream{name=, subjects=}", "nats:add_stream{name=, subjects=}")
    return self:add_stream(subject)
  end
  opts = options.check("nats:stream", opts)
  return dispatch.iterator(function(fn) self:handle(subject, opts, fn) end, "nats stream")
end

-- nats:jspublish(subject, value, {codec=, headers=}) -> handle; handle:wait() yields
-- until the stream acknowledged: its sequence number, or nil, err.
function Client:jspublish(subject, value, opts)
  check_subject(subject, false, 2)
  opts = options.check("nats:jspublish", opts)
  local bytes = encode(value, opts.codec, "nats:jspublish")
  if self.checking then
    local testing = package.loaded["osara.testing"]
    if testing then testing.record_send(subject, value, { jetstream = true, headers = opts.headers }) end
    return { wait = function() return 0 end }
  end
  local r = self.c:jspublish(subject, bytes, opts.headers)
  local o = outputs_of[coroutine.running()]
  if o then o.pending[#o.pending + 1] = r end
  return r
end

-- Where a JetStream message came from: "<stream>/<sequence>/<subject>"
-- (osara-origin of its dead letter, as Kafka's topic/partition/offset).
local function js_place(msg)
  return ("%s/%s/%s"):format(tostring(msg.stream), tostring(msg.seq), msg.subject)
end

-- The dead letter of a failed JetStream message: stored by JetStream (the
-- dlq subject must belong to a stream) before the input is terminated;
-- raises when the stream did not acknowledge it, so the input is nak'ed
-- and comes back.
function Client:_js_dead_letter(dlq, msg, headers)
  if self.checking then return self:_dead_letter(dlq, msg, headers) end
  local seq, err = self.c:jspublish(dlq, msg.raw, headers):wait()
  if not seq then
    error(("nats %s: dead letter to %s not stored (is %s in a stream?): %s"):format(
      js_place(msg), dlq, dlq, tostring(err)), 0)
  end
end

-- The failure policy of a JetStream consumer: the server redelivers, so
-- each delivery is one handler call; a failure naks with the policy's
-- backoff until the last attempt (retry.max + 1, capped by max_deliver),
-- which takes the failure (dead letter, on_failure) and terminates.
-- nak_delay, the old fixed delay, is a constant backoff.
local function js_policy(self, subject, opts)
  if opts.nak_delay ~= nil then
    if opts.retry ~= nil then
      options.raise("nats:handle: nak_delay and retry together: set retry.backoff instead")
    end
    opts.retry = { backoff = opts.nak_delay, max_backoff = opts.nak_delay, jitter = 0 }
  end
  return dispatch.policy { kind = "nats", name = subject, opts = opts, client = self,
    where = js_place, origin = js_place,
    dead_letter = opts.dlq and function(msg, headers) self:_js_dead_letter(opts.dlq, msg, headers) end }
end

-- A durable pull consumer: the runner returns "ok" (ack), "nak", delay
-- (redelivered after delay seconds) or "term" (the failure was taken:
-- never redelivered). A runner that raises (a dead letter not stored)
-- leaves the message to be redelivered.
function Client:_durable(subject, opts, fn, at)
  local h = dispatch.handler { kind = "nats", name = subject, codec = opts.codec,
                               schema = opts.schema, fn = fn, where = at }
  local emit, results = make_outputs(self, subject, opts.sink)
  local call = guard_outputs(fn, results)
  local policy = js_policy(self, subject, opts)
  local max_bytes, max_deliver = opts.max_bytes, opts.max_deliver
  -- msg.first_failure across redeliveries to this script version, by
  -- stream sequence; bounded, as another instance may take the message.
  local first_failures, tracked = {}, 0
  local function settled(msg, ...)
    if first_failures[msg.seq] then first_failures[msg.seq], tracked = nil, tracked - 1 end
    return ...
  end
  local runner = function(msg)
    setmetatable(msg, Msg)
    msg.reply = nil -- JetStream's ack subject: C acks; results go to the sinks
    msg.first_failure = first_failures[msg.seq]
    if policy:too_large(msg, max_bytes) or not policy:decode(h, msg) then
      return settled(msg, "term")
    end
    if not policy:keep(msg) then
      return settled(msg, msg.skipped and "ok" or "term")
    end
    local res = { policy:invoke(call, msg, emit) }
    if not res[1] then
      sched.error()
      local delay = policy:redeliver(msg, tostring(res[2]), max_deliver)
      if delay == nil then return settled(msg, "term") end
      if not first_failures[msg.seq] then
        if tracked >= 100000 then first_failures, tracked = {}, 0 end
        first_failures[msg.seq], tracked = msg.first_failure, tracked + 1
      end
      return "nak", delay
    end
    if dispatch.on_return then dispatch.on_return(unpack(res, 2, table.maxn(res))) end
    return settled(msg, "ok")
  end
  local key = ("%s (durable %s)"):format(subject, opts.durable)
  local sig = signature { client = self.key,
                          codec = type(opts.codec) == "table" and "custom" or opts.codec,
                          schema = opts.schema ~= nil, stream = opts.stream, batch = opts.batch,
                          ack_wait = opts.ack_wait,
                          sink = type(opts.sink) == "table" and table.concat(opts.sink, ",") or opts.sink }
  vm_c.register("nats-durable", key, sig, runner,
    { client = self.c, subject = subject, durable = opts.durable, stream = opts.stream,
      batch = opts.batch, ack_wait = opts.ack_wait, codec = opts.codec, fn = fn },
    at, ("stream %s, durable %s"):format(tostring(opts.stream), opts.durable))
end

-- For tests: wait until the server processed what was sent (inside a
-- handler, timer or task; at load it raises rather than block the loop).
function Client:flush(timeout)
  return self.c:flush(timeout)
end

M.check_subject = check_subject
-- osara.middleware around every outgoing message (handler outputs too)
local middleware = require "osara.middleware"
Client.publish = middleware.publish("nats", Client.publish)
Client.request = middleware.publish("nats", Client.request)

return M
