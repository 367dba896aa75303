-- Kafka handler sinks beyond topics (issue 19, slipstream's `sink=[cache,
-- print]`): functions, stores, lists; emit keeps the input's key.
local testing = require "osara.testing"
local H = require "spec.helpers.host"

local function load(src)
  local dir = H.tmpdir()
  H.write(dir .. "/app.lua", src)
  return testing.load(dir .. "/app.lua")
end

describe("kafka handler sinks", function()
  it("emit and return values keep the input's key unless told otherwise", function()
    local app = load [[
local osara = require "osara"
local kafka = osara.kafka { ["group.id"] = "s" }
kafka:handle("in", { sink = kafka:topic("out") }, function(msg, emit)
  emit("a")
  emit("b", { key = "other" })
  emit("c", { headers = { h = "1" } })
  return "d"
end)
]]
    local r = app:deliver("kafka", "in (group s)", { key = "user1", value = 1 })
    assert.is_true(r.ok, r.error)
    local keys = {}
    for i, o in ipairs(r.sent) do keys[i] = { o.value, o.meta and o.meta.key } end
    assert.are.same({ { "a", "user1" }, { "b", "other" }, { "c", "user1" }, { "d", "user1" } }, keys)
    assert.are.same({ h = "1" }, r.sent[3].meta.headers)
  end)

  it("sends to a function, a store (feeding watch) and a topic in one list", function()
    local app = load [[
local osara = require "osara"
local kafka = osara.kafka { ["group.id"] = "s" }
local cache = osara.store "cache"
printed = {}
local function show(v) printed[#printed + 1] = v end
kafka:handle("ticks", { sink = { cache, show, kafka:topic("copy") } }, function(msg, emit)
  emit(msg.value.time)
end)
]]
    local r = app:deliver("kafka", "ticks (group s)", { key = "time", value = { time = "10:00:01" } })
    assert.is_true(r.ok, r.error)
    assert.are.same({ "10:00:01" }, rawget(_G, "printed"))
    assert.are.equal(1, #r.sent)
    local cache = require("osara").store("cache", { dir = app.data_dir })
    assert.are.equal("10:00:01", cache:get("time"))
    rawset(_G, "printed", nil)
  end)

  it("fails the input when a store sink gets no key, and refuses a bad sink at load", function()
    local app = load [[
local osara = require "osara"
local kafka = osara.kafka { ["group.id"] = "s" }
kafka:handle("in", { retry = false, sink = osara.store "cache" }, function(msg, emit)
  local ok, err = emit(msg.value)
  if not ok then error(err) end
end)
]]
    local r = app:deliver("kafka", "in (group s)", { value = 5 })
    assert.is_false(r.ok)
    assert.matches("a store sink needs a key", r.error)
    local dir = H.tmpdir()
    H.write(dir .. "/bad.lua", [[
local osara = require "osara"
local kafka = osara.kafka { ["group.id"] = "s" }
kafka:handle("in", { sink = { kafka:topic("a"), 42 } }, function() end)
]])
    local ok, err = pcall(testing.load, dir .. "/bad.lua")
    assert.is_false(ok)
    assert.matches("sink 2 is number, not a topic, a function or a store", err)
  end)
end)
