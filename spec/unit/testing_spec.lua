local osara = require "osara"
local testing = require "osara.testing"
local H = require "spec.helpers.host"

describe("osara.testing", function()
  after_each(H.cleanup)

  it("fake time runs timers in order and sleeps without waiting", function()
    local clock = testing.clock(100)
    local seen = {}
    osara.every(10, function() seen[#seen + 1] = "every@" .. osara.now() end)
    osara.after(15, function()
      seen[#seen + 1] = "after@" .. osara.now()
      osara.sleep(100)
      seen[#seen + 1] = "woke@" .. osara.now()
    end)
    local t0 = osara.monotonic()
    clock:advance(30)
    assert.are.same({ "every@110", "after@115", "every@120", "every@130" }, seen)
    clock:advance(100)
    local woke
    for _, v in ipairs(seen) do
      if v:match("^woke@") then woke = v end
    end
    assert.are.equal("woke@215", woke)
    clock:restore()
    assert.is_true(osara.monotonic() - t0 < 1e6) -- real time again
  end)

  it("loads a script and delivers messages to its Kafka and NATS handlers, capturing outputs", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local kafka = osara.kafka { ["group.id"] = "t" }
local nats = osara.nats {}
local Order = osara.schema { id = "integer" }
local out = kafka:topic("out")
kafka:handle("orders", { schema = Order, sink = out }, function(msg)
  if msg.value.id == 13 then error("unlucky") end
  return { id = msg.value.id, doubled = msg.value.id * 2 }
end)
nats:handle("price.*", function(msg) return { price = msg.value.q * 10 } end)
osara.every(1, function() end)
]])
    local app = testing.load(dir .. "/app.lua")
    local out = app:deliver("kafka", "orders (group t)", { value = { id = 21 }, key = "k" })
    assert.is_true(out.ok)
    assert.are.same({ { to = "out", value = { id = 21, doubled = 42 }, meta = { key = "k" } } }, out.sent)
    local bad = app:deliver("kafka", "orders (group t)", { raw = "{not json" })
    assert.are.equal("decode", bad.reason)
    local invalid = app:deliver("kafka", "orders (group t)", { value = { id = "x" } })
    assert.are.equal("schema", invalid.reason)
    assert.matches("/id: expected integer", invalid.error)
    local failed = app:deliver("kafka", "orders (group t)", { value = { id = 13 } })
    assert.are.equal("handler", failed.reason)
    assert.are.same({}, failed.sent)
    local reply = app:deliver("nats", "price.*", { value = { q = 2 }, reply = "inbox.1" })
    assert.are.same({ { to = "inbox.1", value = { price = 20 }, meta = { reply = true } } }, reply.sent)
  end)

  -- gh_14: testing.load used the real data folder beside the script and
  -- offset 0 for every delivery, so after one run a store handler's
  -- deliveries were all skipped as "already applied" and still "passed"
  local COUNTS = [[
local osara = require "osara"
local kafka = osara.kafka { ["group.id"] = "c" }
local counts = osara.store "counts"
local Click = osara.schema { user = "string" }
kafka:handle("clicks", { schema = Click, store = counts }, function(msg)
  local n = (msg.tx:get(msg.value.user) or 0) + 1
  msg.tx:set(msg.value.user, n)
  return { user = msg.value.user, n = n }
end)
osara.route("GET", "/counts/{user}", function(req, user)
  return { user = user, n = counts:get(user) or 0 }
end)
osara.route("POST", "/clicks", function(req) return 201, { got = req.value.user } end,
  { schema = Click })
osara.every(5, function() counts:set("ticked", (counts:get("ticked") or 0) + 1) end)
osara.every(5, function() error("second timer fails") end)
osara.spawn(function() end)
]]

  it("gives each load a fresh data folder and offsets in sequence, and says what happened", function()
    local dir = H.tmpdir()
    H.write(dir .. "/counts.lua", COUNTS)
    for run = 1, 2 do
      local app = testing.load(dir .. "/counts.lua")
      local a = app:deliver("kafka", "clicks (group c)", { value = { user = "ann" } })
      local b = app:deliver("kafka", "clicks (group c)", { value = { user = "ann" } })
      assert.is_true(a.ok and b.ok, "run " .. run)
      assert.are.same({ 0, 1 }, { a.msg.offset, b.msg.offset })
      assert.are.same({ { user = "ann", n = 2 } }, b.returned)
      local replay = app:deliver("kafka", "clicks (group c)", { value = { user = "ann" }, offset = 1 })
      assert.are.equal("already applied", replay.skipped)
      assert.are.same({}, replay.returned)
      local bad = app:deliver("kafka", "clicks (group c)", { raw = "not json" })
      assert.are.equal("decode", bad.reason)
      assert.are.same({ nil, nil }, { bad.skipped, nil })
      assert.are.equal(app.data_dir, app.data_dir:match("^.*%.osara%-test$"))
      app:close()
    end
    local f = io.open(dir .. "/.osara-data/counts/data.mdb")
    assert.is_nil(f, "the data folder beside the script was written")
  end)

  it("answers requests through the real router without a socket", function()
    local dir = H.tmpdir()
    H.write(dir .. "/counts.lua", COUNTS)
    local app = testing.load(dir .. "/counts.lua")
    app:deliver("kafka", "clicks (group c)", { value = { user = "bob" } })
    local res = app:request("GET", "/counts/bob")
    assert.are.equal(200, res.status)
    assert.are.same({ user = "bob", n = 1 }, res.body)
    assert.are.equal("application/json", res.headers["Content-Type"])
    local created = app:request("POST", "/clicks", { body = { user = "cy" } })
    assert.are.same({ 201, { got = "cy" } }, { created.status, created.body })
    local invalid = app:request("POST", "/clicks", { body = { user = 5 } })
    assert.are.equal(400, invalid.status)
    assert.are.equal("invalid body", invalid.body.error)
    assert.are.equal(404, app:request("GET", "/nope").status)
    assert.are.equal(405, app:request("DELETE", "/counts/bob").status)
    assert.are.equal(200, app:request("GET", "/healthz").status)
    app:close()
  end)

  it("captures timers and tasks instead of starting them; tick runs one", function()
    local dir = H.tmpdir()
    H.write(dir .. "/counts.lua", COUNTS)
    local app = testing.load(dir .. "/counts.lua")
    assert.are.equal(1, #app.tasks)
    assert.are.same({ "every 5 #1", "every 5 #2" }, { app.timers[1].key, app.timers[2].key })
    assert.is_true(app:tick("every 5 #1").ok)
    assert.is_true(app:tick("every 5 #1").ok)
    assert.are.same({ user = "ticked", n = 2 }, app:request("GET", "/counts/ticked").body)
    local failed = app:tick("every 5 #2")
    assert.is_false(failed.ok)
    assert.matches("second timer fails", failed.error)
    assert.has_error(function() app:tick("every 9") end,
      "no timer 'every 9' (timers: every 5 #1, every 5 #2)")
    app:close()
  end)
end)
