-- osara.health: what /readyz reports. Each client (Kafka, NATS) adds a
-- check when the script creates it; a check returns nil when ready, else
-- a short reason. Module state is per script version, as the clients are.
local vm_c = require "osara.vm_c"

local M = {}
local checks = {} -- { name =, fn = } in creation order
local starting = false -- on_start hooks still running

-- add(name, fn): fn() -> nil | "why not ready"
function M.add(name, fn)
  checks[#checks + 1] = { name = name, fn = fn }
end

function M.set_starting(v)
  starting = v
end

-- readiness() -> ready, { {name=, ready=, reason=}, ... }
function M.readiness()
  local list, ready = {}, true
  local function note(name, reason)
    list[#list + 1] = { name = name, ready = reason == nil, reason = reason }
    ready = ready and reason == nil
  end
  note("host", vm_c.stats().stopping and "stopping" or (starting and "starting (on_start hooks running)") or nil)
  for _, c in ipairs(checks) do
    local ok, reason = pcall(c.fn)
    if not ok then reason = "check failed: " .. tostring(reason) end
    note(c.name, reason)
  end
  return ready, list
end

return M
