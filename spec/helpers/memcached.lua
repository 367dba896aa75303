-- A real memcached (Debian's) on a free loopback port for integration
-- specs, stopped with SIGTERM and its exit status checked.
local osara = require "osara"
local R = require "spec.helpers.redis"

local M = {}

-- Starts a server; returns { port =, addr =, process =, stop = fn }.
function M.start(port)
  port = port or R.free_port()
  local p = assert(osara.process.spawn { argv = { "memcached", "-vv", "-l", "127.0.0.1",
    "-p", tostring(port), "-U", "0", "-u", "nobody", "-m", "16" } })
  if not p:expect("server listening", 10) then
    p:kill("KILL")
    error("memcached did not start:\n" .. p:output(), 2)
  end
  local s = { port = port, addr = "127.0.0.1:" .. port, process = p }
  function s.stop()
    p:kill("TERM")
    local status = p:wait(10)
    assert(status == 0, "memcached exit status " .. tostring(status) .. ":\n" .. p:output())
    assert(p:output():find("Exiting normally", 1, true), "memcached log:\n" .. p:output())
  end
  return s
end

return M
