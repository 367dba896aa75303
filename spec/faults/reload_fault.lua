-- Fault: reloads under load (issue 13 item 4): every kind of shared
-- resource changes at each reload while Kafka messages and NATS requests
-- flow (the machinery of issue 12's reload50 spec, spec/helpers/reloads.lua).
-- 0 lost, 0 duplicated.
local H = require "spec.helpers.host"
local F = require "spec.helpers.faults"
local R = require "spec.helpers.reloads"

local RELOADS = F.size(30, 100)

describe("fault suite", function()
  after_each(H.cleanup)

  it("reload: reloads under load lose and repeat nothing", function()
    local line, n = R.run(RELOADS, "reload")
    assert.are.same({ kafka_lost = 0, dup = 0, nats_lost = 0 }, n, line)
  end)
end)
