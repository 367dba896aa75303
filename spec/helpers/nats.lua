-- NATS helpers for integration specs: a real nats-server on a free port.
local osara = require "osara"

local N = {}

-- Starts nats-server on a random loopback port; returns process, url.
-- port: reuse a port (restarts).
function N.server(port, dir)
  local argv = { "nats-server", "-a", "127.0.0.1", "-p", tostring(port or -1) }
  if dir then
    argv[#argv + 1] = "-js"
    argv[#argv + 1] = "-sd"
    argv[#argv + 1] = dir
  end
  local p = assert(osara.process.spawn { argv = argv })
  local line = assert(p:expect("Listening for client connections on", 10), "nats-server did not start")
  local url = "nats://" .. line:match("on ([%d.]+:%d+)")
  return p, url, tonumber(url:match(":(%d+)$"))
end

return N
