-- Issue 14 item 4: structured logs. --log-format json puts the handler,
-- topic, partition, offset, subject, route, request id, where (file:line)
-- and the error in fields; osara.log.*(msg, {k = v}) adds fields, which
-- text lines append as k=v.
local H = require "spec.helpers.host"
local T = require "spec.helpers.http"
local cjson = require "cjson"

local APP = [[
local osara = require "osara"
local kafka = osara.kafka {}
local input = kafka:topic("in")
kafka:handle("in", { retry = false }, function(msg)
  osara.log.info("got %s", msg.value, { user = "ann", n = 3, ok = true, note = "a b" })
  if msg.value == "bad" then error("bad value") end
end)
osara.route("GET", "/x/{id}", function(req, id)
  osara.log.warn("in route", { id = id })
  error("route failed")
end)
osara.route("POST", "/send/{v}", function(req, v) input:send(v, { key = "k" }) return { ok = true } end)
osara.after(0, function() error("timer failed") end)
]]

local ERRORS = { "kafka in: handler failed", "http GET /x/7 failed", "error in after" }

-- The JSON objects of p's log whose msg contains text.
local function lines_with(p, text)
  local out = {}
  for line in p:output():gmatch("[^\n]+") do
    local ok, v = pcall(cjson.decode, line)
    if ok and type(v) == "table" and v.msg and v.msg:find(text, 1, true) then out[#out + 1] = v end
  end
  return out
end

local function exercise(p, port)
  local base = ("http://127.0.0.1:%d"):format(port)
  T.curl { base .. "/x/7" }
  T.curl { "-X", "POST", base .. "/send/good" }
  T.curl { "-X", "POST", base .. "/send/bad" }
  H.expect(p, "handler failed", 20)
end

describe("structured logs", function()
  after_each(H.cleanup)

  it("puts the entry's context, where and err in JSON fields", function()
    local dir = H.tmpdir()
    local p, port = T.app(dir, APP, { "--log-format", "json" }, { errors = ERRORS })
    exercise(p, port)
    H.stop(p)
    local app = dir .. "/app.lua"

    local got = lines_with(p, "got good")[1]
    assert.are.same({ "kafka in", "in", 0, app .. ":5", "ann", 3, true, "a b" },
      { got.handler, got.topic, got.offset, app .. ":5", got.user, got.n, got.ok, got.note })
    assert.are.equal(app .. ":5", got.where)
    assert.is_number(got.partition)

    local failed = lines_with(p, "kafka in: handler failed")[1]
    assert.are.equal("error", failed.level)
    assert.are.equal("kafka in", failed.handler)
    assert.are.equal(1, failed.offset)
    assert.are.equal(app .. ":6", failed.where)
    assert.are.equal(app .. ":6: bad value", failed.err)

    local route = lines_with(p, "in route")[1]
    assert.are.same({ "/x/{id}", "7", app .. ":9" }, { route.route, route.id, route.where })
    assert.matches("^%x+$", route.request_id) -- generated: hex (http.lua)
    local route_err = lines_with(p, "http GET /x/7 failed")[1]
    assert.are.equal("/x/{id}", route_err.route)
    assert.are.equal(route.request_id, route_err.request_id)
    assert.are.equal(app .. ":10", route_err.where)
    assert.are.equal(app .. ":10: route failed", route_err.err)

    local timer = lines_with(p, "error in after")[1]
    assert.are.equal(app .. ":13", timer.where)
    assert.are.equal(app .. ":13: timer failed", timer.err)
    assert.matches("^after at ", timer.handler)
  end)

  it("appends a call's fields as k=v to text lines, and only those", function()
    local dir = H.tmpdir()
    local p, port = T.app(dir, APP, nil, { errors = ERRORS })
    exercise(p, port)
    H.stop(p)
    local log = p:output()
    assert.matches('INFO  got good n=3 note="a b" ok=true user=ann\n', log, 1, true)
    assert.matches("WARN  in route id=7\n", log, 1, true)
    -- the context stays out of text lines: the message already says it
    assert.matches("kafka in: handler failed at in%[%d+%]@1: [^\n]*bad value\n", log)
  end)
end)
