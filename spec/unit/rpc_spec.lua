-- osara.rpc's message handling without a socket: osara.rpc._dispatch is
-- what host/ws runs for each text message.
local osara = require "osara"
local cjson = require "cjson"

local function call(msg)
  local reply = osara.rpc._dispatch(type(msg) == "string" and msg or cjson.encode(msg))
  return reply and cjson.decode(reply)
end

describe("osara.rpc dispatch", function()
  setup(function()
    osara.rpc.expose("unit_concat", function(a, b, c) return tostring(a) .. tostring(b) .. tostring(c) end)
    osara.rpc.expose("unit_named", function(t) return t.x * 2 end, { doc = "doubles x" })
    osara.rpc.expose("unit_nothing", function() end)
    osara.rpc.expose("unit_bad_result", function() return { f = print } end)
  end)

  it("passes positional params, null as nil", function()
    assert.are.equal("anil3", call { id = 1, method = "unit_concat", params = { "a", cjson.null, 3 } }.result)
  end)

  it("passes named params as one table", function()
    assert.are.equal(42, call { id = "x", method = "unit_named", params = { x = 21 } }.result)
  end)

  it("answers null for no result and nothing for a notification", function()
    local r = call { id = 2, method = "unit_nothing" }
    assert.are.equal(cjson.null, r.result)
    assert.are.equal("2.0", r.jsonrpc)
    assert.is_nil(call { method = "unit_nothing" })
  end)

  it("answers -32603 when the result is not JSON", function()
    assert.are.equal(-32603, call { id = 3, method = "unit_bad_result" }.error.code)
  end)

  it("refuses reserved and duplicate names, naming the first registration", function()
    assert.has_error(function() osara.rpc.expose("rpc.x", function() end) end)
    local ok, err = pcall(osara.rpc.expose, "unit_concat", function() end)
    assert.is_false(ok)
    assert.matches("already exposed %(at .*rpc_spec.lua:%d+%)", err)
    assert.has_error(function() osara.rpc.expose("unit_x", function() end, { dok = "typo" }) end)
  end)

  it("describes a target: its parameters and doc", function()
    assert.are.same({ target = "unit_named", args = { "t" }, doc = "doubles x" },
      call { id = 4, method = "rpc.info", params = { "unit_named" } }.result)
    assert.are.equal(-32601, call { id = 5, method = "rpc.info", params = { "nope" } }.error.code)
  end)

  it("rejects a client URL that is not ws://", function()
    assert.has_error(function() osara.rpc.client("http://x/rpc") end)
    assert.has_error(function() osara.rpc.client("ws://x/rpc", { timeot = 1 }) end)
  end)
end)
