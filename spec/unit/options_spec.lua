-- Every builder checks its options against osara.option_tables (issue 12,
-- item 5): a misspelled key, a wrong type, defaults.
local osara = require "osara"
local options = require "osara.options"
local testing = require "osara.testing"
local vm_c = require "osara.vm_c"
local timer_c = require "osara.timer_c"
local H = require "spec.helpers.host"

local HERE = "^spec/unit/options_spec%.lua:%d+: "

-- Runs fn as `osara check` would: clients connect nothing, registrations
-- are captured (returned) instead of started.
local function checking(fn)
  local real_mode, real_register = vm_c.mode, vm_c.register
  local captured = {}
  vm_c.mode = function() return "check" end
  vm_c.register = function(kind, key, sig, run, o) captured[#captured + 1] = { kind = kind, key = key, opts = o, fn = run } end
  local ok, err = pcall(fn)
  vm_c.mode, vm_c.register = real_mode, real_register
  if not ok then error(err, 0) end
  return captured
end

local function raised(fn)
  local ok, err = pcall(fn)
  assert(not ok, "expected an error")
  return tostring(err)
end

local kafka, nats, topic, db, app, amqp
local function fn() end

-- One way to call each builder with an options table.
local calls = {
  ["osara.every"] = function(o) osara.every(1, fn, o):cancel() end,
  ["osara.process.spawn"] = function(o) osara.process.spawn(o) end,
  ["osara.middleware"] = function(o)
    if o.before == nil and o.after == nil then o.before = function() end end
    local chain = require "osara.middleware"
    local saved = chain._capture({}) -- registered into a throwaway chain
    local ok, err = pcall(osara.middleware, o)
    chain._capture(saved)
    if not ok then error(err, 0) end
  end,
  ["osara.log.get"] = function(o) osara.log.get("options_spec", o) end,
  ["osara.after"] = function(o) osara.after(1, fn, o):cancel() end,
  ["osara.kafka"] = function(o) checking(function() osara.kafka(o) end) end,
  ["osara.kafka.defaults"] = function(o) osara.kafka.defaults(o) end,
  ["kafka:topic"] = function(o) checking(function() kafka:topic("t", o) end) end,
  ["kafka:handle"] = function(o) checking(function() kafka:handle("t", o, fn) end) end,
  ["kafka:stream"] = function(o) checking(function() kafka:stream("t", o) end) end,
  ["kafka:replies"] = function(o) checking(function() kafka:replies("t.replies", o) end) end,
  ["kafka:request"] = function(o) kafka:request("t", 1, o) end,
  ["topic:send"] = function(o) topic:send(1, o) end,
  ["osara.nats"] = function(o) checking(function() osara.nats(o) end) end,
  ["nats:handle"] = function(o) checking(function() nats:handle("s", o, fn) end) end,
  ["nats:stream"] = function(o) checking(function() nats:stream("s", o) end) end,
  ["retry"] = function(o) checking(function() kafka:handle("t", { retry = o }, fn) end) end,
  ["nats:publish"] = function(o) nats:publish("s", 1, o) end,
  ["nats:request"] = function(o) nats:request("s", 1, o) end,
  ["nats:jspublish"] = function(o) nats:jspublish("s", 1, o) end,
  ["nats:add_stream"] = function(o) nats:add_stream(o) end,
  ["osara.amqp"] = function(o) checking(function() osara.amqp(o) end) end,
  ["amqp:handle"] = function(o) checking(function() amqp:handle(o, fn) end) end,
  ["amqp:handle.opts"] = function(o) checking(function() amqp:handle({ exchange = "e" }, o, fn) end) end,
  ["amqp:publish"] = function(o) amqp:publish("e", "k", 1, o) end,
  ["osara.http"] = function(o) osara.http(o) end,
  ["osara.route"] = function(o) osara.route("GET", "/options-spec", fn, o) end,
  ["osara.rpc.serve"] = function(o) osara.rpc.serve(o) end,
  ["osara.rpc.expose"] = function(o) osara.rpc.expose("options_spec_" .. tostring(o):sub(8), fn, o) end,
  ["osara.rpc.client"] = function(o) osara.rpc.client("ws://127.0.0.1:1/rpc", o) end,
  ["osara.response"] = function(o) osara.response(o) end,
  ["osara.sse"] = function(o) osara.sse(fn, o) end,
  ["osara.store"] = function(o) osara.store("opts", o) end,
  ["store:set"] = function(o) db:set("k", 1, o) end,
  ["store:pairs"] = function(o) db:pairs("", o) end,
  ["store:watch"] = function(o) db:watch("", o):close() end,
  ["osara.cached"] = function(o) osara.cached(o) end,
  ["osara.cache"] = function(o) osara.cache(o) end,
  ["osara.schema"] = function(o) osara.schema({ a = "string" }, o) end,
  ["osara.string"] = function(o) osara.string(o) end,
  ["osara.number"] = function(o) osara.number(o) end,
  ["osara.integer"] = function(o) osara.integer(o) end,
  ["osara.boolean"] = function(o) osara.boolean(o) end,
  ["osara.array"] = function(o) osara.array("string", o) end,
  ["osara.map"] = function(o) osara.map("string", o) end,
  ["osara.optional"] = function(o) osara.optional("string", o) end,
  ["osara.nullable"] = function(o) osara.nullable("string", o) end,
  ["osara.enum"] = function(o) osara.enum({ 1, 2 }, o) end,
  ["osara.field"] = function(o) osara.field("string", o) end,
  ["osara.testing.load"] = function(o) testing.load(app, o) end,
  ["app:request"] = function(o) testing.load(app):request("GET", "/", o) end,
  ["osara.sql"] = function(o) osara.sql("sqlite::memory:", o) end,
  ["table:get"] = function(o) osara.sql("sqlite::memory:"):table("t"):get({}, o) end,
  ["table:update"] = function(o) osara.sql("sqlite::memory:"):table("t"):update({ v = 1 }, o) end,
  ["osara.sql.migrate"] = function(o) osara.sql.migrate(osara.sql("sqlite::memory:"), "/none", o) end,
  ["osara.sql.reset"] = function(o) osara.sql.reset(osara.sql("sqlite::memory:"), "/none", o) end,
}

-- The first plain option of a builder (not deprecated, not refused).
local function first_option(call)
  for _, e in ipairs(options.tables[call].list) do
    if not e.unsupported and not e.renamed and e[2] ~= "any" then return e end
  end
end

describe("options", function()
  setup(function()
    local dir = H.tmpdir()
    app = dir .. "/app.lua"
    H.write(app, "local osara = require 'osara'\n")
    checking(function()
      kafka = osara.kafka { ["group.id"] = "opts" }
      nats = osara.nats {}
      amqp = osara.amqp {}
      topic = kafka:topic("t")
    end)
    db = osara.store("opts", { memory = true })
  end)
  teardown(H.cleanup)

  it("has a way to call every builder in this spec", function()
    for _, call in ipairs(options.order) do
      assert(calls[call], "no call for builder " .. call .. " in options_spec")
    end
  end)

  for _, call in ipairs(options.order) do
    local e = first_option(call)
    if e then
      it(call .. ": a misspelled key raises at the caller's line with the closest name", function()
        local typo = e[1]:sub(1, -2) .. (e[1]:sub(-1) == "x" and "z" or "x") -- "max" -> "maz"
        local err = raised(function() calls[call] { [typo] = 1 } end)
        assert.matches(HERE .. "unknown option '" .. typo:gsub("%p", "%%%0") .. "' in "
          .. call:gsub("%p", "%%%0") .. " %(did you mean '" .. e[1]:gsub("%p", "%%%0") .. "'%?%)$", err)
      end)

      it(call .. ": a value of the wrong type raises naming the option", function()
        local err = raised(function() calls[call] { [e[1]] = coroutine.create(fn) } end)
        assert.matches(HERE .. "option '" .. e[1]:gsub("%p", "%%%0") .. "' in " .. call:gsub("%p", "%%%0")
          .. " must be .+, got thread$", err)
      end)
    end

    it(call .. ": defaults apply to what is not given", function()
      local spec = options.tables[call]
      local given = {}
      for _, entry in ipairs(spec.list) do
        if entry.required then
          given[entry[1]] = ({ list = { "a" }, string = "x", ["function"] = fn })[entry[2]]
        end
      end
      local got = options.check(call, given)
      for _, entry in ipairs(spec.list) do
        if spec.keep_defaults ~= false and not entry.required then
          assert.are.equal(entry[3], got[entry[1]])
        end
      end
    end)
  end

  it("checks options given as a non-table", function()
    assert.matches(HERE .. "osara.nats: options must be a table, got string",
      raised(function() calls["osara.nats"]("nats://x") end))
  end)

  it("gh_12: osara.nats{server=} names the key and the script line instead of starting a server", function()
    H.write(app, "local osara = require 'osara'\n\nlocal nats = osara.nats { server = 'nats://x:4222' }\n")
    local err = raised(function() testing.load(app) end)
    assert.matches("app%.lua:3: unknown option 'server' in osara.nats %(did you mean 'servers'%?%)$", err)
  end)

  it("gh_13: retry and dlq on handlers are checked options (no longer 'not supported yet')", function()
    for _, call in ipairs { "kafka:handle", "nats:handle" } do
      local err = raised(function() calls[call] { retry = 3 } end)
      assert.matches(HERE .. "option 'retry' in " .. call .. " must be a table or a boolean, got number$", err)
      err = raised(function() calls[call] { dlq = 3 } end)
      assert.matches(HERE .. "option 'dlq' in " .. call .. " must be a string or a boolean, got number$", err)
      err = raised(function() calls[call] { retry = { max = 3, bakoff = 1 } } end)
      assert.matches(HERE .. "unknown option 'bakoff' in retry %(did you mean 'backoff'%?%)$", err)
      calls[call] { retry = { max = 1, backoff = 0.5, on = fn }, dlq = "dead", on_failure = fn, filter = fn }
      calls[call] { retry = false, dlq = false }
    end
  end)

  it("gh_12: max_per_partition on a Kafka handler points to the client setting", function()
    local err = raised(function() calls["kafka:handle"] { max_per_partition = 10 } end)
    assert.matches("not supported yet: it is a client setting: osara.kafka{%[\"osara.max_per_partition\"%] = n}", err)
  end)

  it("osara.kafka: an unknown osara. setting raises with the closest name", function()
    local err = raised(function() calls["osara.kafka"] { ["osara.max_per_partiton"] = 10 } end)
    assert.matches(HERE .. "unknown option 'osara.max_per_partiton' in osara.kafka %(did you mean 'osara.max_per_partition'%?%)", err)
  end)

  it("osara.kafka: a property librdkafka rejects raises naming the property at the caller's line", function()
    local err = raised(function() calls["osara.kafka"] { ["bootstrap.server"] = "x:9092" } end)
    assert.matches(HERE .. "osara.kafka: .*\"bootstrap.server\"", err)
    err = raised(function() calls["osara.kafka"] { ["session.timeout.ms"] = "soon" } end)
    assert.matches(HERE .. "osara.kafka: .*session.timeout.ms", err)
    err = raised(function() calls["osara.kafka"] { ["client.id"] = {} } end)
    assert.matches(HERE .. "option 'client.id' in osara.kafka must be a string, number or boolean, got table", err)
  end)

  it("checks enumerated values", function()
    assert.matches(HERE .. "option 'unknown' in osara.schema must be one of 'allow', 'reject', 'strip', got \"drop\"",
      raised(function() osara.schema({ a = "string" }, { unknown = "drop" }) end))
  end)

  it("gh_12: osara.optional(T, {default=}) keeps the default", function()
    local S = osara.schema { n = osara.optional("integer", { default = 7 }), m = osara.nullable("string", { default = "x" }) }
    assert.are.same({ n = 7, m = "x" }, S:validate({}))
  end)

  it("osara.field keeps the modifiers of the type it wraps", function()
    local S = osara.schema { n = osara.field(osara.nullable "integer", { default = 1 }) }
    assert.are.same({ n = require("cjson").null }, S:validate({ n = require("cjson").null }))
  end)

  it("passes the defaults to what was registered", function()
    local reg = checking(function() nats:handle("s", fn) end)[1]
    assert.are.equal(256, reg.opts.max_inflight)
    assert.are.equal(67108864, reg.opts.pending_bytes)
    local sweeps = {}
    local real = timer_c.new
    timer_c.new = function(s, ...) sweeps[#sweeps + 1] = s return real(s, ...) end
    local s = osara.store("defaults-probe", { memory = true })
    timer_c.new = real
    assert.are.same({ 5 }, sweeps)
    assert.are.equal("msgpack", s.codec.name)
  end)

  it("a deprecated option name warns once per call site and still works", function()
    local got = options.check("kafka:request", { reply_topic = "a.replies" })
    assert.are.equal("a.replies", got.reply_to)
    assert.is_nil(got.reply_topic)
  end)

  it("suggests only names that are close", function()
    assert.are.equal("servers", options.closest("server", { "servers", "name" }))
    assert.are.equal("max_inflight", options.closest("max_in_flight", { "max_inflight", "queue" }))
    assert.is_nil(options.closest("zebra", { "servers", "name" }))
  end)
end)
