-- A throwaway PostgreSQL server for specs: Debian's postgresql package
-- (the binaries under /usr/lib/postgresql/<version>/bin), a fresh cluster
-- from initdb in a temporary folder, listening on a free loopback port
-- and a private socket folder, trust authentication, user `postgres`.
--
-- PostgreSQL refuses to run as root. When the specs run as root (as in CI
-- containers), the cluster belongs to the unprivileged user `nobody`: its
-- folder is chown'ed to nobody and initdb/postgres run through `setpriv
-- --reuid=nobody --regid=nogroup --clear-groups` (util-linux; like
-- `runuser -u nobody` but it execs, so signals reach postgres itself and
-- its exit status is ours). As any other user they run directly.
--
-- P.start() -> server with .url, :psql(sql), :stop{allow=}, :restart(),
-- :destroy{allow=} (stop and remove its folder)
local osara = require "osara"
local H = require "spec.helpers.host"

local P = {}

local function sh(cmd)
  local p = assert(osara.process.spawn { argv = { "bash", "-c", cmd } })
  local status = p:wait(60)
  H.drain(p)
  return status, p:output()
end

local function must(cmd)
  local status, out = sh(cmd)
  assert(status == 0, ("`%s` failed (%s):\n%s"):format(cmd, tostring(status), out))
  return out
end

function P.bindir()
  local out = must("ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1")
  return (out:gsub("%s+$", ""))
end

function P.available()
  return sh("ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1") == 0
end

local function as_owner(self, argv)
  if self.user then
    local full = { "setpriv", "--reuid=" .. self.user, "--regid=nogroup", "--clear-groups",
                   "--reset-env" }
    for _, a in ipairs(argv) do full[#full + 1] = a end
    return full
  end
  return argv
end

-- A free TCP port on 127.0.0.1 (nothing listens on it now), below the
-- kernel's ephemeral range (32768+), where client sockets take theirs.
local function free_port()
  for _ = 1, 50 do
    local port = math.random(10000, 32000)
    if sh(("exec 3<>/dev/tcp/127.0.0.1/%d"):format(port)) ~= 0 then return port end
  end
  error("no free port found")
end

local Server = {}
Server.__index = Server

function Server:_launch()
  self.proc = assert(osara.process.spawn { argv = as_owner(self, {
    self.bin .. "/postgres", "-D", self.data, "-k", self.sock, "-p", tostring(self.port),
    "-h", "127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off",
    "-c", "max_connections=50",
  }) })
  local line, err = self.proc:expect("ready to accept connections", 30)
  if not line and self.proc:output():find("could not bind", 1, true) and (self.retries or 0) < 5 then
    self.retries = (self.retries or 0) + 1 -- taken since we looked: another port
    self.proc:wait(10)
    self.port = free_port()
    return self:_launch()
  end
  if not line then
    error("postgres did not start (" .. tostring(err) .. "):\n" .. self.proc:output())
  end
end

-- Fast shutdown (SIGINT: clients are disconnected); asserts exit 0 and no
-- ERROR/FATAL/PANIC in its log except lines matching one of `allow`.
function Server:stop(opts)
  local allow = opts and opts.allow or {}
  self.proc:kill("INT")
  local status = self.proc:wait(30)
  if status == nil then
    self.proc:kill("KILL")
    error("postgres did not stop:\n" .. self.proc:output())
  end
  H.drain(self.proc)
  local log = self.proc:output()
  assert(status == 0, "postgres exited with " .. tostring(status) .. ":\n" .. log)
  for line in log:gmatch("[^\n]+") do
    if line:match("ERROR:") or line:match("FATAL:") or line:match("PANIC:") then
      local ok = false
      for _, pat in ipairs(allow) do
        if line:find(pat, 1, true) then ok = true end
      end
      assert(ok, "unexpected line in the postgres log: " .. line)
    end
  end
  return log
end

-- stop, then remove the cluster's folder.
function Server:destroy(opts)
  local ok, err = pcall(self.stop, self, opts)
  must("rm -rf " .. self.root)
  if not ok then error(err, 0) end
end

function Server:restart(opts)
  self:stop(opts)
  self:_launch()
end

-- Runs SQL through psql; returns its output (unaligned, tuples only).
function Server:psql(sql)
  local p = assert(osara.process.spawn { argv = {
    self.bin .. "/psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
    "-h", "127.0.0.1", "-p", tostring(self.port), "-U", "postgres", "-d", "postgres", "-c", sql,
  } })
  local status = p:wait(30)
  H.drain(p)
  assert(status == 0, "psql failed: " .. p:output())
  return (p:output():gsub("%s+$", ""))
end

function P.start()
  local self = setmetatable({ bin = P.bindir(), port = free_port() }, Server)
  -- Its own folder, not H.tmpdir's: H.cleanup in an after_each must not
  -- delete a server that lives for the whole describe.
  local root = (must("mktemp -d /tmp/osara-pg-XXXXXXXX"):gsub("%s+$", ""))
  self.root, self.data, self.sock = root, root .. "/data", root .. "/sock"
  must(("mkdir -p %s %s"):format(self.data, self.sock))
  if must("id -u"):match("^0") then
    self.user = "nobody"
    must(("chown -R nobody %s"):format(root))
  end
  local init = as_owner(self, { self.bin .. "/initdb", "-D", self.data, "-U", "postgres",
    "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions" })
  local p = assert(osara.process.spawn { argv = init })
  local status = p:wait(120)
  H.drain(p)
  assert(status == 0, "initdb failed:\n" .. p:output())
  self:_launch()
  self.retries = 5 -- a restart keeps its port: the URL is in use
  self.url = ("postgres://postgres@127.0.0.1:%d/postgres"):format(self.port)
  return self
end

return P
