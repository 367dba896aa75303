-- NATS helpers for integration specs: a real nats-server on a free port.
local osara = require "osara"
local H = require "spec.helpers.host"

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
  -- nats-server exits 0 or 1 on SIGTERM (whichever of its shutdown paths wins)
  local p = H.child(argv, { status = { 0, 1 } })
  local line = assert(p:expect("Listening for client connections on", 10), "nats-server did not start")
  local url = "nats://" .. line:match("on ([%d.]+:%d+)")
  return p, url, tonumber(url:match(":(%d+)$"))
end

-- Waits until host process p logged "nats: subscribed to <subject>" for
-- every subject given (in any order: the confirmations come from the
-- thread pool). Reads p's lines up to the last one.
function N.subscribed(p, subjects, timeout)
  local want = {}
  for _, s in ipairs(subjects) do want["nats: subscribed to " .. s] = true end
  local deadline = osara.monotonic() + (timeout or 10)
  while next(want) do
    local line = p:line(math.max(0.01, deadline - osara.monotonic()))
    if line == nil or osara.monotonic() > deadline then
      local missing = {}
      for k in pairs(want) do missing[#missing + 1] = k end
      error(("expected %s; output was:\n%s"):format(table.concat(missing, ", "), p:output()), 2)
    end
    want[line:match("(nats: subscribed to %S+)$") or ""] = nil
  end
end

return N
