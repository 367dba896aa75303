-- AMQP through the real binary against a real rabbitmq-server (one per
-- file: it takes 10-70 s to start), with an independent client (pika,
-- spec/tools/amqp_tool.py) on the other side.
local osara = require "osara"
local H = require "spec.helpers.host"
local R = require "spec.helpers.rabbitmq"

local TOOL = "spec/tools/amqp_tool.py"

local server

-- Runs the pika tool to completion; returns its output.
local function tool(...)
  local p = H.child({ "/usr/bin/python3", TOOL, ... }, { name = "amqp_tool" })
  H.finish(p, { timeout = 60 })
  return p:output()
end

-- Starts `osara run` on the app text; returns the process once every
-- consumer it names is consuming.
local function host(dir, text, consumers, opts)
  opts = opts or {}
  H.write(dir .. "/app.lua", text)
  local args = { "run", dir .. "/app.lua" }
  for _, a in ipairs(opts.args or {}) do args[#args + 1] = a end
  local p = H.osara(args, { AMQP_URL = server.url }, { errors = opts.errors })
  for _, name in ipairs(consumers or {}) do
    H.expect(p, "amqp: consuming " .. name .. " ", 30)
  end
  return p
end

-- Reads p's lines until n of them matched pattern (its first capture is
-- counted); returns {capture = count}, the total.
local function collect(p, pattern, n, timeout, got)
  got = got or {}
  local count = 0
  for _, c in pairs(got) do count = count + c end
  H.eventually(function()
    local l = p:line(0.1)
    while l do
      local v = l:match(pattern)
      if v then
        got[v] = (got[v] or 0) + 1
        count = count + 1
      end
      l = p:line(0.001)
    end
    return count >= n
  end, timeout or 30, ("%d lines matching %s"):format(n, pattern))
  return got, count
end

describe("amqp", function()
  setup(function()
    server = R.start()
  end)
  teardown(function()
    if server then server:stop() end
  end)
  after_each(H.cleanup)

  it("round-trips through an exchange with an independent client, and stamps events", function()
    local dir = H.tmpdir()
    local p = host(dir, [[
local osara = require "osara"
local amqp = osara.amqp { url = os.getenv("AMQP_URL"), service = "rt_service" }
amqp:handle({ exchange = "rt_in", routing_key = "order.*", queue = "rt_orders" }, function(msg, event)
  osara.log.info("order %d via %s/%s ct=%s", msg.value.i, msg.exchange, msg.routing_key,
    tostring(msg.content_type))
  assert(event("order_seen", { i = msg.value.i }))
end)
amqp:handle({ exchange = "rt_service", routing_key = "order_seen" }, function(msg)
  osara.log.info("seen %d from %s", msg.value.i, msg.headers["x-service"])
end)
]], { "rt_in/order.*", "rt_service/order_seen" })
    -- a queue of our own on the service's exchange sees the events too
    local out = tool("pub", server.url, "rt_in", "order.new", "3")
    assert.matches("published 3", out)
    local seen = collect(p, "seen (%d) from rt_service", 3)
    assert.same({ ["1"] = 1, ["2"] = 1, ["3"] = 1 }, seen)
    assert.matches("order 2 via rt_in/order.new ct=application/json", p:output())
    H.stop(p)
    assert.matches("count 0", tool("count", server.url, "rt_orders"))
  end)

  it("publishes with confirms to an exchange an independent client reads", function()
    local dir = H.tmpdir()
    -- the reader's queue, bound before anything is published
    local p = host(dir, [[
local osara = require "osara"
local amqp = osara.amqp { url = os.getenv("AMQP_URL") }
amqp:handle({ exchange = "pub_out", routing_key = "x", queue = "pub_reader" }, { max_inflight = 1 },
  function(msg) osara.log.info("reader %d", msg.value.n) end)
osara.after(0.5, function()
  for n = 1, 5 do
    local ok, err = amqp:publish("pub_out", "x", { n = n }, { headers = { trace = "t" .. n } })
    osara.log.info("confirmed %d %s", n, tostring(ok and "ok" or err))
  end
end)
]], { "pub_out/x" })
    local got = collect(p, "reader (%d)", 5)
    assert.same({ ["1"] = 1, ["2"] = 1, ["3"] = 1, ["4"] = 1, ["5"] = 1 }, got)
    -- (the reader may see message 5 before the publisher's confirm arrives)
    H.eventually(function() return p:output():find("confirmed 5 ok", 1, true) end, 10, "confirm 5")
    -- max_inflight = 1 keeps the queue's order
    local order = {}
    for n in p:output():gmatch("reader (%d)") do order[#order + 1] = tonumber(n) end
    assert.same({ 1, 2, 3, 4, 5 }, order)
    H.stop(p)
  end)

  it("splits a named queue between two hosts and broadcasts to exclusive queues", function()
    local app = [[
local osara = require "osara"
local amqp = osara.amqp { url = os.getenv("AMQP_URL"), prefetch = 4 }
amqp:handle({ exchange = "share", routing_key = "job", queue = "share_jobs" }, function(msg)
  osara.sleep(0.01)
  osara.log.info("job %d", msg.value.i)
end)
amqp:handle({ exchange = "share", routing_key = "news" }, function(msg)
  osara.log.info("news %d", msg.value.i)
end)
]]
    local a = host(H.tmpdir(), app, { "share/job", "share/news" })
    local b = host(H.tmpdir(), app, { "share/job", "share/news" })
    tool("pub", server.url, "share", "job", "40")
    tool("pub", server.url, "share", "news", "1")
    local ja, jb = {}, {}
    H.eventually(function()
      collect(a, "job (%d+)", 0, 1, ja)
      collect(b, "job (%d+)", 0, 1, jb)
      local n = 0
      for _, c in pairs(ja) do n = n + c end
      for _, c in pairs(jb) do n = n + c end
      return n >= 40
    end, 30, "40 jobs")
    local na, nb = 0, 0
    for i = 1, 40 do
      local k = tostring(i)
      assert.equal(1, (ja[k] or 0) + (jb[k] or 0), "job " .. k)
      na, nb = na + (ja[k] or 0), nb + (jb[k] or 0)
    end
    assert.is_true(na > 0 and nb > 0, ("split %d / %d"):format(na, nb))
    -- (their lines may have been read already: look at the whole log)
    H.eventually(function() return a:output():find("news 1", 1, true) end, 10, "news at a")
    H.eventually(function() return b:output():find("news 1", 1, true) end, 10, "news at b")
    H.stop(a)
    H.stop(b)
  end)

  it("retries a failing handler with a delay through the broker, then dead-letters and calls on_failure", function()
    local dir = H.tmpdir()
    local p = host(dir, [[
local osara = require "osara"
local amqp = osara.amqp { url = os.getenv("AMQP_URL") }
local t0
amqp:handle({ exchange = "retry_ex", routing_key = "r", queue = "retry_q" },
  { retry = { max = 2, backoff = 0.3, jitter = 0 }, dlq = "retry_q.dlq",
    on_failure = function(msg, err, attempts)
      osara.log.info("on_failure attempts=%d err=%s", attempts, err)
    end },
  function(msg)
    t0 = t0 or osara.monotonic()
    osara.log.info("attempt %d after %.2f s via %s/%s", msg.attempt, osara.monotonic() - t0,
      msg.exchange, msg.routing_key)
    error("no stock for " .. msg.value.i)
  end)
]], { "retry_ex/r" })
    tool("pub", server.url, "retry_ex", "r", "1")
    local line = H.expect(p, "on_failure attempts=3 err=", 30)
    assert.matches("app.lua:%d+: no stock for 1$", line)
    local out = p:output()
    local t2 = tonumber(out:match("attempt 2 after ([%d.]+) s via retry_ex/r"))
    local t3 = tonumber(out:match("attempt 3 after ([%d.]+) s via retry_ex/r"))
    assert.is_true(t2 >= 0.29, "second attempt after " .. tostring(t2))
    assert.is_true(t3 - t2 >= 0.59, "third attempt " .. tostring(t3 - t2) .. " s after the second")
    assert.matches("sent to the dead letter retry_q.dlq", out)
    local dl = tool("get", server.url, "retry_q.dlq", "1", "10")
    assert.matches('msg {"i": 1}', dl, 1, true)
    assert.matches('"osara-attempts": "3"', dl, 1, true)
    assert.matches('"osara-error-kind": "handler"', dl, 1, true)
    assert.matches("count 0", tool("count", server.url, "retry_q"))
    assert.matches("count 0", tool("count", server.url, "retry_q.retry"))
    H.stop(p)
  end)

  it("filters payloads and skips them with an ack", function()
    local p = host(H.tmpdir(), [[
local osara = require "osara"
local amqp = osara.amqp { url = os.getenv("AMQP_URL") }
amqp:handle({ exchange = "filt", routing_key = "e", queue = "filt_q" },
  { filter = function(msg) return msg.value.i % 2 == 0 end },
  function(msg) osara.log.info("even %d", msg.value.i) end)
]], { "filt/e" })
    tool("pub", server.url, "filt", "e", "6")
    local got = collect(p, "even (%d)", 3)
    assert.same({ ["2"] = 1, ["4"] = 1, ["6"] = 1 }, got)
    H.eventually(function() return tool("count", server.url, "filt_q"):match("count 0") end, 10,
      "filt_q empty")
    H.stop(p)
  end)

  it("loses nothing when the host is killed with -9 mid-stream", function()
    local app = [[
local osara = require "osara"
local amqp = osara.amqp { url = os.getenv("AMQP_URL"), prefetch = 20 }
amqp:handle({ exchange = "k9", routing_key = "m", queue = "k9_q" }, { max_inflight = 4 }, function(msg)
  osara.sleep(0.005)
  osara.log.info("handled %d", msg.value.i)
end)
]]
    local dir = H.tmpdir()
    local a = host(dir, app, { "k9/m" })
    tool("pub", server.url, "k9", "m", "300")
    local got = collect(a, "handled (%d+)", 40)
    H.kill9(a)
    collect(a, "handled (%d+)", 0, 1, got) -- what it logged before dying
    local b = host(dir, app, { "k9/m" })
    H.eventually(function()
      collect(b, "handled (%d+)", 0, 1, got)
      for i = 1, 300 do
        if not got[tostring(i)] then return false end
      end
      return true
    end, 60, "all 300 handled by one host or the other")
    H.stop(b)
    assert.matches("count 0", tool("count", server.url, "k9_q"))
  end)

  it("refuses an amqps:// or malformed URL at load, naming it", function()
    local dir = H.tmpdir()
    for url, why in pairs { ["amqps://guest:guest@127.0.0.1:5671/"] = "amqps:// %(TLS%) is not supported yet",
                            ["http://nowhere/"] = "invalid URL http://nowhere/" } do
      H.write(dir .. "/app.lua", ("local amqp = require('osara').amqp { url = %q }"):format(url))
      local status, out = H.run({ "run", dir .. "/app.lua" }, 20, nil, { errors = { why } })
      assert.is_true(status ~= 0, "exit status " .. tostring(status))
      assert.matches("app.lua:1: amqp: .*" .. why, out)
    end
  end)

  it("keeps the connection and its consumers across a reload", function()
    local dir = H.tmpdir()
    local function app(v)
      return ([[
local osara = require "osara"
local amqp = osara.amqp { url = os.getenv("AMQP_URL") }
amqp:handle({ exchange = "rl", routing_key = "k", queue = "rl_q" }, function(msg)
  osara.log.info("v%d got %%d", msg.value.i)
end)
osara.log.info("version %d loaded")
]]):format(v, v)
    end
    local p = host(dir, app(1), { "rl/k" })
    tool("pub", server.url, "rl", "k", "1")
    H.expect(p, "v1 got 1", 10)
    H.write(dir .. "/app.lua", app(2))
    p:kill("HUP")
    H.expect(p, "version 2 loaded", 20)
    H.expect(p, "reloaded", 20)
    tool("pub", server.url, "rl", "k", "1")
    H.expect(p, "v2 got 1", 10)
    H.stop(p)
    local out = p:output()
    local _, connects = out:gsub("amqp amqp://[^ ]+: connected", "")
    local _, consuming = out:gsub("amqp: consuming rl/k", "")
    assert.equal(1, connects)
    assert.equal(1, consuming)
    assert.not_matches("disconnected", out)
  end)

  -- 40 messages prefetched at once, handled one at a time, SIGTERM after
  -- the first: returns the handled count and what is left in the queue.
  local function stop_mid_stream(queue, mode)
    local p = host(H.tmpdir(), ([[
local osara = require "osara"
osara.shutdown = %s
local amqp = osara.amqp { url = os.getenv("AMQP_URL"), prefetch = 50 }
amqp:handle({ exchange = "sd", routing_key = "%s", queue = "%s" }, { max_inflight = 1 }, function(msg)
  osara.sleep(0.05)
  osara.log.info("handled %%d", msg.value.i)
end)
]]):format(mode and ("%q"):format(mode) or "nil", queue, queue), { "sd/" .. queue })
    tool("pub", server.url, "sd", queue, "40")
    H.expect(p, "handled 2", 20)
    H.stop(p)
    local handled = select(2, p:output():gsub("handled %d+", ""))
    return handled, p:output()
  end

  -- The messages ready in queue once the broker requeued what the closed
  -- connection held (it does so right after the close): want, or fails.
  local function settles_at(queue, want)
    H.eventually(function()
      return tonumber(tool("count", server.url, queue):match("count (%d+)")) == want
    end, 20, ("%d messages left in %s"):format(want, queue))
  end

  it("finishes only the running handler on SIGTERM by default; the prefetched rest stays queued", function()
    local handled = stop_mid_stream("sd_finish", nil)
    assert.is_true(handled < 40, "handled all " .. handled)
    settles_at("sd_finish", 40 - handled)
  end)

  it("with osara.shutdown = \"drain\" handles every prefetched message before exiting", function()
    local handled, out = stop_mid_stream("sd_drain", "drain")
    assert.equal(40, handled)
    assert.matches("amqp: draining sd/sd_drain", out)
    settles_at("sd_drain", 0)
  end)

  it("reconnects after rabbitmq-server restarts under load and loses no confirmed publish", function()
    local dir = H.tmpdir()
    local p = host(dir, [[
local osara = require "osara"
local amqp = osara.amqp { url = os.getenv("AMQP_URL") }
amqp:handle({ exchange = "rs", routing_key = "m", queue = "rs_q" }, function(msg)
  osara.log.info("handled %d", msg.value.i)
end)
]], { "rs/m" })
    local flood = H.child({ "/usr/bin/python3", TOOL, "flood", server.url, "rs", "m", "200", "6" },
      { name = "amqp_tool flood" })
    H.expect(flood, "confirmed 30", 30)
    server:restart()
    H.expect(flood, "flood done 200", 240)
    H.finish(flood, { timeout = 10 })
    local confirmed = {}
    for i in flood:output():gmatch("confirmed (%d+)") do confirmed[#confirmed + 1] = i end
    local got = {}
    H.eventually(function()
      collect(p, "handled (%d+)", 0, 1, got)
      for _, i in ipairs(confirmed) do
        if not got[i] then return false end
      end
      return true
    end, 120, "every confirmed publish handled")
    H.stop(p)
    assert.matches("reconnected", p:output())
    assert.matches("amqp amqp://guest:%*%*%*@127.0.0.1:%d+/: disconnected", p:output())
  end)
end)
