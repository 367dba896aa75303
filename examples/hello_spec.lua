-- Runs examples/hello.lua with the real binary and checks what it logs.
local H = require "spec.helpers.host"

describe("examples/hello.lua", function()
  it("says hello and ticks every second", function()
    local p = H.osara { "run", "examples/hello.lua" }
    H.expect(p, "hello from osara")
    H.expect(p, "tick 1 at", 3)
    p:kill("TERM")
    assert.are.equal(0, H.exit_status(p))
  end)

  it("passes osara check", function()
    local status, out = H.run { "check", "examples/hello.lua" }
    assert.are.equal(0, status)
    assert.matches("timer%s+every 1 #1", out)
  end)
end)
