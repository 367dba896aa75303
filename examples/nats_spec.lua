-- Runs the panini-style NATS examples with the real binary (embedded
-- nats-server each) and checks what they log.
local H = require "spec.helpers.host"

local function run(example, text, timeout)
  local dir = H.tmpdir()
  local p = H.osara { "run", "--data", dir, "examples/" .. example }
  H.expect(p, text, timeout or 15)
  H.stop(p)
  assert.is_nil(p:output():find("deprecated", 1, true), "the example uses a deprecated spelling (docs/api.md)")
end

describe("NATS examples", function()
  after_each(H.cleanup)

  it("nats_publish.lua receives what its task and timer publish", function()
    run("nats_publish.lua", "got message 10: value1")
  end)

  it("nats_request.lua gets its ten responses", function()
    run("nats_request.lua", "response 10: request has been processed")
  end)

  it("nats_validators.lua handles valid messages and reports the invalid one", function()
    local dir = H.tmpdir()
    local p = H.osara({ "run", "--data", dir, "examples/nats_validators.lua" }, nil,
                      { errors = { "schema failed" } })
    H.expect(p, "got valid message 3: value1", 15)
    local line = H.expect(p, "schema failed", 5)
    assert.matches("/key1: expected string, got integer", line)
    H.stop(p)
  end)

  it("nats_reply_to.lua receives responses on the third subject", function()
    run("nats_reply_to.lua", "received response 10 on reply.to.subject")
  end)
end)
