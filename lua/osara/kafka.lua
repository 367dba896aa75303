-- osara.kafka: Kafka clients, handlers, topics, request/reply and streams.
-- C (host/kafka/) owns the librdkafka handles, ordering, backpressure and
-- offsets; this module gives the API. See docs/kafka.md.
local util = require "osara.util"
local where, signature = util.where, util.signature
local kafka_c = require "osara.kafka_c"
local vm_c = require "osara.vm_c"
local sched = require "osara.sched_c"
local codec = require "osara.codec"
local dispatch = require "osara.dispatch"
local options = require "osara.options"

local M = {}
local defaults = {}

-- Outputs sent by each running handler, for the exactly-once path that
-- waits for them before committing state.
local outputs_of = setmetatable({}, { __mode = "k" })

-- osara settings that are not librdkafka properties.
local OWN = { ["osara.brokers"] = "brokers", ["osara.partitions"] = "partitions",
              ["osara.max_per_partition"] = "max_per_partition",
              ["osara.max_inflight"] = "max_inflight",
              ["osara.revoke_timeout_ms"] = "revoke_timeout_ms" }

-- Defaults tuned for a Lua consumer (PERF-LIMITS.md): a deep local queue so
-- fetching never stalls on librdkafka 2.0's queued.min.messages backoff.
local BASE = {
  ["auto.offset.reset"] = "earliest",
  ["enable.auto.commit"] = "true",
  ["auto.commit.interval.ms"] = "500",
  ["queued.min.messages"] = "1000000",
  ["enable.partition.eof"] = "false",
}


-- osara.kafka.defaults(conf): merged under every client's conf (slipstream's Conf).
function M.defaults(conf)
  if type(conf) ~= "table" then options.raise("osara.kafka.defaults: expected a table") end
  for k, v in pairs(options.check("osara.kafka.defaults", conf)) do
    defaults[k] = v
  end
  return defaults
end

-- OSARA_KAFKA_BOOTSTRAP_SERVERS=... overrides bootstrap.servers: any
-- librdkafka property, upper case with dots as underscores.
-- OSARA_KAFKA_PROPERTIES="a.b=1,c.d=2" sets several at once.
local function env_overrides(conf)
  local vars = vm_c.environ("OSARA_KAFKA_")
  local extra = vars.OSARA_KAFKA_PROPERTIES
  vars.OSARA_KAFKA_PROPERTIES = nil
  for name, v in pairs(vars) do
    conf[name:sub(#"OSARA_KAFKA_" + 1):lower():gsub("_", ".")] = v
  end
  if extra then
    for k, v in extra:gmatch("([^=,]+)=([^,]*)") do
      conf[k] = v
    end
  end
end

local function merged_conf(user)
  local conf = {}
  for k, v in pairs(BASE) do conf[k] = v end
  for k, v in pairs(defaults) do conf[k] = v end
  for k, v in pairs(user or {}) do conf[k] = v end
  env_overrides(conf)
  if conf["bootstrap.servers"] == nil or conf["bootstrap.servers"] == "" then
    conf["bootstrap.servers"] = "embedded"
  end
  if conf["group.id"] == nil then
    local script = vm_c.paths().script or "osara"
    conf["group.id"] = "osara-" .. (script:match("([^/]+)%.lua$") or "app")
  end
  local settings, lib = {}, {}
  for k, v in pairs(conf) do
    if OWN[k] then settings[OWN[k]] = tonumber(v) else lib[k] = tostring(v) end
  end
  return lib, settings
end


local Client = {}
Client.__index = Client

-- In check mode nothing is connected: osara.testing captures what would
-- have been sent.
local done_receipt = { wait = function() return true end }
local function capture(to, value, meta)
  local testing = package.loaded["osara.testing"]
  if testing then testing.record_send(to, value, meta) end
  return done_receipt
end
local Topic = {}
Topic.__index = Topic

-- Every send goes through here. librdkafka's local queue
-- (queue.buffering.max.messages) full is backpressure, never loss: inside
-- a coroutine the send waits until delivery reports make room, then
-- enqueues; elsewhere (at load) it returns nil, err.
local function produce(client, topic, bytes, key, headers, partition, want)
  while true do
    local r, err, full = client.c:produce(topic, bytes, key, headers, partition, want)
    if r or not full or not sched.current() then return r, err end
    if not client.c:wait_room() then return nil, err end -- the client closed
  end
end

-- osara.kafka(conf) -> client. conf: librdkafka properties, unchanged.
-- Unknown osara.* settings raise here; librdkafka checks its own
-- properties, and its message names the property.
local function new(user)
  local lib, settings = merged_conf(options.check("osara.kafka", user))
  settings.check = vm_c.mode() == "check"
  local key = signature(lib) .. "|" .. signature(settings)
  local ok, c = pcall(kafka_c.client, lib, key, settings)
  if not ok then
    options.raise("osara.kafka: " .. tostring(c):gsub("^[^:]*:%d+: ", ""):gsub("^kafka: ", ""))
  end
  local client = setmetatable({ c = c, key = key, conf = lib, group = lib["group.id"], topics = {},
                                checking = vm_c.mode() == "check",
                                pending = {}, reply_topics = {} }, Client)
  if not client.checking then
    require("osara.health").add("kafka " .. c:bootstrap(), function() return c:health() end)
  end
  return client
end

setmetatable(M, { __call = function(_, conf) return new(require("osara.config").resolve("kafka", conf)) end })

function Client:bootstrap()
  return self.c:bootstrap()
end

function Client:stats()
  return self.c:stats()
end

-- client:position(topic, partition) -> next offset that will be committed
-- (-1 before the first), inputs still held for the partition.
function Client:position(topic, partition)
  return self.c:position(topic, partition)
end

-- Embedded cluster only, for tests: fail the next n requests of an API
-- (0 = Produce, 1 = Fetch, ...) with a retriable error.
function Client:mock_push_errors(api, n, err)
  return self.c:mock_push_errors(api, n, err)
end

-- Embedded cluster only, for tests: broker id (1..osara.brokers) down
-- (up = false) or up again.
function Client:mock_broker(id, up)
  return self.c:mock_broker(id, up)
end

-- client:topic(name, {codec=, schema=}) -> topic handle for sending.
function Client:topic(name, opts)
  if type(name) ~= "string" or name == "" then
    options.raise("kafka:topic: expected a topic name")
  end
  opts = options.check("kafka:topic", opts)
  local t = setmetatable({ client = self, name = name, codec = codec.get(opts.codec),
                           schema = opts.schema }, Topic)
  self.c:ensure_topic(name)
  require("osara.docs").note { transport = "kafka", server = self.c:bootstrap(), address = name,
                               action = "send", schema = opts.schema, codec = opts.codec,
                               where = options.user_where() }
  return t
end

-- topic:send(value, {key=, headers=, partition=}) -> receipt with :wait().
-- Does not wait; inside a handler the input's offset waits for delivery.
function Topic:send(value, opts)
  if self.schema then
    local v, errs = self.schema:validate(value)
    if v == nil then
      error(("kafka %s: invalid output: %s"):format(self.name,
        type(errs) == "table" and (errs.text or (errs[1] and (errs[1].path .. ": " .. errs[1].message))) or tostring(errs)), 2)
    end
    value = v
  end
  local bytes, err = self.codec.encode(value)
  if bytes == nil then
    error(("kafka %s: cannot encode output: %s"):format(self.name, err), 2)
  end
  opts = opts and options.check("topic:send", opts) or {}
  if self.client.checking then
    return capture(self.name, value, opts)
  end
  local r, perr = produce(self.client, self.name, bytes, opts.key, opts.headers, opts.partition, true)
  if r == nil then
    return nil, perr
  end
  local list = outputs_of[coroutine.running()]
  if list then list[#list + 1] = r end
  return r
end

-- send without a receipt (handler outputs: the input's offset already waits
-- for their delivery reports in C).
function Topic:_send_fast(value, opts)
  if self.schema or self.client.checking then return self:send(value, opts) end
  local bytes, err = self.codec.encode(value)
  if bytes == nil then
    error(("kafka %s: cannot encode output: %s"):format(self.name, err), 3)
  end
  if opts then
    return produce(self.client, self.name, bytes, opts.key, opts.headers, opts.partition, false)
  end
  return produce(self.client, self.name, bytes, nil, nil, nil, false)
end

-- Sends bytes as they are (for replies and forwarding).
function Topic:send_raw(bytes, opts)
  opts = opts or {}
  return produce(self.client, self.name, bytes, opts.key, opts.headers, opts.partition, false)
end

local REPLY_TO, CORRELATION = "osara-reply-to", "osara-correlation-id"

local function send_reply(client, h, msg, value)
  local to = msg.headers[REPLY_TO]
  if client.checking then
    return capture(to, value, { reply = true })
  end
  local bytes, err = h:encode(value)
  if bytes == nil then
    dispatch.bad_input("kafka", msg.topic, "encode", ("%s[%d]@%d"):format(msg.topic, msg.partition, msg.offset), err)
    return
  end
  -- a reply that cannot be enqueued fails its input (C): handled again
  produce(client, to, bytes, msg.key, { [CORRELATION] = msg.headers[CORRELATION] }, nil, false)
end

-- The dead letter of a failed input: its payload, key and headers plus the
-- policy's osara-* headers, delivered before the input is committed (a
-- failed delivery raises: the input stays uncommitted and is handled again).
-- (what: "dead letter" or "retry"; also how check mode records it)
local function forward(client, what, to, msg, headers)
  if client.checking then
    capture(to, msg.raw, { key = msg.key, headers = headers, [what:gsub(" ", "_")] = true })
    return
  end
  local r, err = produce(client, to, msg.raw, msg.key, headers, nil, true)
  local ok = false
  if r then ok, err = r:wait() end
  if not ok then
    error(("kafka %s: %s to %s not delivered: %s"):format(msg.topic, what, to, tostring(err)), 0)
  end
end

local function send_dead_letter(client, dlq, msg, headers)
  forward(client, "dead letter", dlq, msg, headers)
end

-- retry = { mode = "topic" }: a failed message moves to the retry topic
-- with what the next attempt needs in its headers (its due time, attempts
-- so far, first failure, origin), delivered before the input is committed.
local RETRY_DUE, ATTEMPTS, FIRST, ORIGIN = "osara-retry-due", "osara-attempts",
  "osara-first-failure", "osara-origin"

local function send_to_retry(client, retry_topic, msg, origin, err, wait)
  local headers = {}
  for k, v in pairs(msg.headers) do headers[k] = v end
  headers[RETRY_DUE] = ("%.3f"):format(require("osara").now() + wait)
  headers[ATTEMPTS] = tostring(msg.attempt)
  headers[FIRST] = ("%.3f"):format(msg.first_failure)
  headers[ORIGIN] = origin
  headers["osara-error"] = err
  forward(client, "retry", retry_topic, msg, headers)
end

-- A message of the retry topic: its attempt and first failure come from
-- its headers, and it is handled once due (its partition waits meanwhile).
local function await_due(msg)
  local h = msg.headers
  msg.attempt = (tonumber(h[ATTEMPTS]) or 0) + 1
  msg.first_failure = tonumber(h[FIRST])
  local wait = (tonumber(h[RETRY_DUE]) or 0) - require("osara").now()
  if wait > 0 then require("osara").sleep(wait) end
end

local CONFLICT = require("osara.store").CONFLICT
-- Runs of one message's transaction before its input fails: each conflict
-- waits for the commit it lost to, so it takes one run per competitor.
local MAX_TX_RUNS = 100

-- Exactly-once state: the handler's store writes and the input's offset are
-- committed in one LMDB transaction once its outputs were delivered; a
-- replayed input whose state was committed is skipped.
local function make_store_step(client, opts)
  local db = opts.store
  if db.memory then options.raise("kafka:handle: opts.store must be a durable store (not memory)") end
  -- the store's backend: LMDB, or memory under osara check and osara.testing
  local offsets = require("osara.store")("__osara_offsets", { dir = db.dir, codec = "raw" }).b
  local function key(msg) return client.group .. "|" .. msg.topic .. "|" .. msg.partition end
  local step = {}
  local same_cluster = false
  -- The saved positions belong to the cluster they came from: the embedded
  -- one starts empty with a new identity at every start, so positions saved
  -- against another cluster are discarded (one warning), never used to skip.
  local function check_cluster()
    if client.checking then same_cluster = true return end -- nothing connected
    local id = client.c:cluster_id()
    while not id do -- fetched in the background; known once metadata came
      require("osara.timer_c").sleep(0.02)
      id = client.c:cluster_id()
    end
    if same_cluster then return end -- another partition checked meanwhile
    local ck = "cluster:" .. client.group
    local was = offsets:get(ck)
    local ops = { { ck, id, 0 } }
    if was and was ~= id then
      local saved = offsets:range(client.group .. "|", nil, 1000000, true)
      for i = 1, #saved, 2 do ops[#ops + 1] = { saved[i], false, 0 } end
      require("osara.log_c").write("warn", ("kafka: store %s: discarded the exactly-once positions of group %s "
        .. "saved against another cluster (%s, now %s): its messages are applied again"):format(
        db.name, client.group, was, id))
    end
    if was ~= id then
      local ok, err = offsets:commit(ops)
      if not ok then error("store commit failed: " .. tostring(err), 0) end
    end
    same_cluster = true
  end
  -- Read every time (an LMDB read is about a microsecond): after a
  -- rebalance another instance may have moved the partition on.
  function step.applied(msg)
    if not same_cluster then check_cluster() end
    return msg.offset < tonumber(offsets:get(key(msg)) or "-1")
  end
  function step.commit(msg, tx, receipts)
    for _, r in ipairs(receipts) do
      local ok, err = r:wait()
      if not ok then error("an output was not delivered: " .. tostring(err), 0) end
    end
    local k = key(msg)
    local ok, err = db:commit_grouped(tx, offsets, { { k, tostring(msg.offset + 1), 0 } })
    if err == CONFLICT then return false end -- another partition's commit changed what it read
    if not ok then error("store commit failed: " .. tostring(err), 0) end
    return true
  end
  return step
end

-- The retry topic of opts.retry = { mode = "topic", topic = } (raises on a
-- mode it does not know), or nil.
local function retry_topic_of(opts)
  local r = type(opts.retry) == "table" and opts.retry or nil
  if r == nil or r.mode == nil or r.mode == "hold" then return nil end
  if r.mode ~= "topic" then
    options.raise(("kafka:handle: retry.mode must be \"hold\" or \"topic\", got %q"):format(tostring(r.mode)))
  end
  if type(r.topic) ~= "string" or r.topic == "" then
    options.raise("kafka:handle: retry = { mode = \"topic\" } needs topic = \"<retry topic>\"")
  end
  return r.topic
end

-- A handler's sinks (opts.sink): Kafka topics, functions (called with each
-- value, slipstream's `sink=[print]`) and stores (set under the output's
-- key, which feeds store:watch as slipstream's `cache(key, val)` does), one
-- or a list.
local function is_store(x) return type(x) == "table" and type(x.begin) == "function" end
local function is_sink(x)
  return type(x) == "function" or is_store(x) or (type(x) == "table" and type(x.send) == "function")
end

local function sink_list(s)
  if s == nil then return nil end
  if is_sink(s) then return { s } end
  for i, x in ipairs(s) do
    if not is_sink(x) then
      options.raise(("kafka:handle: sink %d is %s, not a topic, a function or a store"):format(i, type(x)))
    end
  end
  return s
end

-- A function or store sink -> true | nil, err (an error it raised).
local function to_other_sink(sink, value, send_opts)
  local key = send_opts and send_opts.key
  if type(sink) == "function" then
    local ok, err = pcall(sink, value)
    if not ok then return nil, "sink: " .. tostring(err) end
    return true
  end
  if key == nil then return nil, "a store sink needs a key (the input has none: emit(v, { key = ... }))" end
  local ok, err = pcall(sink.set, sink, key, value)
  if not ok then return nil, "store sink: " .. tostring(err) end
  return true
end

-- The input each running handler coroutine is handling (for emit's key).
local emitting = setmetatable({}, { __mode = "k" })

-- Builds the function C calls for each message of one registration
-- (is_retry: the registration of the handler's retry topic).
local function make_runner(client, topic, opts, fn, at, is_retry)
  local h = dispatch.handler { kind = "kafka", name = topic, codec = opts.codec,
                               schema = opts.schema, fn = fn, where = at }
  local sinks = sink_list(opts.sink)
  local eo = opts.store and make_store_step(client, opts)
  -- true | nil, err (the first sink that refused it), as every send.
  local function send_to_sinks(value, send_opts)
    for i = 1, #sinks do
      local sink, ok, err = sinks[i]
      if type(sink) == "function" or is_store(sink) then
        ok, err = to_other_sink(sink, value, send_opts)
      elseif eo then
        ok, err = sink:send(value, send_opts)
      else
        ok, err = sink:_send_fast(value, send_opts)
      end
      if not ok then return nil, err end
    end
    return true
  end
  -- emit(v [, opts]): keyed like the input unless opts gives a key, as a
  -- returned value is, so one input's outputs stay in one partition.
  local function emit(value, send_opts)
    if not sinks then error("emit: this handler has no sink (opts.sink)", 2) end
    if send_opts then send_opts = options.check("topic:send", send_opts) end
    local msg = emitting[coroutine.running()]
    if msg and msg.key ~= nil and (send_opts == nil or send_opts.key == nil) then
      if send_opts == nil then
        send_opts = { key = msg.key }
      else
        local o = { key = msg.key }
        for k, v in pairs(send_opts) do o[k] = v end
        send_opts = o
      end
    end
    return send_to_sinks(value, send_opts)
  end
  local function place(msg)
    return ("%s[%d]@%d"):format(msg.topic, msg.partition, msg.offset)
  end
  local max_bytes = opts.max_bytes
  local function origin(msg) -- a retried message keeps where it came from
    return is_retry and msg.headers[ORIGIN] or ("%s/%d/%d"):format(msg.topic, msg.partition, msg.offset)
  end
  local retry_topic = retry_topic_of(opts)
  local policy = dispatch.policy { kind = "kafka", name = topic, opts = opts, where = place, client = client,
    origin = origin,
    to_retry_topic = retry_topic and function(msg, err, wait)
      send_to_retry(client, retry_topic, msg, origin(msg), err, wait)
    end,
    dead_letter = opts.dlq and function(msg, headers) send_dead_letter(client, opts.dlq, msg, headers) end,
    -- a new attempt starts from a clean transaction (exactly-once state)
    before_retry = eo and function(msg)
      msg.tx = opts.store:begin()
      outputs_of[coroutine.running()] = {}
    end }

  -- The handler's results, without packing them into a table per message.
  -- A result the client refuses is not dropped silently: logged with its
  -- input, which C fails: handled again, or it takes the failure policy.
  local function outputs(msg, key_opts, ...)
    for i = 1, select("#", ...) do
      local v = select(i, ...)
      if v ~= nil then
        local ok, err = send_to_sinks(v, key_opts)
        if not ok then
          require("osara.log_c").write("error", ("kafka %s: output of %s not sent: %s"):format(topic, place(msg), tostring(err)))
        end
      end
    end
  end
  local function finish(msg, ok, first, ...)
    if not ok then -- filtered, or the failure policy took it
      if eo then outputs_of[coroutine.running()] = nil end
      return false
    end
    if dispatch.on_return then dispatch.on_return(first, ...) end
    if first == nil and select("#", ...) == 0 then return true end
    if msg.headers[REPLY_TO] then
      send_reply(client, h, msg, first)
    elseif sinks then
      -- Outputs keep the input's key, so partitioning follows it.
      outputs(msg, msg.key and { key = msg.key } or nil, first, ...)
    end
    return true
  end

  return function(msg)
    if eo and eo.applied(msg) then
      msg.skipped = "already applied" -- its state was committed before a restart
      return
    end
    -- an output of the last attempt was not delivered: retried as a
    -- handler error is, or the failure is taken (dead letter...)
    if msg.output_error and policy:output_failed(msg) then
      return
    end
    if policy:too_large(msg, max_bytes) or not policy:decode(h, msg) then
      return
    end
    msg.reply = msg.headers[REPLY_TO] -- where the return value goes, as on NATS
    if is_retry then await_due(msg) end
    emitting[coroutine.running()] = msg
    if not eo then
      finish(msg, policy:call(msg, fn, emit))
      return
    end
    -- A transaction that read a key another partition's transaction then
    -- changed runs again from the start (outputs stay at-least-once).
    for _ = 1, MAX_TX_RUNS do
      msg.tx = opts.store:begin()
      outputs_of[coroutine.running()] = {}
      if not finish(msg, policy:call(msg, fn, emit)) then return end
      local receipts = outputs_of[coroutine.running()] -- a retry started a new list
      outputs_of[coroutine.running()] = nil
      if eo.commit(msg, msg.tx, receipts) then return end -- raises: the input stays uncommitted
    end
    error(("state commit conflicted %d times in a row"):format(MAX_TX_RUNS), 0)
  end
end

local function topics_of(spec)
  if type(spec) == "string" then return { spec } end
  if type(spec) == "table" then return spec end
  options.raise("kafka:handle: expected a topic name, a list of names or a '^regex'")
end

-- client:handle(topic | {topics} | "^regex", [opts,] fn): fn(msg, emit).
-- opts: the "kafka:handle" table in osara.option_tables.
function Client:handle(spec, opts, fn)
  if fn == nil and type(opts) == "function" then opts, fn = nil, opts end
  opts = options.check("kafka:handle", opts)
  if type(fn) ~= "function" then
    options.raise("kafka:handle: expected a handler function")
  end
  local at = options.user_where()
  if opts.dlq then self.c:ensure_topic(opts.dlq) end
  local topics = {}
  for i, t in ipairs(topics_of(spec)) do topics[i] = t end
  -- the retry topic is consumed by the same handler, each message once due
  local retry_topic = retry_topic_of(opts)
  if retry_topic then topics[#topics + 1] = retry_topic end
  for _, topic in ipairs(topics) do
    self.c:ensure_topic(topic)
    require("osara.docs").note { transport = "kafka", server = self.c:bootstrap(), address = topic,
                                 action = "receive", schema = opts.schema, codec = opts.codec, where = at }
    if opts.dlq then
      require("osara.docs").note { transport = "kafka", server = self.c:bootstrap(), address = opts.dlq,
                                   action = "send", codec = "raw", where = at }
    end
    local key = ("%s (group %s)"):format(topic, self.group)
    -- the client's configuration is the signature's restart part: a
    -- handler whose client changed restarts on the new client instead of
    -- being adopted by one the old version still holds (and frees when it
    -- closes). Its options (codec, schema, retry, dlq, sink, store...) live
    -- in the runner: a change there keeps the consumer and its partitions.
    local sig = "client=" .. self.key .. util.SIG_OPTIONS .. util.options_signature(opts)
    local detail = ("group %s, codec %s%s"):format(self.group,
      type(opts.codec) == "table" and "custom" or tostring(opts.codec or "json"),
      (opts.schema and ", schema" or "") .. (opts.store and (", exactly-once state in " .. opts.store.name) or ""))
    vm_c.register("kafka", key, sig, make_runner(self, topic, opts, fn, at, topic == retry_topic),
      { client = self.c, topic = topic, codec = opts.codec, fn = fn }, at, detail)
  end
end

-- ---- request / reply ---------------------------------------------------------

local seq = 0
local function correlation_id()
  seq = seq + 1
  return ("%x-%x-%d"):format(os.time(), math.random(0, 0x7fffffff), seq)
end

-- client:replies(reply_topic): declares the topic this app's requests are
-- answered on (consumed by this client; call at load).
function Client:replies(reply_topic, opts)
  opts = options.check("kafka:replies", opts)
  local pending = self.pending
  self.reply_topics[reply_topic] = true
  self:handle(reply_topic, { codec = opts.codec }, function(msg)
    local id = msg.headers[CORRELATION]
    local waiter = id and pending[id]
    if waiter then
      pending[id] = nil
      sched.wake(waiter[1], waiter[2], msg)
    end
  end)
end

-- client:request(topic, value, {reply_to=, timeout=, key=, codec=})
-- -> reply message (msg.value decoded) | nil, "timeout"
function Client:request(topic, value, opts)
  opts = options.check("kafka:request", opts)
  local reply_topic = opts.reply_to or (topic .. ".replies")
  if not self.reply_topics[reply_topic] then
    options.raise(("kafka:request: call kafka:replies(%q) at load so replies are consumed"):format(reply_topic))
  end
  local c = codec.get(opts.codec)
  local bytes, err = c.encode(value)
  if bytes == nil then options.raise("kafka:request: " .. err) end
  local token, s = sched.current()
  if not token then options.raise("kafka:request: only inside a handler, timer or task") end
  local id = correlation_id()
  self.pending[id] = { token, s }
  local headers = { [REPLY_TO] = reply_topic, [CORRELATION] = id }
  if opts.headers then for k, v in pairs(opts.headers) do headers[k] = v end end
  local ok, perr = produce(self, topic, bytes, opts.key, headers, nil, false)
  if not ok then
    self.pending[id] = nil
    return nil, perr
  end
  local msg, why = sched.park(opts.timeout)
  if msg == nil then
    self.pending[id] = nil
    return nil, why
  end
  local v, derr = c.decode(msg.raw)
  if v == nil and derr then return nil, derr end
  msg.value = v
  return msg
end

-- ---- streams -------------------------------------------------------------------

-- client:stream(topic, opts) -> iterator for `for msg in s do ... end` in a
-- task (slipstream's `async for msg in topic`). Declared at load; a message
-- is committed once the loop asks for the next one.
function Client:stream(topic, opts)
  opts = options.check("kafka:stream", opts)
  return dispatch.iterator(function(fn) self:handle(topic, opts, fn) end, "kafka stream")
end

-- osara.middleware around every outgoing message (handler outputs too)
local middleware = require "osara.middleware"
Topic.send = middleware.topic_send("kafka", Topic.send)
Topic._send_fast = middleware.topic_send("kafka", Topic._send_fast)
Client.request = middleware.publish("kafka", Client.request)

return M
