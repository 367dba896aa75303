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

  it("loads a script, captures its registrations and calls a handler", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
osara.every(1, function() end, { name = "beat" })
osara._vm.register("timer", "custom", "", function(msg)
  return msg.value.n * 2
end, { codec = "json" }, "app.lua:3", "")
]])
    local app = testing.load(dir .. "/app.lua")
    assert.are.equal(1, #app.registrations) -- the real timer was not captured as a registration
    local out = app:deliver("timer", "custom", { value = { n = 21 } })
    assert.is_true(out.ok)
    assert.are.same({ 42 }, out.returned)
    local bad = app:deliver("timer", "custom", { raw = "{not json" })
    assert.is_false(bad.ok)
    assert.are.equal("decode", bad.reason)
  end)
end)
