-- A real redis-server (Debian's) on a free loopback port for integration
-- specs: no persistence, stopped with SIGTERM and its exit status checked.
local H = require "spec.helpers.host"

local R = {}

-- A loopback port nothing listens on now (bound, then released).
function R.free_port()
  local p = H.child({ "/usr/bin/python3", "-c",
    "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])" })
  H.finish(p, { timeout = 10 })
  return assert(tonumber(p:output():match("%d+")), "no free port")
end

-- Starts a server; returns { port =, addr =, process =, stop = fn }. A
-- port may be given to restart one on the same address.
function R.start(port)
  port = port or R.free_port()
  local p = H.child { "redis-server", "--port", tostring(port), "--bind", "127.0.0.1",
                      "--save", "", "--appendonly", "no" }
  H.expect(p, "Ready to accept connections", 10)
  local s = { port = port, addr = "127.0.0.1:" .. port, process = p }
  -- Stops it and checks it exited cleanly (status 0, its log says bye).
  function s.stop()
    H.stop(p)
    assert(p:output():find("ready to exit", 1, true), "redis-server log:\n" .. p:output())
  end
  return s
end

return R
