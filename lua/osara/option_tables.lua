-- osara.option_tables: the options of every builder of the public API, as
-- data: { name, type, default, doc } plus, when needed,
--   required = true       the option must be given
--   values = {a=true,...} the only values allowed
--   shown = "text"        the default as docs show it (computed defaults)
--   unsupported = "why"   raises "not supported yet: why" when given
--   renamed = "new"       a deprecated spelling of `new` (warns once)
-- Read by osara.options (checking, defaults) and rendered into docs/*.md.
-- A type is one of osara.options' names, alternatives joined with "|".
local M = { by_call = {}, order = {} }

local function define(call, list, extra)
  local spec = { call = call, list = list, by_name = {} }
  for k, v in pairs(extra or {}) do spec[k] = v end
  for _, e in ipairs(list) do spec.by_name[e[1]] = e end
  M.by_call[call] = spec
  M.order[#M.order + 1] = call
  return list
end

local function set(...)
  local s = {}
  for _, v in ipairs { ... } do s[v] = true end
  return s
end

-- The failure policy every handler takes (osara.dispatch; docs/api.md).
local function failure_policy(dlq_doc)
  return {
    { "retry", "table|boolean", nil, "a failing handler call is retried in the same coroutine: `{ max =, backoff =, max_backoff =, jitter =, on = }` (the [`retry` table](api.md#failure-policy)); `false`: no retry", shown = "3 retries, 0.1 s backoff" },
    { "dlq", "string|boolean", nil, dlq_doc, shown = "none" },
    { "on_failure", "function", nil, "`on_failure(msg, err, attempts)`, called once after the last attempt, in the message's coroutine (may send)" },
    { "filter", "function", nil, "`filter(msg) -> keep`, after decoding: a message it drops is counted in `osara_filtered_total` and settled" },
  }
end
local function with(list, extra)
  for _, e in ipairs(extra) do list[#list + 1] = e end
  return list
end

define("retry", {
  { "max", "integer", 3, "retries after the first attempt (`0`: none)" },
  { "backoff", "number", 0.1, "seconds before the first retry; doubles per retry" },
  { "max_backoff", "number", 30, "the longest wait between two attempts" },
  { "jitter", "number", 0.2, "each wait is changed by up to this fraction, at random" },
  { "on", "function", nil, "`on(err, msg) -> retryable`: a false answer takes the failure path at once", shown = "every error" },
  { "mode", "string", "hold", "Kafka: `\"hold\"` retries in place (the partition waits); `\"topic\"` moves the message to `topic` with its due time, so the partition goes on" },
  { "topic", "string", nil, "Kafka, `mode = \"topic\"`: the retry topic (consumed by the same handler, each message waited for until due)" },
})

-- ---- core ---------------------------------------------------------------------------

local timer = {
  { "name", "string", nil, "stable key across reloads (instead of the interval and order)" },
}
define("osara.every", timer)
define("osara.after", timer)

define("osara.middleware", {
  { "before", "function", nil, "`before(ctx)` before each handler call / outgoing message; may change `ctx.msg` or `ctx.value`" },
  { "after", "function", nil, "`after(ctx, ok, err)` after it, in reverse order of registration" },
  { "client", "any", nil, "only messages of this client (a Kafka, NATS or AMQP client)", shown = "every client" },
  { "direction", "string", nil, "`\"in\"` (handler calls) or `\"out\"` (sends and publishes)", shown = "both",
    values = set("in", "out") },
})

define("osara.log.get", {
  { "level", "string", nil, "this logger's own level", shown = "config.yaml's `log.levels.<name>`, else `--log-level`",
    values = set("debug", "info", "warn", "error", "off") },
})

define("osara.process.spawn", {
  { "argv", "list", nil, "the program and its arguments", required = true },
  { "env", "table", nil, "variables set on top of the host's environment" },
  { "cwd", "string", nil, "working directory", shown = "the host's" },
})

-- ---- Kafka --------------------------------------------------------------------------

-- librdkafka's properties pass through (librdkafka checks them itself);
-- only osara's own "osara." settings are listed here.
local kafka_client = {
  { "osara.max_per_partition", "integer", 1000, "inputs held per partition (waiting, running, or waiting for their outputs) before the partition is paused" },
  { "osara.max_inflight", "integer", 10000, "the same bound over all partitions of the client" },
  { "osara.partitions", "integer", 4, "partitions of topics the embedded broker creates" },
  { "osara.brokers", "integer", 1, "brokers in the embedded cluster" },
  { "osara.revoke_timeout_ms", "integer", 10000, "on a rebalance, how long running handlers and pending outputs of revoked partitions get to finish before the partitions are let go" },
}
local function librdkafka_property(k)
  return type(k) == "string" and k:sub(1, 6) ~= "osara."
end
-- Defaults are not filled in here: they apply in C, under
-- osara.kafka.defaults() and the environment (docs/kafka.md gives the order).
local kafka_client_extra = { passthrough = librdkafka_property, passthrough_type = "scalar",
                             keep_defaults = false }
define("osara.kafka", kafka_client, kafka_client_extra)
define("osara.kafka.defaults", kafka_client, kafka_client_extra)

define("kafka:topic", {
  { "codec", "codec", "json", "`\"json\"`, `\"msgpack\"`, `\"raw\"`, `\"string\"`, `{avro=}` or a custom `{encode=, decode=}`" },
  { "schema", "schema", nil, "values are validated before they are sent: an invalid value raises at the call site" },
})

local kafka_handler = {
  { "codec", "codec", "json", "how `msg.raw` is decoded into `msg.value`" },
  { "schema", "schema", nil, "the decoded value must satisfy it; otherwise bad input ([schemas.md](schemas.md))" },
  { "sink", "topic|function|store", nil, "where the handler's return values and `emit(v)` go, keyed like the input: a topic, a function (called with each value), a store (`set` under the key, which feeds `watch`), or a list of them" },
  { "store", "store", nil, "a durable `osara.store`: `msg.tx` writes and the offset commit in one transaction (exactly-once state)" },
  { "max_bytes", "integer", 1048576, "larger payloads are bad input" },
  { "max_per_partition", "integer", nil, "",
    unsupported = "it is a client setting: osara.kafka{[\"osara.max_per_partition\"] = n}" },
}
with(kafka_handler, failure_policy("a topic of the same client: failed messages go there with `osara-error*` headers; the input is committed once it is delivered; `false`: none"))
define("kafka:handle", kafka_handler)
define("kafka:stream", kafka_handler)

define("kafka:replies", {
  { "codec", "codec", "raw", "codec of the replies (each request decodes with its own `codec`)" },
})

define("kafka:request", {
  { "reply_to", "string", nil, "topic the reply comes back on (declared with `kafka:replies`)", shown = "`<topic>.replies`" },
  { "timeout", "number", 5, "seconds to wait for the reply; then `nil, \"timeout\"`" },
  { "key", "string", nil, "message key of the request" },
  { "headers", "table", nil, "extra headers" },
  { "codec", "codec", "json", "encodes the request and decodes the reply" },
  { "reply_topic", "string", nil, "", renamed = "reply_to" },
})

define("topic:send", {
  { "key", "string", nil, "message key (partitioning)" },
  { "headers", "table", nil, "header name → string value" },
  { "partition", "integer", nil, "explicit partition (default: by key)" },
})

-- ---- AMQP (RabbitMQ) -----------------------------------------------------------------

define("osara.amqp", {
  { "url", "string", "amqp://guest:guest@127.0.0.1:5672/", "`amqp://user:password@host:port/vhost` (`OSARA_AMQP_URL` overrides)" },
  { "service", "string", nil, "this service's name: `amqp:event` publishes to the exchange of that name (micro_framework's `SERVICE_NAME`)" },
  { "prefetch", "integer", 256, "unacknowledged messages the broker sends each consumer at most (`basic.qos`)" },
})

define("amqp:handle", {
  { "exchange", "string", nil, "the exchange to bind to (micro_framework's `source_service`); declared when missing", required = true },
  { "routing_key", "string", "#", "the binding key (micro_framework's `event_name`); topic wildcards `*` and `#` work" },
  { "queue", "string", nil, "a named queue is shared by every instance (a work queue); without one each instance gets its own exclusive queue (a broadcast)", shown = "exclusive" },
  { "durable", "boolean", true, "the exchange and a named queue survive a broker restart" },
  { "exchange_type", "string", "topic", "the type the exchange is declared with", values = set("topic", "direct", "fanout", "headers") },
})

local amqp_handler = {
  { "codec", "codec", "json", "how `msg.raw` is decoded into `msg.value`" },
  { "schema", "schema", nil, "the decoded value must satisfy it; otherwise bad input ([schemas.md](schemas.md))" },
  { "max_inflight", "integer", 256, "handler calls running at once (micro_framework's `MAX_WORKERS`); `1` keeps the queue's order" },
  { "prefetch", "integer", nil, "this consumer's prefetch", shown = "the client's" },
  { "max_bytes", "integer", 1048576, "larger payloads are bad input" },
  { "retry", "table|boolean", nil, "a failing handler call is retried later through the broker: the message waits in `<queue>.retry` for the backoff (a per-message TTL), then comes back; `msg.attempt` counts from its `x-death` header. `{ max =, backoff =, max_backoff =, jitter =, on = }` (the [`retry` table](api.md#failure-policy)); `false`: no retry", shown = "3 retries, 0.1 s backoff" },
  { "dlq", "string|boolean", nil, "a queue (declared durable): failed messages are published there with `osara-error*` headers; `false`: none", shown = "none" },
  { "on_failure", "function", nil, "`on_failure(msg, err, attempts)`, called once after the last attempt, in the message's coroutine (may publish; micro_framework's `callback_target`)" },
  { "filter", "function", nil, "`filter(msg) -> keep`, after decoding: a message it drops is acknowledged and counted in `osara_filtered_total` (micro_framework's `payload_filter`)" },
}
define("amqp:handle.opts", amqp_handler)

define("amqp:publish", {
  { "headers", "table", nil, "header name → string, number or boolean" },
  { "persistent", "boolean", true, "delivery mode 2: a durable queue keeps it across a broker restart" },
  { "confirm", "boolean", true, "wait (yield) until the broker confirms; inside a handler the input is acknowledged only after every output was confirmed either way" },
  { "timeout", "number", nil, "seconds to wait for the confirm; then `nil, \"timeout\"`", shown = "none" },
  { "codec", "codec", "json", "encodes the value" },
  { "declare", "boolean", true, "declare the exchange (durable, `exchange_type`) before the first publish to it" },
  { "exchange_type", "string", "topic", "the type a declared exchange gets" },
  { "expiration", "number", nil, "seconds the message may wait in a queue (per-message TTL)" },
  { "content_type", "string", nil, "the `content-type` property", shown = "the codec's" },
  { "correlation_id", "string", nil, "the `correlation-id` property" },
  { "reply_to", "string", nil, "the `reply-to` property" },
  { "message_id", "string", nil, "the `message-id` property" },
})

-- ---- NATS ---------------------------------------------------------------------------

define("osara.nats", {
  { "servers", "string|list", "embedded", "a URL or a list of URLs; `\"embedded\"` starts a nats-server child (`OSARA_NATS_SERVERS` overrides)" },
  { "name", "string", nil, "connection name shown by the server" },
  { "user", "string", nil, "user name (with `password`)" },
  { "password", "string", nil, "password (with `user`)" },
  { "token", "string", nil, "authentication token" },
  { "creds", "string", nil, "a credentials file (JWT and NKey)" },
  { "tls", "boolean", false, "require TLS" },
  { "ca", "string", nil, "a file of trusted CA certificates" },
})

local nats_handler = {
  { "queue", "string", nil, "queue group: instances with the same group share the messages (panini's load balancing)" },
  { "codec", "codec", "json", "how `msg.raw` is decoded into `msg.value`, and the reply encoded" },
  { "schema", "schema", nil, "the decoded value must satisfy it; otherwise bad input ([schemas.md](schemas.md))" },
  { "sink", "string|list", nil, "a subject (or a list): the handler's return values (for messages without `msg.reply`) and `emit(v)` are published there" },
  { "max_inflight", "integer", 256, "handler calls running at once for this subscription; more wait in a queue" },
  { "max_waiting", "integer", 1024, "messages waiting in osara's queue beyond `max_inflight`; past it nats.c's delivery thread waits and messages stay in nats.c's pending list" },
  { "pending_msgs", "integer", 65536, "nats.c's pending message limit for the subscription (`-1`: unlimited)" },
  { "pending_bytes", "integer", 67108864, "nats.c's pending byte limit for the subscription (`-1`: unlimited)" },
  { "reply_empty", "boolean", false, "send an empty reply when the handler returns nothing" },
  { "max_bytes", "integer", 1048576, "larger payloads are bad input" },
  { "durable", "string", nil, "JetStream: the durable pull consumer's name (makes this a JetStream handler)" },
  { "stream", "string", nil, "JetStream: the stream the durable consumer reads" },
  { "batch", "integer", 64, "JetStream: messages pulled per fetch (bounds what is in flight)" },
  { "max_deliver", "integer", nil, "JetStream: caps the attempts of a failing message (deliveries); the last one takes the failure (dead letter, `on_failure`) and terminates it", shown = "`retry.max` + 1" },
  { "nak_delay", "number", nil, "JetStream: a fixed delay before a failed message is redelivered, instead of `retry`'s backoff", shown = "`retry`'s backoff" },
  { "ack_wait", "number", 30, "JetStream: seconds before an unacknowledged message is redelivered" },
}
with(nats_handler, failure_policy("a subject: failed messages are published there with `osara-error*` headers (on a JetStream consumer: stored in the stream that holds the subject, before the input is terminated); `false`: none"))
define("nats:handle", nats_handler)
define("nats:stream", nats_handler)

define("nats:publish", {
  { "headers", "table", nil, "header name → string value" },
  { "reply_to", "string", nil, "the subject replies go to (panini's reply_to)" },
  { "codec", "codec", "json", "encodes the value" },
})

define("nats:request", {
  { "timeout", "number", 5, "seconds to wait for the reply; then `nil, \"timeout\"`" },
  { "headers", "table", nil, "header name → string value" },
  { "codec", "codec", "json", "encodes the request and decodes the reply" },
})

define("nats:jspublish", {
  { "codec", "codec", "json", "encodes the value" },
  { "headers", "table", nil, "header name → string value" },
})

define("nats:add_stream", {
  { "name", "string", nil, "the stream's name", required = true },
  { "subjects", "list", nil, "the subjects it stores", required = true },
  { "retention", "string", "limits", "`\"limits\"`, `\"workqueue\"` or `\"interest\"`",
    values = set("limits", "workqueue", "interest") },
  { "max_age", "number", 0, "seconds a message is kept (0: no limit)" },
  { "max_msgs", "integer", -1, "messages kept (-1: no limit)" },
  { "storage", "string", "file", "`\"file\"` or `\"memory\"`", values = set("file", "memory") },
})

-- ---- HTTP ---------------------------------------------------------------------------

define("osara.http", {
  { "listen", "string", "127.0.0.1:8080", "address to listen on (`--http` and `OSARA_HTTP_LISTEN` override)" },
  { "healthz", "string|boolean", "/healthz", "path of the liveness check (the loop turns), or `false`" },
  { "readyz", "string|boolean", "/readyz", "path of the readiness check (clients connected, consumers assigned, not stopping), or `false`" },
  { "metrics", "string|boolean", "/metrics", "path of the Prometheus metrics, or `false`" },
  { "docs", "boolean", false, "serve `/asyncapi.json` and `/openapi.json` (as `osara docs` prints them)" },
  { "max_body", "integer", 1048576, "larger request bodies answer 413" },
  { "max_header", "integer", 16384, "larger request heads answer 431" },
  { "request_timeout", "number", 10, "seconds to receive a whole request (a new connection's first byte included)" },
  { "idle_timeout", "number", 60, "seconds an idle keep-alive connection stays open" },
  { "max_connections", "integer", 1024, "connections at once; when full, the oldest waiting for a request is closed, else 503" },
})

define("osara.route", {
  { "format", "string|list", nil, "response format: `\"json\"`, `\"msgpack\"`, `\"html\"`, `\"text\"`, or a list negotiated with Accept", shown = "`\"json\"`" },
  { "schema", "schema", nil, "the request body must satisfy it (else 400); the validated body is `req.value`" },
})

define("osara.response", {
  { "status", "integer", 200, "HTTP status" },
  { "body", "any", nil, "a string, or a table encoded with `format`" },
  { "headers", "table", nil, "response headers" },
  { "format", "string", nil, "encoding of a table body (as the route's `format`)" },
})

define("osara.sse", {
  { "keepalive", "number", 15, "seconds between keep-alive comments while the source is quiet" },
  { "format", "function", nil, "`format(a, b) -> frame text` instead of the default `data:` framing" },
})

-- ---- store ----------------------------------------------------------------------------

define("osara.store", {
  { "codec", "codec", "msgpack", "how values are stored" },
  { "memory", "boolean", false, "in memory, shared by this script version, gone on restart" },
  { "sweep", "number", 5, "seconds between sweeps of expired keys (one timer per store)" },
  { "dir", "string", nil, "another data folder than `--data` (tests)", shown = "`--data`" },
})

define("store:set", {
  { "ttl", "number", nil, "seconds until the key expires" },
})

define("store:pairs", {
  { "keys_only", "boolean", false, "iterate keys without reading values" },
})

define("store:watch", {
  { "limit", "integer", 1000, "undelivered changes kept for a slow watcher (the oldest are dropped)" },
})

define("osara.cached", {
  { "pull", "function", nil, "`pull(...) -> value` on a miss (simple container)" },
  { "pull_many", "function", nil, "`pull_many(items) -> { [item] = value }` for the misses (attribute container)" },
  { "attribute", "list", nil, "`{ Table, \"column\" }`: the misses through `Table:get_in(column, items)`" },
  { "cache", "table|string", nil, "an `osara.cache`, or a name from config.yaml", shown = "a memory cache" },
  { "store", "store|string", nil, "an `osara.store` (values as it stores them) or `\"memory\"`" },
  { "key", "function", nil, "`key(item) -> string`", shown = "`tostring`" },
  { "expire", "number", nil, "seconds a cached value lives (none: until evicted)" },
  { "ttl", "number", nil, "the same as `expire`" },
  { "name", "string", nil, "ignored (named the memory store before caches existed)", hidden = true },
})

-- ---- caches ---------------------------------------------------------------------------

define("osara.cache", {
  { "type", "string", "memory", "`\"memory\"`, `\"store\"`, `\"redis\"` or `\"memcached\"`",
    values = set("memory", "store", "redis", "memcached") },
  { "prefix", "string", "", "put before every key" },
  { "codec", "codec", "json", "how values are encoded" },
  { "host", "string", nil, "redis: `\"host:port\"`", shown = "`\"127.0.0.1:6379\"`" },
  { "hosts", "list|string", nil, "memcached: `{ \"host:port\", ... }`, spread by consistent hashing (redis: one)" },
  { "db", "integer", nil, "redis: the database number", shown = "`0`" },
  { "password", "string", nil, "redis: sent with AUTH" },
  { "timeout", "number", 1, "redis, memcached: seconds to connect, and for each call" },
  { "name", "string", nil, "store: the `osara.store` holding the values", shown = "`\"cache\"`" },
})

-- ---- SQL ------------------------------------------------------------------------------

define("osara.sql", {
  { "url", "string", nil, "`sqlite:PATH` or `postgres://user:pass@host:port/db` (the table form)", shown = "`sqlite:osara.db`" },
  { "pool_size", "integer", nil, "connections in the pool (SQLite: always 1)", shown = "4 (postgres), 1 (sqlite)" },
  { "pool_min", "integer", 0, "PostgreSQL connections opened when the pool is created, before any query (asyncpg's min_size): the first requests after a start do not wait for connection set-up, and a wrong URL shows in the log at once" },
  { "pool_timeout", "number", 5, "seconds a caller waits for a free connection before `nil, \"sql: pool exhausted ...\"`" },
  { "host", "string", nil, "kata's `database:` settings: become a postgres URL" },
  { "port", "integer", nil, "the server's port", shown = "5432" },
  { "user", "string", nil, "the user to connect as" },
  { "password", "string", nil, "its password" },
  { "name", "string", nil, "the database name" },
})

define("table:get", {
  { "order_by", "string", nil, "`\"col\"`, `\"-col\"` or `\"col desc\"`, comma-separated" },
  { "limit", "integer", nil, "at most this many rows" },
  { "offset", "integer", nil, "skip this many rows first" },
})

define("table:update", {
  { "where", "table", nil, "`{ col = value }`: the rows to change (needed; `{}` means every row)" },
})

define("osara.sql.migrate", {
  { "from", "integer", nil, "skip files numbered below this (kata's `apply(schema, n)`)" },
})

define("osara.sql.reset", {
  { "confirm", "boolean", nil, "must be `true`: reset drops every table, and refuses (raises) without it" },
})

-- ---- schemas --------------------------------------------------------------------------

define("osara.schema", {
  { "name", "string", nil, "the name `osara check` prints" },
  { "unknown", "string", "allow", "fields the schema does not name: `\"allow\"`, `\"strip\"` or `\"reject\"`",
    values = set("allow", "strip", "reject") },
  { "coerce", "boolean", false, "lax mode: `\"5\"` is accepted as the integer 5, `\"true\"`/`\"yes\"`/`\"1\"` as true (nested records, arrays and maps inherit it)" },
})

local function field_options(...)
  local list = {
    -- no applied defaults here: osara.field(T, opts) must not reset T's own
    { "optional", "boolean", nil, "may be absent", shown = "`false`" },
    { "nullable", "boolean", nil, "may be JSON `null`", shown = "`false`" },
    { "default", "any", nil, "used when absent (tables are deep-copied)" },
    { "enum", "list", nil, "the only values allowed" },
    { "check", "function", nil, "`check(v) -> ok, message`" },
  }
  local extra = {
    min = { "min", "number", nil, "smallest number allowed" },
    max = { "max", "number", nil, "largest number allowed" },
    min_len = { "min_len", "integer", nil, "shortest length allowed" },
    max_len = { "max_len", "integer", nil, "longest length allowed" },
    pattern = { "pattern", "string", nil, "a Lua pattern the string must match" },
  }
  for _, name in ipairs { ... } do list[#list + 1] = extra[name] end
  return list
end

define("osara.string", field_options("min_len", "max_len", "pattern"))
define("osara.number", field_options("min", "max"))
define("osara.integer", field_options("min", "max"))
define("osara.boolean", field_options())
define("osara.array", field_options("min_len", "max_len"))
define("osara.map", field_options())
define("osara.optional", field_options("min", "max", "min_len", "max_len", "pattern"))
define("osara.nullable", field_options("min", "max", "min_len", "max_len", "pattern"))
define("osara.enum", field_options())
define("osara.field", field_options("min", "max", "min_len", "max_len", "pattern"))

-- ---- testing ------------------------------------------------------------------------

define("osara.testing.load", {
  { "env", "table", nil, "values `os.getenv` returns while the script loads" },
  { "data_dir", "string", nil, "the data folder the app sees", shown = "a fresh folder" },
})

define("app:request", {
  { "body", "string|table", nil, "request body; a table is sent as JSON" },
  { "headers", "table", nil, "request headers" },
})

-- ---- WebSocket RPC (docs/rpc.md) -----------------------------------------------------

define("osara.rpc.serve", {
  { "path", "string", "/rpc", "the WebSocket endpoint's path on the HTTP server" },
  { "max_message", "integer", 1048576, "larger messages close the connection with status 1009" },
  { "max_inflight", "integer", 256, "calls running at once per connection; past it the connection is not read" },
  { "max_connections", "integer", 1024, "WebSocket connections at once; more are answered 503" },
  { "ping_interval", "number", 30, "seconds a connection may stay silent before a ping; silent one more interval, it is closed (`0`: never)" },
})

define("osara.rpc.expose", {
  { "doc", "string", nil, "what the function does, shown by `rpc.targets` and `.info`", shown = "`\"\"`" },
})

define("osara.rpc.client", {
  { "timeout", "number", 5, "seconds to connect and to wait for a call's result" },
  { "max_message", "integer", 1048576, "larger replies close the connection" },
  { "max_backoff", "number", 2, "the longest wait before reconnecting after a failed connect" },
})

return M
