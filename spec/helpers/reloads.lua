-- Reloads under load, shared by issue 12's acceptance spec (50 reloads,
-- spec/integration/reload50_spec.lua) and the fault suite (100 reloads,
-- spec/faults/reload_fault.lua): a script that changes every kind of shared
-- resource (Kafka client configuration, NATS client, store environment,
-- HTTP listener, timers) is reloaded while Kafka messages flow through
-- in -> handler -> out and NATS requests are answered. Returns the fault
-- line and the counts that must be 0.
local osara = require "osara"
local H = require "spec.helpers.host"
local K = require "spec.helpers.kafka"
local N = require "spec.helpers.nats"
local T = require "spec.helpers.http"
local F = require "spec.helpers.faults"

-- Version v of the script: every shared resource is keyed differently from
-- version v - 1 (client.id and name, the store's folder, the listen address,
-- the timer's interval), so each reload opens new ones and retires the old.
local function app(v)
  return ([[
local osara = require "osara"
local V = %d
local kafka = osara.kafka { ["bootstrap.servers"] = os.getenv("BOOT"), ["group.id"] = "r50",
                            ["client.id"] = "r50-v" .. V,
                            ["session.timeout.ms"] = 6000, ["heartbeat.interval.ms"] = 500 }
local nats = osara.nats { servers = os.getenv("NATS_URL"), name = "r50-v" .. V }
local seen = osara.store("seen", { dir = os.getenv("STORES") .. "/" .. V %% 2 })
osara.http { listen = V %% 2 == 0 and "127.0.0.1:0" or ":0" }
local out = kafka:topic("r50.out")
kafka:handle("r50.in", { sink = out }, function(msg)
  seen:set("last", msg.value.id)
  osara.sleep(0.002)
  return { id = msg.value.id, v = V }
end)
nats:handle("r50.req", function(msg)
  seen:set("req", msg.data.id)
  return { id = msg.data.id, v = V }
end)
osara.every(0.05 + 0.01 * (V %% 3), function() seen:set("tick", V) end)
osara.route("GET", "/v", function() return { v = V } end)
]]):format(v)
end

-- distinct ids and repeats among the output messages
local function tally(messages)
  local seen, distinct, dup = {}, 0, 0
  for _, m in ipairs(messages) do
    local id = tonumber(m.value:match('"id":(%d+)'))
    if id then
      if seen[id] then dup = dup + 1 else distinct = distinct + 1 end
      seen[id] = true
    end
  end
  return seen, distinct, dup
end

-- Runs the reloads under load; returns the fault line and the counts.
local function reload_under_load(reloads, name)
  local broker, boot = K.broker { "--partitions", "4", "--topic", "r50.in", "--topic", "r50.out" }
  local server, url = N.server()
  local dir = H.tmpdir()
  H.write(dir .. "/app.lua", app(0))
  -- reloads by SIGHUP: one signal, one reload, no file-watch timing
  local p = H.osara({ "run", "--data", dir .. "/data", dir .. "/app.lua" },
                    { BOOT = boot, NATS_URL = url, STORES = dir })
  T.listening(p)
  N.subscribed(p, { "r50.req" })
  H.expect(p, "assigned", 30)

  -- load: one Kafka message and one NATS request every 10 ms
  local kcat = H.child({ "kcat", "-b", boot, "-t", "r50.in", "-P", "-K", "\t" }, { status = false })
  local nats = osara.nats { servers = url }
  local sent_k, sent_n, pending, stop = 0, 0, 0, false
  local replies, errors = {}, {}
  osara.spawn(function()
    while not stop do
      sent_k = sent_k + 1
      kcat:write(("k%d\t{\"id\":%d}\n"):format(sent_k, sent_k))
      sent_n = sent_n + 1
      local id = sent_n
      pending = pending + 1
      osara.spawn(function()
        local r, err = nats:request("r50.req", { id = id }, { timeout = 10 })
        if r and r.value.id == id then
          replies[id] = (replies[id] or 0) + 1
        else
          errors[tostring(err)] = (errors[tostring(err)] or 0) + 1
        end
        pending = pending - 1
      end)
      osara.sleep(0.01)
    end
  end)

  local t0 = osara.monotonic()
  for v = 1, reloads do
    -- a reload every 40 messages: load flows between them
    H.eventually(function() return sent_k >= 40 * v end, 10, "load between reloads")
    H.write(dir .. "/app.lua", app(v))
    p:kill("HUP")
    H.expect(p, "reloaded", 20)
  end
  local reload_secs = osara.monotonic() - t0
  stop = true
  kcat:close_stdin()
  H.finish(kcat, { timeout = 30, status = 0 })
  H.eventually(function() return pending == 0 end, 20, "every NATS request answered or timed out")
  local messages = {}
  pcall(K.eventually, boot, "r50.out", function(m)
    messages = m
    local _, distinct = tally(m)
    return distinct >= sent_k
  end, 30, "an output for every input")
  H.stop(p)
  H.stop(broker)
  H.stop(server)

  local _, handled_k, dup_k = tally(messages)
  local handled_n, dup_n = 0, 0
  for _, c in pairs(replies) do
    handled_n = handled_n + 1
    dup_n = dup_n + c - 1
  end
  local sent, handled = sent_k + sent_n, handled_k + handled_n
  local why = {}
  for err, n in pairs(errors) do why[#why + 1] = ("%d %s"):format(n, err) end
  local line = F.report(name, sent, handled, sent - handled, dup_k + dup_n,
    ("kafka sent=%d handled=%d duplicated=%d; nats sent=%d answered=%d (failed: %s); %d reloads in %.1f s")
      :format(sent_k, handled_k, dup_k, sent_n, handled_n, table.concat(why, ", "), reloads, reload_secs))
  return line, { kafka_lost = sent_k - handled_k, dup = dup_k + dup_n, nats_lost = sent_n - handled_n }
end

return { run = reload_under_load }
