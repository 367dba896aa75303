-- NATS through the real binary against a real nats-server.
local osara = require "osara"
local H = require "spec.helpers.host"
local N = require "spec.helpers.nats"

local function collect(p, pattern, n, timeout)
  local got = {}
  local count = 0
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
  end, timeout or 20, ("%d lines matching %s"):format(n, pattern))
  return got, count
end

-- Stops the host (it must exit 0) and then the server.
local function stop(p, server)
  H.stop(p)
  H.stop(server)
end

describe("nats", function()
  after_each(H.cleanup)

  it("interoperates with an independent nats.c client", function()
    local server, url = N.server()
    local tool = H.exe():gsub("osara$", "osara_nats_tool")
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL") }
nats:handle("interop.in", function(msg)
  osara.log.info("in n=%d trace=%s", msg.data.n, tostring(msg.headers.trace))
  nats:publish("interop.out", { got = msg.data.n })
end)
nats:handle("interop.req", function(msg) return { doubled = msg.data.n * 2 } end)
osara.after(0, function() osara.log.info("app ready") end)
]])
    local p = H.osara({ "run", dir .. "/app.lua" }, { NATS_URL = url })
    N.subscribed(p, { "interop.in", "interop.req" })
    local sub = H.child { tool, "sub", url, "interop.out", "1" }
    assert(sub:expect("ready", 10))
    H.finish(H.child { tool, "pub", url, "interop.in", '{"n":21}' })
    H.expect(p, "in n=21 trace=tool", 10)
    assert.matches('{"got":21}', assert(sub:expect("got", 10)))
    H.finish(sub)
    local req = H.child { tool, "req", url, "interop.req", '{"n":4}' }
    H.finish(req)
    assert.matches('{"doubled":8}', req:output())
    stop(p, server)
  end)

  it("holds a flood in nats.c's pending list and reports a slow consumer past it", function()
    local server, url = N.server()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL") }
local handled = 0
nats:handle("flood", { max_inflight = 2, max_waiting = 8, pending_msgs = 20 }, function(msg)
  osara.sleep(0.02)
  handled = handled + 1
end)
osara.after(0.1, function()
  for i = 1, 300 do nats:publish("flood", { i = i }) end
  osara.sleep(2)
  osara.log.info("handled=%d", handled)
end)
]])
    local p = H.osara({ "run", dir .. "/app.lua" }, { NATS_URL = url })
    local line = H.expect(p, "handled=", 20)
    local handled = tonumber(line:match("handled=(%d+)"))
    -- bounded: what osara queues (2 + 8) plus nats.c's pending (20), give or
    -- take what was in flight on the socket; the rest is reported, not silent
    assert.is_true(handled > 0 and handled < 150, "handled " .. handled)
    assert.matches("slow consumer", p:output())
    stop(p, server)
  end)

  it("does pub/sub with wildcards, concurrent requests, timeouts and no responders", function()
    local server, url = N.server()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL") }
nats:handle("price.*", function(msg) osara.sleep(0.01) return { price = msg.data.q * 2 } end)
nats:handle("audit.>", function(msg) osara.log.info("audit %s %s", msg.subject, msg.data.who) end)
nats:handle("slow.echo", function(msg) osara.sleep(1) return msg.data end)
osara.after(0.1, function()
  nats:publish("audit.login.ok", { who = "ann" })
  nats:publish("audit.x", { who = "bob" })
  nats:publish("other.x", { who = "nobody" })
  local ok, done = 0, 0
  for i = 1, 100 do
    osara.spawn(function()
      local r = nats:request("price.eur", { q = i }, { timeout = 5 })
      if r and r.data.price == i * 2 then ok = ok + 1 end
      done = done + 1
      if done == 100 then osara.log.info("requests ok=%d", ok) end
    end)
  end
  local _, err = nats:request("slow.echo", { x = 1 }, { timeout = 0.2 })
  osara.log.info("slow: %s", tostring(err))
  local _, err2 = nats:request("nobody.listens", { x = 1 }, { timeout = 2 })
  osara.log.info("nobody: %s", tostring(err2))
end)
]])
    local p = H.osara({ "run", dir .. "/app.lua" }, { NATS_URL = url })
    H.expect(p, "requests ok=100", 20)
    local out = p:output()
    assert.matches("audit audit.login.ok ann", out)
    assert.matches("audit audit.x bob", out)
    assert.is_nil(out:find("nobody\n"))
    H.expect(p, "slow: timeout", 5)
    H.expect(p, "nobody: no responders", 5)
    stop(p, server)
  end)

  it("sends a reply to a third subject with reply_to (panini's example)", function()
    local server, url = N.server()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL") }
nats:handle("some.request", function(msg) return { success = true, n = msg.data.n } end)
nats:handle("reply.to.subject", function(msg) osara.log.info("received response n=%d", msg.data.n) end)
osara.after(0.1, function()
  for n = 1, 3 do nats:publish("some.request", { n = n }, { reply_to = "reply.to.subject" }) end
end)
]])
    local p = H.osara({ "run", dir .. "/app.lua" }, { NATS_URL = url })
    local got = collect(p, "received response n=(%d)", 3)
    assert.are.same({ ["1"] = 1, ["2"] = 1, ["3"] = 1 }, got)
    stop(p, server)
  end)

  it("splits a queue group between two hosts with nothing lost or doubled", function()
    local server, url = N.server()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL") }
nats:handle("work", { queue = "workers" }, function(msg) osara.log.info("did %d", msg.data.id) end)
osara.after(0, function() osara.log.info("ready") end)
]])
    local a = H.osara({ "run", dir .. "/app.lua" }, { NATS_URL = url })
    local b = H.osara({ "run", dir .. "/app.lua" }, { NATS_URL = url })
    N.subscribed(a, { "work" })
    N.subscribed(b, { "work" })
    local nats = osara.nats { servers = url }
    for i = 1, 200 do nats:publish("work", { id = i }) end
    nats:flush()
    local seen, dup, per = {}, 0, { 0, 0 }
    H.eventually(function()
      for i, p in ipairs { a, b } do
        local l = p:line(0.02)
        while l do
          local id = tonumber(l:match("did (%d+)"))
          if id then
            if seen[id] then dup = dup + 1 end
            seen[id] = true
            per[i] = per[i] + 1
          end
          l = p:line(0.001)
        end
      end
      return per[1] + per[2] >= 200
    end, 20, "200 messages handled")
    assert.are.equal(0, dup)
    assert.is_true(per[1] > 0 and per[2] > 0, ("split %d/%d"):format(per[1], per[2]))
    a:kill("TERM")
    b:kill("TERM")
    H.finish(a)
    H.finish(b)
    H.stop(server)
  end)

  it("reconnects after the server restarts and keeps handling", function()
    local server, url, port = N.server()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL") }
nats:handle("ping", function(msg) osara.log.info("ping %d", msg.data.n) end)
]])
    local p = H.osara({ "run", dir .. "/app.lua" }, { NATS_URL = url })
    N.subscribed(p, { "ping" })
    H.stop(server)
    H.expect(p, "disconnected", 10)
    local server2 = N.server(port)
    H.expect(p, "reconnected", 15)
    -- the host re-subscribes after "reconnected": publish until it is heard
    local nats = osara.nats { servers = url }
    H.eventually(function()
      nats:publish("ping", { n = 7 })
      nats:flush()
      return p:expect("ping 7", 0.2)
    end, 10, "ping 7 handled")
    H.stop(p)
    H.stop(server2)
  end)

  it("keeps the subscription across a reload while messages flow", function()
    local server, url = N.server()
    local dir = H.tmpdir()
    local function app(v)
      return ([[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL") }
nats:handle("flow", function(msg) osara.log.info("v%d got %%d", msg.data.id) end)
]]):format(v)
    end
    H.write(dir .. "/app.lua", app(1))
    local p = H.osara({ "run", "--watch", dir .. "/app.lua" }, { NATS_URL = url })
    N.subscribed(p, { "flow" })
    local nats = osara.nats { servers = url }
    for i = 1, 300 do
      nats:publish("flow", { id = i })
      if i % 50 == 0 then
        nats:flush()
        H.write(dir .. "/app.lua", app(i))
        osara.sleep(0.05)
      end
    end
    nats:flush()
    local got = collect(p, "got (%d+)", 300)
    for i = 1, 300 do assert.are.equal(1, got[tostring(i)], "message " .. i) end
    assert.matches("1 kept", p:output())
    stop(p, server)
  end)

  -- gh_12: handlers follow their client; the old version's client stays
  -- open (held by the old VM) until its in-flight work is done, so its
  -- waits finish normally; nothing blocks the loop; ASan sees no use of a
  -- freed subscription or client.
  it("gh_12 restarts handlers on a changed client at reload and lets the old version's waits finish", function()
    local server, url = N.server(nil, H.tmpdir())
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL"), name = "v1" }
nats:stream { name = "R", subjects = { "r.>" }, storage = "memory" }
nats:handle("work.a", function(msg) osara.log.info("v1 a %d", msg.data.n) end)
nats:handle("hold", function() osara.sleep(2) return { late = true } end)
nats:handle("go", function()
  local pubs = {}
  for i = 1, 20 do pubs[i] = nats:jspublish("r.x", { i = i }) end
  osara.log.info("v1 waiting")
  local _, err = nats:request("hold", {}, { timeout = 10 })
  osara.log.info("v1 request: %s", tostring(err))
  for i = 21, 40 do pubs[i] = nats:jspublish("r.x", { i = i }) end
  local acked, failed = 0, 0
  for i = 1, 40 do
    if pubs[i]:wait() then acked = acked + 1 else failed = failed + 1 end
  end
  osara.log.info("v1 jspublish: %d acked, %d failed", acked, failed)
  local ok, perr = nats:publish("work.a", { n = 0 })
  osara.log.info("v1 publish: %s %s", tostring(ok), tostring(perr))
end)
]])
    local p = H.osara({ "run", "--watch", dir .. "/app.lua" }, { NATS_URL = url })
    N.subscribed(p, { "go", "hold", "work.a" })
    local nats = osara.nats { servers = url }
    nats:publish("go", {})
    H.expect(p, "v1 waiting")
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL"), name = "v2" }
nats:handle("work.a", function(msg) osara.log.info("v2 a %d", msg.data.n) end)
nats:handle("work.b", function(msg) osara.log.info("v2 b %d", msg.data.n) end)
]])
    assert.matches("0 kept, 1 added, 2 removed, 1 restarted", H.expect(p, "reloaded"))
    H.expect(p, "v1 request: nil") -- the old version's "hold" answered
    local acked, failed = H.expect(p, "v1 jspublish:"):match("(%d+) acked, (%d+) failed")
    assert.are.equal(40, tonumber(acked) + tonumber(failed))
    assert.are.equal(0, tonumber(failed))
    H.expect(p, "v1 publish: true nil")
    local n = 0
    H.eventually(function()
      n = n + 1
      nats:publish("work.a", { n = n })
      nats:publish("work.b", { n = n })
      nats:flush()
      local out = p:output()
      return out:find("v2 a %d") and out:find("v2 b %d")
    end, 10, "v2 handles work.a and work.b")
    H.stop(p)
    H.drain(p)
    local out = p:output()
    assert.is_nil(out:find("loop stall"), out)
    assert.is_nil(out:find("Sanitizer"), out)
    assert.is_nil(out:find("runtime error"), out)
    H.stop(server)
  end)

  -- gh_12: a handler whose client changes hands its subscription to its
  -- successor, which keeps it until its own is confirmed: no request falls
  -- into a gap between the two connections.
  it("gh_12 answers every request while reloads change the client", function()
    local server, url = N.server()
    local dir = H.tmpdir()
    local function app(v)
      return ([[
local osara = require "osara"
local V = %d
local nats = osara.nats { servers = os.getenv("NATS_URL"), name = "h-v" .. V }
nats:handle("h.req", function(msg) return { id = msg.value.id, v = V } end)
]]):format(v)
    end
    H.write(dir .. "/app.lua", app(0))
    local p = H.osara({ "run", dir .. "/app.lua" }, { NATS_URL = url })
    N.subscribed(p, { "h.req" })
    local nats = osara.nats { servers = url }
    local sent, pending, stopped, lost = 0, 0, false, {}
    osara.spawn(function()
      while not stopped do
        sent = sent + 1
        local id = sent
        pending = pending + 1
        osara.spawn(function()
          local r, err = nats:request("h.req", { id = id }, { timeout = 3 })
          if not (r and r.value.id == id) then lost[#lost + 1] = id .. ": " .. tostring(err) end
          pending = pending - 1
        end)
        osara.sleep(0.005)
      end
    end)
    for v = 1, 10 do
      H.eventually(function() return sent >= 40 * v end, 10, "requests between reloads")
      H.write(dir .. "/app.lua", app(v))
      p:kill("HUP") -- one signal, one reload
      assert.matches("1 restarted", H.expect(p, "reloaded", 20))
    end
    stopped = true
    H.eventually(function() return pending == 0 end, 20, "every request answered or timed out")
    assert.are.same({}, lost)
    stop(p, server)
    assert.is_nil(p:output():find("loop stall"), p:output())
  end)

  it("reports bad input on one line each and keeps going", function()
    local server, url = N.server()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL") }
-- retry = false: logged and counted at once (the old default)
nats:handle("in", { max_bytes = 100, retry = false }, function(msg)
  if msg.data.fail then error("refused") end
  osara.log.info("fine %d", msg.data.n)
end)
]])
    local p = H.osara({ "run", dir .. "/app.lua" }, { NATS_URL = url }, { errors = { "nats in: %S+ failed at in" } })
    N.subscribed(p, { "in" })
    local nats = osara.nats { servers = url }
    nats:publish("in", "{broken", { codec = "raw" })
    nats:publish("in", { pad = string.rep("x", 200) })
    nats:publish("in", { fail = true })
    nats:publish("in", { n = 1 })
    nats:flush()
    H.expect(p, "fine 1", 10)
    local out = p:output()
    assert.matches("nats in: decode failed at in: json:", out)
    assert.matches("nats in: too_large failed at in: %d+ bytes over the 100%-byte limit", out)
    assert.matches("nats in: handler failed at in: .*refused", out)
    stop(p, server)
  end)

  it("rejects an invalid subject at load with file:line", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats { servers = "nats://127.0.0.1:1" }
nats:handle("bad subject", function() end)
]])
    local status, out = H.run({ "check", dir .. "/app.lua" }, nil, nil, { errors = { "invalid subject" } })
    assert.are.equal(1, status)
    assert.matches("app.lua:3: nats: invalid subject \"bad subject\" %(whitespace", out)
  end)
end)

describe("nats JetStream", function()
  after_each(H.cleanup)

  local APP = [[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL") }
nats:stream { name = "JOBS", subjects = { "jobs.>" } }
local failed = {}
nats:handle("jobs.>", { durable = "workers", stream = "JOBS", nak_delay = 0.05, batch = 8,
                          ack_wait = 3, max_deliver = 100 }, function(msg)
  local n = msg.data.n
  if n % 10 == 3 and not failed[n] then failed[n] = true error("transient " .. n) end
  osara.sleep(0.005)
  -- written before the ack, straight to the kernel: a kill -9 cannot lose
  -- it, while the logger thread's last lines may be lost with the process
  local f = assert(io.open(os.getenv("DONE_FILE"), "a"))
  f:write(n, "\n")
  f:close()
  osara.log.info("done %d", n)
end)
osara.after(0, function() osara.log.info("ready") end)
]]

  it("gh_12 returns from jspublish():wait() and request() under a full collection mid-wait", function()
    local server, url = N.server(nil, H.tmpdir())
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL") }
nats:add_stream { name = "G", subjects = { "g.>" }, storage = "memory" }
nats:handle("echo", function(msg) osara.sleep(0.002) return msg.data end)
local stop = false
osara.spawn(function()
  while not stop do collectgarbage("collect") osara.sleep(0.001) end
end)
osara.after(0.1, function()
  local acked, replies = 0, 0
  for i = 1, 200 do
    if nats:jspublish("g.x", { i = i }):wait() then acked = acked + 1 end
  end
  for i = 1, 50 do
    local r = nats:request("echo", { i = i }, { timeout = 2 })
    if r and r.data.i == i then replies = replies + 1 end
  end
  stop = true
  osara.log.info("under gc: acked=%d replies=%d", acked, replies)
end)
]])
    local p = H.osara({ "run", dir .. "/app.lua" }, { NATS_URL = url })
    H.expect(p, "under gc: acked=200 replies=50", 30)
    stop(p, server)
  end)

  it("gh_12 binds every subject of a stream (no limit of 64), on the embedded server", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local nats = osara.nats {}
local subjects = {}
for i = 1, 70 do subjects[i] = "many." .. i end
nats:stream { name = "MANY", subjects = subjects, storage = "memory" }
osara.after(0, function()
  local seq, err = nats:jspublish("many.70", { n = 70 }):wait()
  osara.log.info("many.70: %s %s", tostring(seq), tostring(err))
end)
]])
    local p = H.osara { "run", "--data", dir .. "/data", dir .. "/app.lua" }
    local pid = H.expect(p, "embedded server"):match("pid (%d+)")
    H.expect(p, "many.70: 1 nil", 20)
    H.stop(p)
    -- the host exits only after it reaped its embedded server
    assert.are_not.equal(0, os.execute("kill -0 " .. pid .. " 2>/dev/null"))
  end)

  it("redelivers after a failure and resumes after kill -9 without losing a message", function()
    local jsdir = H.tmpdir()
    local server, url = N.server(nil, jsdir)
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", APP)
    local done_file = dir .. "/done.txt"
    local env = { NATS_URL = url, DONE_FILE = done_file }
    local p = H.osara({ "run", dir .. "/app.lua" }, env)
    H.expect(p, "nats: stream JOBS ready") -- add_stream runs off the loop
    local nats = osara.nats { servers = url }
    local n = 120
    for i = 1, n do
      local seq, err = nats:jspublish("jobs.new", { n = i }):wait()
      assert(seq, err)
    end
    local seen = {}
    local function drain()
      local f = io.open(done_file)
      if not f then return 0 end
      for line in f:lines() do seen[tonumber(line)] = true end
      f:close()
      local c = 0
      for _ in pairs(seen) do c = c + 1 end
      return c
    end
    H.eventually(function() return drain() >= 30 end, 20, "30 done")
    H.kill9(p)
    local p2 = H.osara({ "run", dir .. "/app.lua" }, env)
    local ok = pcall(H.eventually, function()
      drain()
      for i = 1, n do if not seen[i] then return false end end
      return true
    end, 30, "every job done")
    if not ok then
      local missing = {}
      for i = 1, n do if not seen[i] then missing[#missing + 1] = i end end
      error("missing " .. table.concat(missing, ",") .. "\n" .. p2:output():sub(1, 3000))
    end
    assert.matches("transient", p:output() .. p2:output())
    H.stop(p2)
    H.stop(server)
  end)
end)
