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
-- counter osara_bad_input_total{kind,name,reason}.
function M.bad_input(kind, name, reason, what, message)
  metrics.add("osara_bad_input_total", { kind = kind, name = name, reason = reason },
    "messages that failed to decode, validate or be handled")
  require("osara.log_c").write("error", ("%s %s: %s failed at %s: %s"):format(
    kind, name, reason, what or "?", message))
end

local function call_fn(fn, msg)
  return pcall(fn, msg)
end

-- decode(msg) -> true | false, reason, message
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
      return false, "schema", text
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
    return false, "handler", tostring(res[2])
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

return M
