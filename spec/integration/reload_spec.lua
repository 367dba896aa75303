-- Reloads that change shared resources while the previous version's work is
-- still alive, through the real binary (run under ASan by scripts/test;
-- the helpers check the child's log for sanitizer reports).
local osara = require "osara"
local cjson = require "cjson"
local H = require "spec.helpers.host"
local T = require "spec.helpers.http"

local function listening_port(p)
  return tonumber(H.expect(p, "http: listening on", 30):match(":(%d+)%s*$"))
end

-- Version v names its own Kafka client (configuration), store folder and
-- HTTP listener (odd and even versions listen on different addresses, on
-- a free port); its receipts stay referenced until its VM closes, and
-- /slow keeps a request in flight across the reload.
local function app(v)
  return ([[
local osara = require "osara"
local V = %d
local kafka = osara.kafka { ["osara.partitions"] = 1, ["client.id"] = "reload-v%d" }
local db = osara.store("s", { dir = osara.paths().data_dir .. "/v%d" })
osara.http { listen = "%s:0" }
local out = kafka:topic("reload.out")
local receipts = {}
osara.every(0.005, function()
  receipts[#receipts %% 50 + 1] = out:send({ v = V })
  db:set("n", (db:get("n") or 0) + 1)
end)
osara.route("GET", "/slow", function(req)
  osara.log.info("slow request %%s of version %%d", tostring(req.query.id), V)
  osara.sleep(0.3)
  return { v = V, n = db:get("n") }
end)
osara.log.info("version %%d loaded", V)
]]):format(v, v, v, v % 2 == 1 and "127.0.0.1" or "0.0.0.0")
end

local function get(port, timeout)
  local status, _, body = T.curl({ "http://127.0.0.1:" .. port .. "/slow" }, timeout)
  return status, status == 200 and cjson.decode(body) or nil
end

describe("reload", function()
  after_each(H.cleanup)

  it("gh_12 keeps the previous version's client, store and listener until it is done", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", app(1))
    local p = H.osara { "run", dir .. "/app.lua" }
    local port = listening_port(p)
    for round = 2, 5 do
      -- A request to the serving version, in flight during the reload.
      local inflight = H.child { "curl", "-s",
        "--max-time", "10", "http://127.0.0.1:" .. port .. "/slow?id=r" .. round }
      H.expect(p, ("slow request r%d of version %d"):format(round, round - 1), 10)
      H.write(dir .. "/app.lua", app(round))
      p:kill("HUP")
      local new_port = listening_port(p)
      H.expect(p, "reloaded", 30)
      assert.are.equal(0, inflight:wait(15))
      H.drain(inflight)
      assert.are.equal(round - 1, cjson.decode(inflight:output()).v)
      local status, body = get(new_port)
      assert.are.equal(200, status)
      assert.are.equal(round, body.v)
      -- The old listener closes once the old version finished its work.
      H.eventually(function() return get(port, 2) == nil end, 10, "old port closed")
      port = new_port
    end
    H.stop(p, { timeout = 30 }) -- exit 0, no sanitizer report, no ERROR
  end)
end)
