-- osara.lifecycle: the start-up and shutdown hooks (osara.on_start,
-- osara.on_stop; FastStream's on_startup/on_shutdown). The worker runs
-- run_start() once after the first load, before any handler, route or
-- timer starts, and run_stop() once on a graceful stop, after the
-- consumers stopped and the handlers in flight finished, before the
-- clients close. Hooks belong to the process, not to a script version: a
-- reload runs neither (clients and stores survive it); at a stop, the
-- hooks of the version serving then run. See README "Start-up and shutdown".
local vm_c = require "osara.vm_c"
local log = require "osara.log_c"

local M = {}
local starts, stops = {}, {}

-- Clients are waited for this long before the on_start hooks run anyway.
M.connect_timeout = 30

local function add(list, name, fn)
  if type(fn) ~= "function" then
    error(("osara.%s: expected a function, got %s"):format(name, type(fn)), 3)
  end
  if not vm_c.loading() then
    error(("osara.%s: register hooks while the script loads (at its top level)"):format(name), 3)
  end
  list[#list + 1] = fn
end

function M.on_start(fn) add(starts, "on_start", fn) end
function M.on_stop(fn) add(stops, "on_stop", fn) end

-- Waits until every client the script created is connected (readiness
-- without the consumers' assignments: they have not subscribed yet).
local function wait_connected()
  local health = require "osara.health"
  local deadline = require("osara").monotonic() + M.connect_timeout
  while true do
    local _, list = health.readiness()
    local waiting = {}
    for _, c in ipairs(list) do -- the host itself says "starting" meanwhile
      if not c.ready and c.name ~= "host" then waiting[#waiting + 1] = c.name .. ": " .. c.reason end
    end
    if #waiting == 0 or vm_c.stats().stopping then return end
    if require("osara").monotonic() > deadline then
      log.write("warn", ("on_start: running the hooks although not every client is connected after %g s (%s)")
        :format(M.connect_timeout, table.concat(waiting, "; ")))
      return
    end
    require("osara").sleep(0.01)
  end
end

-- Runs the on_start hooks in order; an error propagates (the host stops).
function M.run_start()
  if #starts == 0 then return end
  local health = require "osara.health"
  health.set_starting(true)
  local ok, err = pcall(function()
    wait_connected()
    for _, fn in ipairs(starts) do fn() end
  end)
  health.set_starting(false)
  if not ok then error(err, 0) end
end

-- Runs every on_stop hook; one that raises is logged, the others still run.
function M.run_stop()
  for _, fn in ipairs(stops) do
    local ok, err = pcall(fn)
    if not ok then
      require("osara.sched_c").error()
      log.write("error", "on_stop hook failed: " .. tostring(err))
    end
  end
end

function M.counts()
  return #starts, #stops
end

return M
