-- `osara test examples/first_hour`: the handler and the route without a
-- broker or a socket (osara.testing).
local testing = require "osara.testing"
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"

describe("first hour app", function()
  local app
  before_each(function() app = testing.load(here .. "app.lua") end)
  after_each(function() app:close() end)

  it("adds each order to its user's total", function()
    assert.is_true(app:deliver("kafka", "orders (group shop)", { value = { id = 1, user = "ann", amount = 5 } }).ok)
    local out = app:deliver("kafka", "orders (group shop)", { value = { id = 2, user = "ann", amount = 7 } })
    assert.are.same({ { user = "ann", total = 12 } }, out.returned)
    local res = app:request("GET", "/totals/ann")
    assert.are.same({ 200, { user = "ann", total = 12 } }, { res.status, res.body })
  end)

  it("refuses an order that breaks the schema", function()
    local out = app:deliver("kafka", "orders (group shop)", { value = { id = 3, user = "bob", amount = -1 } })
    assert.are.equal("schema", out.reason)
    assert.are.equal(0, app:request("GET", "/totals/bob").body.total)
  end)
end)
