-- A real redis-server (Debian's) on a free loopback port for integration
-- specs: no persistence, stopped with SIGTERM and its exit status checked.
local osara = require "osara"

local R = {}

-- A loopback port nothing listens on now (bound, then released).
function R.free_port()
  local p = assert(osara.process.spawn { argv = { "/usr/bin/python3", "-c",
    "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])" } })
  local line = assert(p:line(10), "no free port")
  p:wait(10)
  return tonumber(line)
end

-- Starts a server; returns { port =, addr =, process =, stop = fn }. A
-- port may be given to restart one on the same address.
function R.start(port)
  port = port or R.free_port()
  local p = assert(osara.process.spawn { argv = { "redis-server", "--port", tostring(port),
    "--bind", "127.0.0.1", "--save", "", "--appendonly", "no" } })
  if not p:expect("Ready to accept connections", 10) then
    p:kill("KILL")
    error("redis-server did not start:\n" .. p:output(), 2)
  end
  local s = { port = port, addr = "127.0.0.1:" .. port, process = p }
  -- Stops it and checks it exited cleanly (status 0, its log says bye).
  function s.stop()
    p:kill("TERM")
    local status = p:wait(10)
    assert(status == 0, "redis-server exit status " .. tostring(status) .. ":\n" .. p:output())
    assert(p:output():find("ready to exit", 1, true), "redis-server log:\n" .. p:output())
  end
  return s
end

return R
