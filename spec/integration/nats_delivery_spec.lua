-- Delivery on NATS (issue 13): the failure policy on JetStream consumers,
-- error replies to requests whose handler failed, publishes that fail their
-- input, a server that is late, and an embedded server that dies.
local osara = require "osara"
local H = require "spec.helpers.host"
local N = require "spec.helpers.nats"

-- Waits until p's whole output so far matches every pattern; returns it.
local function logged(p, patterns, timeout)
  local out
  H.eventually(function()
    p:line(0.05)
    out = p:output()
    for _, pat in ipairs(patterns) do
      if not out:find(pat) then return false end
    end
    return true
  end, timeout or 30, table.concat(patterns, ", "))
  return out
end

local function count(s, pattern)
  local n = 0
  for _ in s:gmatch(pattern) do n = n + 1 end
  return n
end

describe("nats JetStream failure policy", function()
  after_each(H.cleanup)

  it("naks with backoff, dead-letters the last attempt with every header, then terminates it", function()
    local server, url = N.server(nil, H.tmpdir())
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL") }
nats:add_stream { name = "PAY", subjects = { "pay.>" }, storage = "memory" }
nats:add_stream { name = "DEAD", subjects = { "dead.>" }, storage = "memory" }
local calls = {}
nats:handle("pay.>", { durable = "payer", stream = "PAY", batch = 4,
  retry = { max = 2, backoff = 0.05, jitter = 0 },
  dlq = "dead.pay",
  filter = function(msg) return msg.value.amount ~= 0 end,
  on_failure = function(msg, err, attempts)
    osara.log.info("on_failure seq=%d attempts=%d", msg.seq, attempts)
  end,
}, function(msg)
  local a = msg.value.amount
  calls[a] = (calls[a] or 0) + 1
  if a < 0 then error("negative amount") end
  if a == 13 and msg.attempt < 2 then error("transient") end
  osara.log.info("paid %d after attempt %d", a, msg.attempt)
end)
nats:handle("dead.>", { durable = "dead", stream = "DEAD", codec = "raw" }, function(msg)
  local h = msg.headers
  osara.log.info("dead raw=%s trace=%s kind=%s attempts=%s origin=%s first=%s error=%s",
    msg.raw, tostring(h.trace), h["osara-error-kind"], h["osara-attempts"], h["osara-origin"],
    tostring(h["osara-first-failure"]), h["osara-error"])
end)
-- max_deliver caps retry.max + 1; no dead letter: one error line
nats:handle("cap.>", { durable = "capper", stream = "CAP", retry = { backoff = 0.02 }, max_deliver = 2,
  on_failure = function(msg, err, attempts) osara.log.info("cap on_failure attempts=%d", attempts) end,
}, function(msg) error("always") end)
nats:add_stream { name = "CAP", subjects = { "cap.>" }, storage = "memory" }
osara.every(0.05, function()
  local termed = osara.metrics.value("osara_nats_js_termed_total")
  if termed == 3 then osara.log.info("termed=3 calls-5=%d", calls[-5] or 0) end
end)
osara.after(0, function() osara.log.info("ready") end)
]])
    local p = H.osara({ "run", dir .. "/app.lua" }, { NATS_URL = url },
      { errors = { "nats cap.>: handler failed at CAP/1/cap.x after 2 attempts: .*always" } })
    H.expect(p, "ready", 20)
    local nats = osara.nats { servers = url }
    assert(nats:jspublish("pay.eu", { amount = 0 }):wait())
    assert(nats:jspublish("pay.eu", { amount = -5 }, { headers = { trace = "t9" } }):wait())
    assert(nats:jspublish("pay.eu", "{broken", { codec = "raw" }):wait())
    assert(nats:jspublish("pay.eu", { amount = 13 }):wait())
    assert(nats:jspublish("pay.eu", { amount = 7 }):wait())
    assert(nats:jspublish("cap.x", { amount = 1 }):wait())
    local out = logged(p, { "paid 13 after attempt 2", "paid 7 after attempt 1", "dead raw=.-dead raw=",
                            "cap on_failure attempts=2", "termed=3" })
    assert.matches("termed=3 calls%-5=3", out)
    assert.matches('dead raw={"amount":%-5} trace=t9 kind=handler attempts=3 origin=PAY/2/pay.eu '
      .. "first=%d+%.%d%d%d error=.*negative amount", out)
    assert.matches("dead raw={broken trace=nil kind=decode attempts=1 origin=PAY/3/pay.eu first=%d+%.%d%d%d error=json:", out)
    assert.matches("on_failure seq=2 attempts=3", out)
    assert.matches("handler failed at PAY/2/pay.eu %(attempt 1 of 3, again in 0.05 s%)", out)
    assert.matches("handler failed at PAY/2/pay.eu %(attempt 2 of 3, again in 0.10 s%)", out)
    assert.are.equal(1, count(out, "paid 13 "))
    assert.are.equal(0, count(out, "paid 0 "))
    H.stop(p)
    -- terminated messages never come back: a restart sees none of them
    local p2 = H.osara({ "run", dir .. "/app.lua" }, { NATS_URL = url })
    H.expect(p2, "ready", 20)
    assert(nats:jspublish("pay.eu", { amount = 8 }):wait())
    H.expect(p2, "paid 8 after attempt 1", 20)
    out = p2:output()
    assert.is_nil(out:find("negative amount"), out)
    assert.is_nil(out:find("dead raw="), out)
    H.stop(p2)
    H.stop(server)
  end)

  it("publishes a durable handler's return values to its sink", function()
    local server, url = N.server(nil, H.tmpdir())
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL") }
nats:add_stream { name = "S", subjects = { "s.in" }, storage = "memory" }
nats:handle("s.in", { durable = "s", stream = "S", sink = "s.out" }, function(msg)
  return { doubled = msg.value.n * 2 }
end)
nats:handle("s.out", function(msg) osara.log.info("out %d", msg.value.doubled) end)
]])
    local p = H.osara({ "run", dir .. "/app.lua" }, { NATS_URL = url })
    logged(p, { "nats: stream S ready", "nats: subscribed to s.out" }, 20)
    local nats = osara.nats { servers = url }
    assert(nats:jspublish("s.in", { n = 21 }):wait())
    H.expect(p, "out 42", 20)
    H.stop(p)
    H.stop(server)
  end)

  it("keeps a message whose dead letter is not stored and redelivers it", function()
    local server, url = N.server(nil, H.tmpdir())
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL") }
nats:add_stream { name = "W", subjects = { "w.>" }, storage = "memory" }
nats:handle("w.>", { durable = "w", stream = "W", retry = false, dlq = "nowhere.w" },
  function(msg) osara.log.info("attempt %d", msg.attempt) error("fails") end)
osara.after(0, function() osara.log.info("ready") end)
]])
    local p = H.osara({ "run", dir .. "/app.lua" }, { NATS_URL = url },
      { errors = { "error in nats handler w.>", "dead letter to nowhere.w not stored" } })
    H.expect(p, "ready", 20)
    local nats = osara.nats { servers = url }
    assert(nats:jspublish("w.1", { n = 1 }):wait())
    local out = logged(p, { "attempt 2" }, 30)
    assert.matches("dead letter to nowhere.w not stored %(is nowhere.w in a stream%?%)", out)
    H.stop(p)
    H.stop(server)
  end)
end)

describe("nats requests whose handler fails", function()
  after_each(H.cleanup)

  it("get an error reply (osara-error headers, a JSON body without the error text), not a timeout", function()
    local server, url = N.server()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL") }
local Order = osara.schema { qty = osara.integer { min = 1 } }
nats:handle("orders.price", { schema = Order, retry = { max = 1, backoff = 0.01 }, max_bytes = 64 }, function(msg)
  if msg.value.qty == 13 then error("secret detail of the code") end
  return { total = msg.value.qty * 2 }
end)
]])
    local p = H.osara({ "run", dir .. "/app.lua" }, { NATS_URL = url },
      { errors = { "nats orders.price: %S+ failed at orders.price" } })
    N.subscribed(p, { "orders.price" })
    local nats = osara.nats { servers = url }
    local r, err = nats:request("orders.price", { qty = 2 }, { timeout = 5 })
    assert.are.equal(4, r and r.value.total, err)
    local e
    r, err, e = nats:request("orders.price", { qty = 13 }, { timeout = 5 })
    assert.is_nil(r)
    assert.are.equal("handler: internal error", err)
    assert.are.same({ error = "internal error", kind = "handler" }, e.value)
    assert.are.equal("handler", e.headers["osara-error-kind"])
    assert.is_nil(e.raw:find("secret"))
    r, err, e = nats:request("orders.price", { qty = 0 }, { timeout = 5 })
    assert.are.equal("schema: invalid body", err)
    assert.are.equal("schema", e.value.kind)
    assert.are.equal("/qty", e.value.errors[1].path)
    r, err, e = nats:request("orders.price", "{oops", { timeout = 5, codec = "raw" })
    assert.are.equal("decode: invalid body", err)
    r, err, e = nats:request("orders.price", { pad = string.rep("x", 100) }, { timeout = 5 })
    assert.are.equal("too_large: payload too large", err)
    H.stop(p)
    H.stop(server)
  end)
end)

describe("nats outputs", function()
  after_each(H.cleanup)

  it("a publish refused by a full reconnect buffer fails its JetStream input, which is redelivered until it is sent", function()
    local server, url = N.server(nil, H.tmpdir())
    local out_server, out_url, out_port = N.server()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL") }
local out = osara.nats { servers = os.getenv("NATS_OUT"), name = "out" }
nats:add_stream { name = "IN", subjects = { "in.>" }, storage = "memory" }
nats:handle("in.>", { durable = "in", stream = "IN", batch = 1,
                      retry = { max = 1000, backoff = 0.05, max_backoff = 0.2, jitter = 0 } }, function(msg)
  -- nil, err let go, as handlers do
  local ok = out:publish("big", string.rep("x", 900000), { codec = "raw" })
  osara.log.info("published %d attempt %d ok=%s failed=%d", msg.value.n, msg.attempt, tostring(ok),
    osara.metrics.value("osara_nats_publish_failed_total"))
end)
osara.after(0, function() osara.log.info("ready") end)
]])
    local p = H.osara({ "run", dir .. "/app.lua" }, { NATS_URL = url, NATS_OUT = out_url })
    H.expect(p, "ready", 20)
    H.stop(out_server)
    H.expect(p, "nats " .. out_url .. ": disconnected", 20)
    local nats = osara.nats { servers = url }
    for n = 1, 12 do assert(nats:jspublish("in.x", { n = n }):wait()) end
    logged(p, { "an output was not published: nats: publish to big: " }, 30)
    out_server = N.server(out_port)
    local seen = {}
    H.eventually(function()
      p:line(0.05)
      for n in p:output():gmatch("published (%d+) attempt %d+ ok=true") do seen[tonumber(n)] = true end
      for n = 1, 12 do if not seen[n] then return false end end
      return true
    end, 60, "all 12 published")
    local out = p:output()
    assert.matches("published %d+ attempt [2-9]%d* ok=true failed=[1-9]", out)
    H.stop(p)
    H.stop(out_server)
    H.stop(server)
  end)

  it("a JetStream publish without an ack fails the handler's call, which takes the failure policy", function()
    local server, url = N.server(nil, H.tmpdir())
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL") }
nats:handle("jp", { retry = { max = 1, backoff = 0.01 },
  on_failure = function(msg, err, attempts)
    osara.log.info("on_failure attempts=%d js_failed=%d", attempts,
      osara.metrics.value("osara_nats_js_publish_failed_total"))
  end }, function(msg)
  nats:jspublish("nostream.x", msg.value) -- never waited for by the handler
end)
]])
    local p = H.osara({ "run", dir .. "/app.lua" }, { NATS_URL = url },
      { errors = { "nats jp: handler failed at jp after 2 attempts: an output was not published: " } })
    N.subscribed(p, { "jp" })
    local nats = osara.nats { servers = url }
    nats:publish("jp", { n = 1 })
    nats:flush()
    H.expect(p, "on_failure attempts=2 js_failed=2", 20)
    H.stop(p)
    H.stop(server)
  end)
end)

describe("a broker that is not up yet", function()
  after_each(H.cleanup)

  it("nats: the host keeps trying, says so every few seconds and handles once the server appears", function()
    local probe, _, port = N.server()
    H.stop(probe) -- a port nobody listens on now
    local url = "nats://127.0.0.1:" .. port
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL") }
nats:handle("late.echo", function(msg) return { echo = msg.value.n } end)
]])
    local p = H.osara({ "run", dir .. "/app.lua" }, { NATS_URL = url })
    H.expect(p, "nats " .. url .. ": not reachable yet; trying again in the background", 20)
    H.expect(p, "nats " .. url .. ": not connected yet after 5 s; still trying", 20)
    assert.is_falsy(p.exited)
    local server = N.server(port)
    H.expect(p, "nats " .. url .. ": connected", 20)
    N.subscribed(p, { "late.echo" }, 20)
    local nats = osara.nats { servers = url }
    local r, err = nats:request("late.echo", { n = 7 }, { timeout = 5 })
    assert.are.equal(7, r and r.value.echo, err)
    H.stop(p)
    H.stop(server)
  end)

  it("gh_12 JetStream: add_stream and the durable consumer wait off the loop for a late server", function()
    local probe, _, port = N.server()
    H.stop(probe)
    local url = "nats://127.0.0.1:" .. port
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL") }
nats:add_stream { name = "LATE", subjects = { "late.>" }, storage = "memory" }
nats:handle("late.>", { durable = "late", stream = "LATE" }, function(msg)
  osara.log.info("handled %d", msg.value.n)
end)
osara.every(0.05, function() end) -- the loop keeps turning
]])
    -- a loop turn of 100 ms or more is a "loop stall" line, which fails the spec
    local p = H.osara({ "run", "--loop-stall-ms", "100", dir .. "/app.lua" }, { NATS_URL = url })
    H.expect(p, "nats: stream LATE: ", 20)
    H.expect(p, "nats: durable late on late.>: ", 20)
    local server = N.server(port, H.tmpdir())
    H.expect(p, "nats: stream LATE ready", 30)
    H.expect(p, "nats: durable late bound to stream LATE", 30)
    local nats = osara.nats { servers = url }
    assert(nats:jspublish("late.x", { n = 5 }):wait())
    H.expect(p, "handled 5", 20)
    H.stop(p)
    H.stop(server)
  end)

  it("kafka: the host neither exits nor blocks while its bootstrap server is not there, then handles", function()
    local K = require "spec.helpers.kafka"
    local probe, _, port = N.server()
    H.stop(probe) -- a port nobody listens on now
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local kafka = osara.kafka { ["bootstrap.servers"] = os.getenv("KAFKA_BROKERS"), ["group.id"] = "late" }
kafka:handle("late.in", { codec = "raw" }, function(msg) osara.log.info("got %s", msg.raw) end)
osara.every(0.2, function() osara.log.info("tick") end)
]])
    local boot = "127.0.0.1:" .. port
    local p = H.osara({ "run", dir .. "/app.lua" }, { KAFKA_BROKERS = boot })
    H.expect(p, boot, 30) -- librdkafka's connection errors are logged
    for _ = 1, 10 do H.expect(p, "tick", 10) end -- the loop turns
    assert.is_falsy(p.exited)
    local broker = K.broker { "--port", tostring(port) }
    H.eventually(function()
      K.produce(boot, "late.in", { "hello" })
      p:line(0.5)
      return p:output():find("got hello", 1, true)
    end, 60, "the handler runs once the broker is up")
    H.stop(p, { timeout = 30 })
    H.stop(broker)
  end)
end)

describe("the embedded nats-server", function()
  after_each(H.cleanup)

  it("is reaped, restarted and reconnected to when it dies, and handling resumes", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats {}
nats:handle("emb.echo", function(msg) return { echo = msg.value.n } end)
]])
    local p = H.osara { "run", "--data", dir .. "/data", dir .. "/app.lua" }
    local line = H.expect(p, "embedded server (pid", 20)
    local pid, url = line:match("pid (%d+).* at (nats://[%d.:]+)")
    N.subscribed(p, { "emb.echo" }, 20)
    local nats = osara.nats { servers = url }
    local r, err = nats:request("emb.echo", { n = 1 }, { timeout = 5 })
    assert.are.equal(1, r and r.value.echo, err)
    os.execute("kill -9 " .. pid)
    H.expect(p, ("the embedded server (pid %s) was killed by signal 9; restarting it in 0.1 s"):format(pid), 20)
    local restarted = H.expect(p, "embedded server restarted (pid", 20)
    assert.matches("restart 1%) at " .. url:gsub("%p", "%%%0"), restarted)
    -- reaped: no zombie left behind
    assert.are_not.equal(0, os.execute("kill -0 " .. pid .. " 2>/dev/null"))
    H.eventually(function()
      local r2 = nats:request("emb.echo", { n = 2 }, { timeout = 1 })
      return r2 and r2.value.echo == 2
    end, 30, "a reply from the restarted server")
    H.stop(p)
  end)
end)
