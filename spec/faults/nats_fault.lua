-- Fault: nats-server killed (kill -9) and restarted on the same port and
-- store under a JetStream durable consumer and under request/reply (issue
-- 13 item 4). Publishers and requesters retry what failed, as real ones
-- do. JetStream is at-least-once: every acked publish must be handled;
-- a message whose ack the killed server had not written to its store yet
-- is delivered again (duplicated). Core NATS request/reply keeps nothing: a request in flight
-- when the server dies gets an error and is sent again; a handler that ran
-- but whose reply was lost runs again (duplicated).
local osara = require "osara"
local H = require "spec.helpers.host"
local N = require "spec.helpers.nats"
local F = require "spec.helpers.faults"

local COUNT = F.size(2000, 10000)  -- JetStream messages, and as many requests
local KILLS = F.size(2, 5)

local APP = [[
local osara = require "osara"
local nats = osara.nats { servers = os.getenv("NATS_URL") }
nats:add_stream { name = "FJ", subjects = { "fj.>" } }
nats:handle("fj.>", { durable = "fjw", stream = "FJ", ack_wait = 5, batch = 16 }, function(msg)
  osara.log.info("js %d", msg.value.n)
end)
nats:handle("fr.req", function(msg)
  osara.log.info("req %d", msg.value.id)
  return { id = msg.value.id }
end)
osara.after(0, function() osara.log.info("ready") end)
]]

-- Calls fn until it returns a truthy value (a publisher or requester that
-- retries after an error); returns the number of failed calls.
local function until_ok(fn)
  local failed = 0
  while not fn() do
    failed = failed + 1
    osara.sleep(0.05)
  end
  return failed
end

describe("fault suite", function()
  after_each(H.cleanup)

  it("nats: nats-server killed and restarted under JetStream and request/reply loses nothing", function()
    local store = H.tmpdir()
    local server, url, port = N.server(nil, store)
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", APP)
    local p = H.osara({ "run", "--data", dir .. "/data", dir .. "/app.lua" }, { NATS_URL = url })
    H.expect(p, "ready", 20)
    N.subscribed(p, { "fr.req" }, 20)

    local client = osara.nats { servers = url }
    local published, answered, failures, done = 0, 0, 0, 0
    for _, task in ipairs {
      function()
        for n = 1, COUNT do
          failures = failures + until_ok(function() return client:jspublish("fj.x", { n = n }):wait() end)
          published = n
          osara.sleep(0.002)
        end
      end,
      function()
        for id = 1, COUNT do
          failures = failures + until_ok(function()
            local r = client:request("fr.req", { id = id }, { timeout = 1 })
            return r and r.value.id == id
          end)
          answered = id
          osara.sleep(0.002)
        end
      end,
    } do
      osara.spawn(function() task() done = done + 1 end)
    end

    for kill = 1, KILLS do
      H.eventually(function() return published >= COUNT * kill / (KILLS + 1) end, 120, "load before kill " .. kill)
      H.kill9(server)
      osara.sleep(1)
      server = N.server(port, store)
    end
    H.eventually(function() return done == 2 end, F.size(120, 600), "every publish acked and request answered")
    local js, req = {}, {}
    H.eventually(function()
      p:line(0.05)
      js, req = {}, {}
      for n in p:output():gmatch("INFO  js (%d+)") do n = tonumber(n) js[n] = (js[n] or 0) + 1 end
      for n in p:output():gmatch("INFO  req (%d+)") do n = tonumber(n) req[n] = (req[n] or 0) + 1 end
      for n = 1, COUNT do if not js[n] then return false end end
      return true
    end, 60, "every JetStream message handled")
    H.stop(p)
    H.stop(server)

    local lost_js, lost_req, dup_js, dup_req = 0, 0, 0, 0
    for n = 1, COUNT do
      if not js[n] then lost_js = lost_js + 1 else dup_js = dup_js + js[n] - 1 end
      if not req[n] then lost_req = lost_req + 1 else dup_req = dup_req + req[n] - 1 end
    end
    local line = F.report("nats", 2 * COUNT, 2 * COUNT - lost_js - lost_req, lost_js + lost_req, dup_js + dup_req,
      ("%d kills of nats-server; JetStream %d published (acked), %d handled again; %d requests answered, "
        .. "%d handled again; %d publishes or requests failed and were retried")
        :format(KILLS, published, dup_js, answered, dup_req, failures))
    assert.are.equal(0, lost_js + lost_req, line)
    assert.are.equal(COUNT, answered, line)
    -- at-least-once. nats-server writes its file store's consumer state
    -- (the ack floor) every sync_interval (2 min), so a kill -9 forgets
    -- recent acks and the server delivers those messages again: at most
    -- once more per kill. A request runs again only when it was retried.
    assert.is_true(dup_js <= KILLS * COUNT, line)
    assert.is_true(dup_req <= failures, line)
  end)
end)
