-- osara Tap's SQLAlchemy example (combined.py): one table written both by a
-- Kafka handler and by an HTTP route.
--
--   @app.route("/")          -> session.add(X(txt=f"{uuid4()} from web"))
--   @tap.handler("topic_x")  -> session.add(X(txt=f"{uuid4()} from kfk"))
--
-- osara.sql() is SQLite in the data folder (or config.yaml's database, or
-- OSARA_SQL_URL=postgres://...); queries yield, the loop keeps serving. No
-- thread-local sessions are needed: each handler call runs in its own
-- coroutine and takes a pooled connection for the statement.
local osara = require "osara"
local kafka = osara.kafka { ["group.id"] = "demo" }
local db = osara.sql()

assert(db:exec("CREATE TABLE IF NOT EXISTS x (txt TEXT PRIMARY KEY)"))

math.randomseed(os.time())
local function uuid4()
  local r = {}
  for i = 1, 16 do r[i] = math.random(0, 255) end
  r[7] = r[7] % 16 + 64   -- version 4
  r[9] = r[9] % 64 + 128  -- variant 10xx
  local h = ("%02x"):rep(16):format(unpack(r))
  return ("%s-%s-%s-%s-%s"):format(h:sub(1, 8), h:sub(9, 12), h:sub(13, 16), h:sub(17, 20), h:sub(21))
end

osara.route("GET", "/", function()
  assert(db:exec("INSERT INTO x (txt) VALUES ($1)", uuid4() .. " from web"))
  return "OK"
end)

osara.route("GET", "/rows", function()
  return assert(db:query("SELECT txt FROM x ORDER BY txt"))
end)

kafka:handle("topic_x", { codec = "raw" }, function()
  assert(db:exec("INSERT INTO x (txt) VALUES ($1)", uuid4() .. " from kfk"))
end)

-- demo input
local topic_x = kafka:topic("topic_x", { codec = "raw" })
osara.after(0.2, function() topic_x:send("insert") end)
