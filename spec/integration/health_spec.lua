-- Issue 14 item 3: health that tells the truth, and metrics that count
-- what they say. /healthz is liveness (the loop turns), /readyz is
-- readiness (every client connected, consumers assigned, not stopping).
local H = require "spec.helpers.host"
local T = require "spec.helpers.http"
local N = require "spec.helpers.nats"
local cjson = require "cjson"

local function get(port, path)
  local status, _, body = T.curl { ("http://127.0.0.1:%d%s"):format(port, path) }
  local ok, decoded = pcall(cjson.decode, body)
  return status, ok and decoded or body
end

-- The value of one series in Prometheus text (0 when absent).
local function metric(port, series)
  local _, text = get(port, "/metrics")
  local v = text:match("\n" .. series:gsub("[%-%.%[%]%(%)%+%*%?%^%$%%]", "%%%0") .. " ([%d.e+%-]+)")
  return tonumber(v) or 0
end

-- The first series whose name and labels contain all the given texts.
local function metric_like(port, name, ...)
  local _, text = get(port, "/metrics")
  for line in text:gmatch("[^\n]+") do
    if line:sub(1, #name + 1) == name .. "{" or line:sub(1, #name + 1) == name .. " " then
      local all = true
      for _, part in ipairs { ... } do all = all and line:find(part, 1, true) ~= nil end
      if all then return tonumber(line:match(" ([%d.e+%-]+)$")) end
    end
  end
  return 0
end

describe("health", function()
  after_each(H.cleanup)

  it("/readyz answers 503 naming a Kafka client whose broker is down, /healthz stays 200", function()
    local dir = H.tmpdir()
    local p, port = T.app(dir, [[
local osara = require "osara"
local kafka = osara.kafka { ["bootstrap.servers"] = "127.0.0.1:1" }
kafka:handle("orders", function(msg) end)
osara.route("GET", "/x", function() return { ok = true } end)
]])
    local body = H.eventually(function()
      local status, b = get(port, "/readyz")
      return status == 503 and type(b) == "table" and b.not_ready and b
    end, 15, "/readyz to answer 503")
    assert.are.equal("not ready", body.status)
    assert.matches("^kafka 127%.0%.0%.1:1: ", body.not_ready[1])
    local status, live = get(port, "/healthz")
    assert.are.equal(200, status)
    assert.are.equal("ok", live.status)
    H.stop(p)
  end)

  it("/readyz turns 200 once the embedded Kafka consumer is assigned", function()
    local dir = H.tmpdir()
    local p, port = T.app(dir, [[
local osara = require "osara"
osara.http {}
local kafka = osara.kafka {}
kafka:handle("orders", function(msg) end)
]])
    local body = H.eventually(function()
      local status, b = get(port, "/readyz")
      return status == 200 and b
    end, 15, "/readyz to answer 200")
    assert.are.equal("ready", body.status)
    assert.is_nil(body.not_ready)
    local names = {}
    for _, c in ipairs(body.checks) do names[#names + 1] = c.name end
    assert.are.equal("host", names[1])
    assert.matches("^kafka 127%.0%.0%.1:", names[2])
    H.stop(p)
  end)

  it("/readyz names a NATS client whose server went away", function()
    local server, url = N.server()
    local dir = H.tmpdir()
    local p, port = T.app(dir, ([[
local osara = require "osara"
osara.http {}
local nats = osara.nats { servers = %q }
nats:handle("in", function(msg) end)
]]):format(url))
    H.eventually(function() return get(port, "/readyz") == 200 end, 10, "/readyz to answer 200")
    H.stop(server)
    local body = H.eventually(function()
      local status, b = get(port, "/readyz")
      return status == 503 and b
    end, 10, "/readyz to answer 503")
    assert.are.equal("nats " .. url .. ": reconnecting", body.not_ready[1])
    H.stop(p)
  end)
end)

describe("metrics count what they say", function()
  after_each(H.cleanup)

  it("counts a raising Kafka handler in failed_total, not handled_total, and every Lua error", function()
    local dir = H.tmpdir()
    local p, port = T.app(dir, [[
local osara = require "osara"
local kafka = osara.kafka {}
local input = kafka:topic("in")
kafka:handle("in", { retry = { max = 1, backoff = 0 } }, function(msg)
  if msg.value == "bad" then error("boom " .. msg.value) end
end)
osara.route("POST", "/send/{v}", function(req, v) input:send(v) return { sent = v } end)
osara.route("GET", "/boom", function() error("route boom") end)
local ticks = 0
osara.every(0.05, function()
  ticks = ticks + 1
  if ticks == 1 then error("timer boom") end
end)
osara.spawn(function() error("task boom") end)
]], nil, { errors = { "kafka in: handler failed", "error in timer", "error in task",
                       "http GET /boom failed" } })
    -- the timer and the task raised once each
    H.eventually(function() return metric(port, "osara_lua_errors_total") >= 2 end, 10, "timer + task errors")
    assert.are.equal(2, metric(port, "osara_lua_errors_total"))
    assert.are.equal(500, (get(port, "/boom")))
    assert.are.equal(3, metric(port, "osara_lua_errors_total"))
    get(port, "/send/good") -- GET of a POST route: 405, nothing sent
    T.curl { "-X", "POST", ("http://127.0.0.1:%d/send/good"):format(port) }
    T.curl { "-X", "POST", ("http://127.0.0.1:%d/send/bad"):format(port) }
    H.eventually(function()
      return metric(port, "osara_kafka_handled_total") + metric(port, "osara_kafka_failed_total") >= 2
    end, 15, "both messages handled")
    assert.are.equal(2, metric(port, "osara_kafka_consumed_total"))
    assert.are.equal(1, metric(port, "osara_kafka_handled_total"))
    assert.are.equal(1, metric(port, "osara_kafka_failed_total"))
    assert.are.equal(2, metric(port, "osara_kafka_produced_total"))
    -- two attempts raised (retry max = 1): both are Lua errors
    assert.are.equal(5, metric(port, "osara_lua_errors_total"))
    assert.are.equal(1, metric_like(port, "osara_retries_total", 'kind="kafka"', 'name="in"'))
    assert.are.equal(1, metric_like(port, "osara_bad_input_total", 'kind="kafka"', 'reason="handler"'))
    H.stop(p)
  end)

  it("counts NATS messages received, handled, failed and replies", function()
    local server, url = N.server()
    local dir = H.tmpdir()
    local p, port = T.app(dir, ([[
local osara = require "osara"
local nats = osara.nats { servers = %q }
nats:handle("echo", { retry = false }, function(msg)
  if msg.value == "bad" then error("nats boom") end
  if msg.value == "slow" then osara.sleep(1) end
  return msg.value
end)
osara.route("GET", "/ask/{v}", function(req, v)
  local r, err = nats:request("echo", v, { timeout = 0.5 })
  return { reply = r and r.value, err = err }
end)
]]):format(url), nil, { errors = { "nats echo: handler failed" } })
    N.subscribed(p, { "echo" })
    local _, ok = get(port, "/ask/hi")
    assert.are.equal("hi", ok.reply)
    local _, failed = get(port, "/ask/bad") -- answered with an error reply
    assert.matches("internal error", failed.err)
    local _, late = get(port, "/ask/slow") -- answered after the 0.5 s timeout
    assert.are.equal("timeout", late.err)
    H.eventually(function() return metric(port, "osara_nats_handled_total") == 2 end, 5, "the slow one")
    assert.are.equal(3, metric(port, "osara_nats_requests_total"))
    assert.are.equal(3, metric(port, "osara_nats_received_total"))
    assert.are.equal(1, metric(port, "osara_nats_failed_total"))
    assert.are.equal(1, metric(port, "osara_nats_request_timeouts_total"))
    assert.are.equal(1, metric(port, "osara_lua_errors_total"))
    assert.are.equal(3, metric(port, "osara_nats_replies_total")) -- the error reply too
    H.stop(p)
    H.stop(server)
  end)
end)
