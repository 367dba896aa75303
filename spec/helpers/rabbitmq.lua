-- A real rabbitmq-server (Debian's package) for integration specs, on free
-- loopback ports with its own node name and data folder:
--
--   * its own epmd (Erlang's port mapper) as a child on a free
--     loopback port (ERL_EPMD_PORT), so it never meets another node's;
--   * the AMQP listener on 127.0.0.1:<free port> (rabbitmq.conf), the
--     distribution port (RABBITMQ_DIST_PORT) on loopback too, no plugins
--     (no management listener);
--   * node name osara-test-<port>@localhost, the mnesia database, logs,
--     config and Erlang cookie (HOME) in a temp folder;
--   * spawned directly (not H.child): one server serves a whole spec file;
--   * runs as whoever runs the specs (root in CI is fine for RabbitMQ);
--   * ready when its log (on stdout: RABBITMQ_LOGS=-) says "Server startup
--     complete" - 10 to 70 s on a loaded 2-core machine, so a spec file
--     starts one server in setup and shares it.
--
-- R.start() -> server with .url, .port, :restart() (same ports and data:
-- durable queues and persistent messages survive), :stop(). Stopping
-- sends SIGTERM to the server, then to epmd.
local osara = require "osara"
local H = require "spec.helpers.host"
local redis = require "spec.helpers.redis"

local R = {}

local READY = "Server startup complete"

-- The server outlives each test (H.cleanup stops tracked children and
-- removes H.tmpdir folders after each one), so it is spawned and checked
-- here, not through H.child.
local function spawn(argv, env)
  return assert(osara.process.spawn { argv = argv, env = env })
end

local function mktemp()
  local f = assert(io.popen("mktemp -d /tmp/osara-rabbitmq-XXXXXXXX"))
  local dir = f:read("*l")
  f:close()
  return dir
end

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

-- Stops p with SIGTERM and fails on forbidden lines in its log.
local function stop(p, name)
  if not p.exited then p:kill("TERM") end
  local status = p:wait(60)
  if status == nil then
    p:kill("KILL")
    p:wait(5)
    error(name .. " did not stop within 60 s:\n" .. p:output())
  end
  H.drain(p)
  for _, f in ipairs(H.FORBIDDEN) do
    assert(not p:output():find(f, 1, true), name .. " log has " .. f .. ":\n" .. p:output())
  end
end

function R.available()
  local f = io.open("/usr/lib/rabbitmq/bin/rabbitmq-server")
  if f then f:close() end
  return f ~= nil
end

local Server = {}
Server.__index = Server

function Server:_env()
  return {
    HOME = self.dir,
    RABBITMQ_NODENAME = self.node,
    RABBITMQ_NODE_IP_ADDRESS = "127.0.0.1",
    RABBITMQ_NODE_PORT = tostring(self.port),
    RABBITMQ_DIST_PORT = tostring(self.dist_port),
    RABBITMQ_MNESIA_BASE = self.dir .. "/mnesia",
    RABBITMQ_LOG_BASE = self.dir .. "/log",
    RABBITMQ_LOGS = "-",
    RABBITMQ_CONFIG_FILE = self.dir .. "/rabbitmq.conf",
    RABBITMQ_ENABLED_PLUGINS_FILE = self.dir .. "/enabled_plugins",
    RABBITMQ_PID_FILE = self.dir .. "/rabbitmq.pid",
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS = "-kernel inet_dist_use_interface {127,0,0,1}",
    ERL_EPMD_ADDRESS = "127.0.0.1",
    ERL_EPMD_PORT = tostring(self.epmd_port),
  }
end

function Server:_launch(timeout)
  self.proc = spawn({ "/usr/lib/rabbitmq/bin/rabbitmq-server" }, self:_env())
  local line = self.proc:expect(READY, timeout or 240)
  if not line then
    error("rabbitmq-server did not start:\n" .. self.proc:output())
  end
end

-- Starts epmd and the server; waits until it accepts connections.
function R.start(timeout)
  local dir = mktemp()
  local self = setmetatable({ dir = dir, port = redis.free_port(), dist_port = redis.free_port(),
                              epmd_port = redis.free_port() }, Server)
  self.node = "osara-test-" .. self.port .. "@localhost"
  self.url = ("amqp://guest:guest@127.0.0.1:%d/"):format(self.port)
  write(dir .. "/rabbitmq.conf", table.concat({
    "listeners.tcp.default = 127.0.0.1:" .. self.port,
    "loopback_users = none",
    "",
  }, "\n"))
  write(dir .. "/enabled_plugins", "[].\n")
  self.epmd = spawn { "epmd", "-address", "127.0.0.1", "-port", tostring(self.epmd_port) }
  self:_launch(timeout)
  return self
end

-- Stops the server (SIGTERM; its log is checked, its status is not: the
-- start script's status on a signal varies).
function Server:stop_server()
  stop(self.proc, "rabbitmq-server")
end

-- Stops and starts it again on the same ports with the same data.
function Server:restart()
  self:stop_server()
  self:_launch()
end

-- Stops the server and epmd, removes the data folder.
function Server:stop()
  local ok, err = pcall(self.stop_server, self)
  stop(self.epmd, "epmd")
  os.execute("rm -rf " .. self.dir)
  if not ok then error(err, 0) end
end

return R
