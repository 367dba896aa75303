-- osara.amqp: RabbitMQ (AMQP 0-9-1) clients, handlers and publishes
-- (micro_framework's EventListener and Producer as Lua). C (host/amqp)
-- owns the connection and its thread; see docs/amqp.md.
local util = require "osara.util"
local signature = util.signature
local amqp_c = require "osara.amqp_c"
local vm_c = require "osara.vm_c"
local codec = require "osara.codec"
local dispatch = require "osara.dispatch"
local options = require "osara.options"

local M = {}
local Client = {}
Client.__index = Client

local CONTENT_TYPES = { json = "application/json", msgpack = "application/msgpack" }

-- osara.amqp{url=, service=, prefetch=}
local function new(conf)
  local c = options.check("osara.amqp", conf)
  c.url = os.getenv("OSARA_AMQP_URL") or c.url
  local key = signature { url = c.url, prefetch = c.prefetch }
  local checking = vm_c.mode() == "check"
  local ok, client = pcall(amqp_c.client, { url = c.url, prefetch = c.prefetch }, key, checking)
  if not ok then
    options.raise(tostring(client):gsub("^[^:]*:%d+: ", ""))
  end
  -- key: a handler follows its client; a reload that changes the client
  -- restarts the client's handlers on the new connection.
  return setmetatable({ c = client, key = key, service = c.service, checking = checking }, Client)
end

setmetatable(M, { __call = function(_, conf) return new(require("osara.config").resolve("amqp", conf)) end })

function Client:url()
  return self.c:url()
end

local function record(where, value, meta)
  local testing = package.loaded["osara.testing"]
  return testing and testing.record_send(where, value, meta) or true
end

-- amqp:publish(exchange, routing_key, value, opts) -> true | nil, err.
-- With confirm (the default) it yields until the broker confirmed.
function Client:publish(exchange, routing_key, value, opts)
  if type(exchange) ~= "string" then options.raise("amqp:publish: exchange must be a string") end
  if type(routing_key) ~= "string" then options.raise("amqp:publish: routing_key must be a string") end
  opts = options.check("amqp:publish", opts)
  for k, v in pairs(opts.headers or {}) do
    local t = type(v)
    if type(k) ~= "string" or (t ~= "string" and t ~= "number" and t ~= "boolean") then
      options.raise(("amqp:publish: header %s must be a string, number or boolean, got %s"):format(tostring(k), t))
    end
  end
  local c = codec.get(opts.codec)
  local bytes, err = c.encode(value)
  if bytes == nil then options.raise("amqp:publish: cannot encode: " .. tostring(err)) end
  if self.checking then
    return record(exchange .. "/" .. routing_key, value, opts)
  end
  return self.c:publish(exchange, routing_key, bytes, {
    headers = opts.headers, persistent = opts.persistent, confirm = opts.confirm,
    timeout = opts.timeout,
    declare = opts.declare and exchange ~= "" and opts.exchange_type or nil,
    expiration = opts.expiration and tostring(math.floor(opts.expiration * 1000)) or nil,
    content_type = opts.content_type or CONTENT_TYPES[c.name],
    correlation_id = opts.correlation_id, reply_to = opts.reply_to, message_id = opts.message_id,
  })
end

-- amqp:event(name, value, opts) -> true | nil, err: micro_framework's
-- Producer(name, value): to the exchange named after this service, with
-- the routing key `name`, stamped with an `x-service` header.
function Client:event(name, value, opts)
  if not self.service then
    options.raise("amqp:event: this client has no service name (osara.amqp{ service = ... })")
  end
  opts = opts or {}
  local headers = {}
  for k, v in pairs(opts.headers or {}) do headers[k] = v end
  headers["x-service"] = self.service
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  o.headers = headers
  return self:publish(self.service, name, value, o)
end

local function where_of(msg)
  return ("%s/%s (queue %s)"):format(msg.exchange, msg.routing_key, tostring(msg.queue))
end

-- The dead letter of a failed message: its payload and headers plus the
-- policy's osara-* headers, to the dlq queue; raises unless confirmed (the
-- input then goes back to its queue).
function Client:_dead_letter(dlq, msg, headers)
  if self.checking then
    return record(dlq, msg.raw, { headers = headers, dead_letter = true })
  end
  local clean = {}
  for k, v in pairs(headers) do
    if type(v) ~= "table" then clean[k] = v end -- x-death stays behind
  end
  local ok, err = self.c:publish("", dlq, msg.raw, { headers = clean, persistent = true, confirm = true })
  if not ok then
    error(("amqp %s: dead letter to %s not confirmed: %s"):format(where_of(msg), dlq, tostring(err)), 0)
  end
end

-- A retry through the broker: the message waits `wait` seconds in its
-- queue's retry queue, then comes back with one more x-death count.
function Client:_retry_later(msg, wait)
  if self.checking then return record(tostring(msg.queue) .. ".retry", msg.raw, { retry = wait }) end
  local ok, err = self.c:retry(math.floor(wait * 1000 + 0.5))
  if not ok then
    error(("amqp %s: retry not confirmed: %s"):format(where_of(msg), tostring(err)), 0)
  end
end

local function retries(opts)
  if opts.retry == false then return false end
  return type(opts.retry) ~= "table" or (opts.retry.max or 3) > 0
end

-- Builds the function C calls for each message of one consumer. The
-- handler gets (msg, event): event(name, value) is amqp:event.
local function make_runner(self, name, opts, fn, at)
  local h = dispatch.handler { kind = "amqp", name = name, codec = opts.codec,
                               schema = opts.schema, fn = fn, where = at }
  local max_bytes = opts.max_bytes
  local policy = dispatch.policy { kind = "amqp", name = name, opts = opts, client = self,
    where = where_of, origin = where_of,
    dead_letter = opts.dlq and function(msg, headers) self:_dead_letter(opts.dlq, msg, headers) end }
  local function event(ev, value, o) return self:event(ev, value, o) end
  -- One handler call per delivery: a failure goes back through the broker
  -- (the retry queue) while the policy allows, msg.attempt set from x-death.
  return function(msg)
    if policy:too_large(msg, max_bytes) or not policy:decode(h, msg) or not policy:keep(msg) then
      return
    end
    local res = { policy:invoke(fn, msg, event) }
    if not res[1] then
      local delay = policy:redeliver(msg, tostring(res[2]))
      if delay then self:_retry_later(msg, delay) end
      return
    end
    if dispatch.on_return then dispatch.on_return(unpack(res, 2, table.maxn(res))) end
  end
end

-- amqp:handle({exchange=, routing_key=, queue=, durable=, exchange_type=}, [opts,] fn)
-- fn(msg, event): msg.value, .raw, .headers, .exchange, .routing_key,
-- .queue, .attempt, .redelivered. The message is acknowledged once fn
-- returned and every publish it made was confirmed.
function Client:handle(binding, opts, fn)
  if fn == nil and type(opts) == "function" then opts, fn = nil, opts end
  binding = options.check("amqp:handle", binding)
  opts = options.check("amqp:handle.opts", opts)
  if type(fn) ~= "function" then options.raise("amqp:handle: expected a handler function") end
  local at = options.user_where()
  local name = binding.exchange .. "/" .. binding.routing_key
  require("osara.docs").note { transport = "amqp", server = self:url(), address = binding.exchange,
                               action = "receive", schema = opts.schema, codec = opts.codec, where = at }
  local key = name .. (binding.queue and (" (queue " .. binding.queue .. ")") or " (exclusive)")
  local retry_queue = retries(opts)
  local sig = signature { client = self.key, queue = binding.queue, durable = binding.durable,
                          exchange_type = binding.exchange_type,
                          codec = type(opts.codec) == "table" and "custom" or opts.codec,
                          schema = opts.schema ~= nil, max_inflight = opts.max_inflight,
                          prefetch = opts.prefetch, retry_queue = retry_queue,
                          dlq = opts.dlq or nil }
  local detail = ("%s, codec %s%s"):format(binding.queue and ("queue " .. binding.queue) or "exclusive queue",
    type(opts.codec) == "table" and "custom" or tostring(opts.codec or "json"), opts.schema and ", schema" or "")
  vm_c.register("amqp", key, sig, make_runner(self, name, opts, fn, at),
    { client = self.c, name = name, exchange = binding.exchange, exchange_type = binding.exchange_type,
      routing_key = binding.routing_key, queue = binding.queue, durable = binding.durable,
      max_inflight = opts.max_inflight, prefetch = opts.prefetch, retry_queue = retry_queue,
      dlq_queue = opts.dlq or nil, codec = opts.codec, fn = fn },
    at, detail)
end

-- osara.middleware around every outgoing message; ctx.name is
-- "exchange/routing_key"
local middleware = require "osara.middleware"
local publish = Client.publish
function Client.publish(client, exchange, routing_key, value, opts)
  if not middleware.active() then return publish(client, exchange, routing_key, value, opts) end
  return middleware.around_send("amqp", client, tostring(exchange) .. "/" .. tostring(routing_key), value, opts,
                                function(v, o) return publish(client, exchange, routing_key, v, o) end)
end

return M
