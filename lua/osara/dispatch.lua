-- osara.dispatch: the handler path every transport shares (Kafka, NATS,
-- later AMQP): decode with the handler's codec, validate with its schema,
-- call the user function, classify failures. Transports do the I/O (ack,
-- commit, reply, publish outputs); this module does the rest once.
--
--   local h = dispatch.handler{ kind = "kafka", name = "orders",
--                               codec = "json", schema = S, fn = fn,
--                               where = "app.lua:12" }
--   local ok, a, b, c = h:call(msg)   -- inside the entry's coroutine
--     ok == true:  a, b, c are fn's return values
--     ok == false: a = "decode" | "schema" | "handler", b = message
--
-- msg.raw holds the payload bytes; call sets msg.value (decoded, and
-- validated with defaults applied when a schema is given).
local codec = require "osara.codec"
local metrics = require "osara.metrics_c"
local sched = require "osara.sched_c"
local util = require "osara.util"
local middleware = require "osara.middleware"
-- "runaway" | "timeout" when a limit raised the last error (sched_limits.c)
local interrupted = sched.interrupted

local M = {}
-- osara.testing sets on_return(...) to see what a handler returned; the
-- transports' runners call it after a successful call when it is set.
M.on_return = nil
local Handler = {}
Handler.__index = Handler

function M.handler(spec)
  assert(type(spec.fn) == "function", "handler function required")
  local h = setmetatable({
    kind = spec.kind or "handler",
    name = spec.name or "?",
    codec = codec.get(spec.codec),
    schema = spec.schema,
    fn = spec.fn,
    where = spec.where or "?",
    labels = { kind = spec.kind or "handler", name = spec.name or "?" },
  }, Handler)
  return h
end

-- The one place bad input is reported: one line naming what and why, and a
-- counter osara_bad_input_total{kind,name,reason}. A message sent to a dead
-- letter is a warning naming it; otherwise an error.
function M.bad_input(kind, name, reason, what, message, dead_letter, attempts)
  sched.fail() -- the entry failed: osara_<transport>_failed_total, not handled
  metrics.add("osara_bad_input_total", { kind = kind, name = name, reason = reason },
    "messages that failed to decode, validate or be handled")
  local after = attempts and attempts > 1 and (" after %d attempts"):format(attempts) or ""
  local at = util.err_where(message)
  if dead_letter then
    util.log("warn", ("%s %s: %s failed at %s%s, sent to the dead letter %s: %s"):format(
      kind, name, reason, what or "?", after, dead_letter, message), nil, at, message)
    return
  end
  util.log("error", ("%s %s: %s failed at %s%s: %s"):format(
    kind, name, reason, what or "?", after, message), nil, at, message)
end

local function call_fn(fn, msg)
  return pcall(fn, msg)
end

-- decode(msg) -> true | false, reason, message [, errors: {{path=, message=}}]
function Handler:decode(msg)
  local v, err = self.codec.decode(msg.raw)
  if v == nil and err ~= nil then
    return false, "decode", err
  end
  if self.schema then
    local ok, errs = self.schema:validate(v)
    if ok == nil then
      local text = type(errs) == "table" and (errs.text or table.concat((function()
        local out = {}
        for i, e in ipairs(errs) do
          out[i] = type(e) == "table" and ((e.path or "") .. ": " .. tostring(e.message)) or tostring(e)
        end
        return out
      end)(), "; ")) or tostring(errs)
      local list = {}
      for i, e in ipairs(type(errs) == "table" and errs or {}) do
        list[i] = type(e) == "table" and { path = e.path, message = e.message } or { message = tostring(e) }
      end
      return false, "schema", text, list
    end
    v = ok
  end
  msg.value = v
  return true
end

function Handler:call(msg)
  local ok, reason, err = self:decode(msg)
  if not ok then
    return false, reason, err
  end
  local res = { call_fn(self.fn, msg) }
  if not res[1] then
    return false, interrupted() or "handler", tostring(res[2])
  end
  return true, res[2], res[3], res[4]
end

-- encode(value) -> bytes | nil, err, with this handler's codec.
function Handler:encode(v)
  return self.codec.encode(v)
end

-- iterator(register, what) -> the consumer iterator of kafka:stream and
-- nats:stream: `for msg in it do ... end` inside a task. register(fn)
-- registers fn as the handler; each message's handler stays parked until
-- the loop asks for the next message, so the input is settled (a Kafka
-- offset committed) only then, and the transport's own bounds (max in
-- flight) bound what waits here. it:close() lets every held message go and
-- ends the loop (a loop left with `break` otherwise holds its last message).
function M.iterator(register, what)
  local sched = require "osara.sched_c"
  local queue, waiting, current, closed = {}, nil, nil, false
  local function release(e) sched.wake(e.token, e.seq) end
  local function wake_loop()
    if waiting then
      local w = waiting
      waiting = nil
      sched.wake(w[1], w[2])
    end
  end
  register(function(msg)
    if closed then return end
    local token, s = sched.current()
    queue[#queue + 1] = { msg = msg, token = token, seq = s }
    wake_loop()
    sched.park()
  end)
  local function next_msg()
    if current then
      release(current)
      current = nil
    end
    while #queue == 0 do
      if closed then return nil end
      local token, s = sched.current()
      if not token then error(what .. ": iterate inside a task", 2) end
      waiting = { token, s }
      sched.park()
    end
    current = table.remove(queue, 1)
    return current.msg
  end
  local function close()
    closed = true
    if current then release(current) current = nil end
    for _, e in ipairs(queue) do release(e) end
    queue = {}
    wake_loop()
  end
  return setmetatable({}, { __call = next_msg, __index = { close = close } })
end

-- ---- failure policy --------------------------------------------------------------
--
-- One policy for every transport (issue 13): retry with backoff inside the
-- message's coroutine, then a dead letter, on_failure, and filters.
--
--   local p = dispatch.policy { kind = "kafka", name = topic, opts = opts,
--     origin = function(msg) return "orders/2/17" end,  -- osara-origin
--     where = function(msg) return "orders[2]@17" end,   -- log lines
--     dead_letter = function(msg, headers) end,          -- sends; raises if not delivered
--     before_retry = function(msg) end,                  -- optional
--     to_retry_topic = function(msg, err, wait) end }    -- optional: moves a
--       failed msg on instead of retrying in place; raises if not delivered
--   if p:decode(h, msg) then
--     local ok, a, b = p:call(msg, fn, emit)  -- ok == false: filtered or failure taken
--   end
--
-- A failure taken: with a dead letter, it is sent (and delivered, or the
-- transport's dead_letter raises and the input stays unsettled) and logged
-- as a warning; without one, one error line. Both count in
-- osara_bad_input_total; then on_failure(msg, err, attempts) runs once.

local RETRY_DEFAULTS = { max = 3, backoff = 0.1, max_backoff = 30, jitter = 0.2 }
local NO_RETRY = { max = 0, backoff = 0, max_backoff = 0, jitter = 0 }

-- The retry option as a table: nil or true -> the defaults, false -> none.
local function retry_of(v)
  if v == false then return NO_RETRY end
  if v == nil or v == true then return RETRY_DEFAULTS end
  return require("osara.options").check("retry", v)
end

local Policy = {}
Policy.__index = Policy

function M.policy(spec)
  local opts = spec.opts or {}
  local dlq = opts.dlq
  if dlq == false then dlq = nil end
  return setmetatable({
    kind = spec.kind, name = spec.name, retry = retry_of(opts.retry), dlq = dlq,
    on_failure = opts.on_failure, filter = opts.filter,
    origin = spec.origin, where = spec.where, dead_letter = spec.dead_letter,
    before_retry = spec.before_retry, client = spec.client, to_retry_topic = spec.to_retry_topic,
    labels = { kind = spec.kind, name = spec.name },
    label = spec.kind .. " " .. spec.name,
  }, Policy)
end

-- seconds to wait before attempt n + 1: backoff * 2^(n-1), capped, jittered.
function Policy:delay(n)
  local r = self.retry
  local d = math.min(r.backoff * 2 ^ (n - 1), r.max_backoff)
  return math.max(0, d * (1 + r.jitter * (2 * math.random() - 1)))
end

local function now() return require("osara").now() end

-- The input's headers plus what the dead letter says about the failure.
local function dead_letter_headers(self, msg, reason, err)
  local headers = {}
  for k, v in pairs(msg.headers or {}) do headers[k] = v end
  headers["osara-error"] = err
  headers["osara-error-kind"] = reason
  headers["osara-attempts"] = tostring(msg.attempt or 1)
  headers["osara-first-failure"] = ("%.3f"):format(msg.first_failure)
  headers["osara-origin"] = self.origin(msg)
  return headers
end

-- fail(msg, reason, err) -> false, once the failure was taken (see above).
-- msg.failed = reason afterwards (a transport may answer a request with it).
function Policy:fail(msg, reason, err)
  msg.failed = reason
  msg.first_failure = msg.first_failure or now()
  local attempts = msg.attempt or 1
  if self.dlq then
    self.dead_letter(msg, dead_letter_headers(self, msg, reason, err))
  end
  M.bad_input(self.kind, self.name, reason, self.where(msg), err, self.dlq, attempts)
  if self.on_failure then
    local ok, cerr = pcall(self.on_failure, msg, err, attempts)
    if not ok then
      sched.error()
      util.log("error", ("%s %s: on_failure raised at %s: %s"):format(
        self.kind, self.name, self.where(msg), tostring(cerr)), nil, util.err_where(cerr), tostring(cerr))
    end
  end
  return false
end

-- decode(h, msg) -> true | false (the failure taken: retrying cannot fix it).
-- A schema failure leaves its list in msg.invalid.
function Policy:decode(h, msg)
  self:enter(msg)
  local ok, reason, err, invalid = h:decode(msg)
  if ok then return true end
  msg.invalid = invalid
  return self:fail(msg, reason, err)
end

-- enter(msg): the log lines of this entry carry its handler, topic,
-- partition, offset or subject (JSON fields); once per message.
function Policy:enter(msg)
  if msg._handler == nil then
    msg._handler = self.label
    sched.set_context(msg)
  end
end

-- too_large(msg, max_bytes) -> true when msg.raw is over the limit (taken).
function Policy:too_large(msg, max_bytes)
  self:enter(msg)
  if #msg.raw <= max_bytes then return false end
  self:fail(msg, "too_large", ("%d bytes over the %d-byte limit (opts.max_bytes)"):format(#msg.raw, max_bytes))
  return true
end

-- retryable(err, msg) -> retry.on's answer (true without one); an on that
-- raises is logged and answers no.
function Policy:retryable(err, msg)
  local on = self.retry.on
  if not on then return true end
  local ok, yes = pcall(on, err, msg)
  if ok then return yes end
  sched.error()
  util.log("error", ("%s %s: retry.on raised at %s: %s"):format(
    self.kind, self.name, self.where(msg), tostring(yes)), nil, util.err_where(yes), tostring(yes))
  return false
end

-- retrying(msg, last, err) -> seconds before attempt msg.attempt + 1 (of
-- last), counted and logged as a warning.
function Policy:retrying(msg, last, err)
  local wait = self:delay(msg.attempt)
  metrics.add("osara_retries_total", self.labels, "handler calls retried after an error")
  util.log("warn", ("%s %s: handler failed at %s (attempt %d of %d, again in %.2f s): %s")
    :format(self.kind, self.name, self.where(msg), msg.attempt, last, wait, err), nil, util.err_where(err), err)
  return wait
end

-- invoke(fn, msg, emit) -> pcall's results, with osara.middleware around.
function Policy:invoke(fn, msg, emit)
  if not middleware.active() then return pcall(fn, msg, emit) end
  return middleware.call({ kind = self.kind, direction = "in", name = self.name, client = self.client, msg = msg },
                         fn, msg, emit)
end

-- after(msg, fn, emit, pcall results...): success passes fn's results on;
-- a failure is retried while the policy allows, else taken.
function Policy:after(msg, fn, emit, ok, ...)
  if ok then return true, ... end
  sched.error() -- every raise counts in osara_lua_errors_total, retried or not
  local err = tostring((...))
  msg.first_failure = msg.first_failure or now()
  local n, r = msg.attempt, self.retry
  -- a runaway would hold the loop again for each attempt: never retried
  local kind = interrupted()
  if kind == "runaway" or n > r.max or not self:retryable(err, msg) then
    return self:fail(msg, kind or "handler", err)
  end
  if self.to_retry_topic then -- Kafka's retry = { mode = "topic" }: the partition goes on
    local wait = self:delay(n)
    self.to_retry_topic(msg, err, wait) -- raises if not delivered: the input stays
    metrics.add("osara_retries_total", self.labels, "handler calls retried after an error")
    require("osara.log_c").write("warn", ("%s %s: handler failed at %s (attempt %d of %d), moved to the retry topic %s, due in %.2f s: %s")
      :format(self.kind, self.name, self.where(msg), n, r.max + 1, r.topic, wait, err))
    return false
  end
  local wait = self:retrying(msg, r.max + 1, err)
  if wait > 0 then require("osara").sleep(wait) end
  msg.attempt = n + 1
  if self.before_retry then self.before_retry(msg) end
  return self:after(msg, fn, emit, self:invoke(fn, msg, emit))
end

-- output_failed(msg) -> true when the failure was taken: an output of the
-- previous attempt was not delivered (msg.output_error, set by the
-- transport, which handles the input again). Retried like a handler error
-- while the policy allows; then the "output" failure is taken.
function Policy:output_failed(msg)
  local err = "output not delivered: " .. msg.output_error
  local tried = (msg.attempt or 2) - 1
  msg.first_failure = msg.first_failure or now()
  if tried <= self.retry.max and self:retryable(err, msg) then
    metrics.add("osara_retries_total", self.labels, "handler calls retried after an error")
    return false
  end
  msg.attempt = tried
  self:fail(msg, "output", err)
  return true
end

-- call(msg, fn, emit) -> true, fn's results | false (filtered out, or the
-- failure taken). Runs inside the message's coroutine (the backoff sleeps).
function Policy:call(msg, fn, emit)
  self:enter(msg)
  if not self:keep(msg) then return false end
  msg.attempt = msg.attempt or 1
  return self:after(msg, fn, emit, self:invoke(fn, msg, emit))
end

-- keep(msg) -> false when the filter skipped msg (counted) or raised (the
-- failure taken); true when the handler should see it.
function Policy:keep(msg)
  if not self.filter then return true end
  local ok, keep = pcall(self.filter, msg)
  if not ok then
    sched.error()
    return self:fail(msg, "handler", "filter: " .. tostring(keep))
  end
  if not keep then
    metrics.add("osara_filtered_total", self.labels, "messages a handler's filter skipped")
    msg.skipped = "filtered"
    return false
  end
  return true
end

-- For a broker that redelivers a failed message itself (JetStream's nak
-- with a delay), one call per delivery, msg.attempt set by the broker:
-- redeliver(msg, err, max_attempts) -> the delay before the next attempt,
-- or nil once the failure was taken (the last attempt, or retry.on said
-- no). max_attempts caps retry.max + 1 (JetStream's max_deliver).
function Policy:redeliver(msg, err, max_attempts)
  msg.first_failure = msg.first_failure or now()
  local last = math.min(self.retry.max + 1, max_attempts or math.huge)
  if msg.attempt >= last or not self:retryable(err, msg) then
    self:fail(msg, "handler", err)
    return nil
  end
  return self:retrying(msg, last, err)
end

return M
