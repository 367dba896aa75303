-- A real memcached (Debian's) on a free loopback port for integration
-- specs, stopped with SIGTERM and its exit status checked.
local H = require "spec.helpers.host"
local R = require "spec.helpers.redis"

local M = {}

-- Starts a server; returns { port =, addr =, process =, stop = fn }.
function M.start(port)
  port = port or R.free_port()
  -- -v, not -vv: -vv logs every command, and a server whose log pipe is
  -- full stops answering until the spec's loop reads it.
  local p = H.child { "memcached", "-v", "-l", "127.0.0.1", "-p", tostring(port), "-U", "0",
                      "-u", "nobody", "-m", "16" }
  H.eventually(function()
    local probe = H.child({ "bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/" .. port }, { status = false })
    return H.finish(probe, { status = false }) == 0
  end, 10, "memcached on port " .. port)
  local s = { port = port, addr = "127.0.0.1:" .. port, process = p }
  function s.stop()
    H.stop(p)
    assert(p:output():find("Exiting normally", 1, true), "memcached log:\n" .. p:output())
  end
  return s
end

return M
