-- osara.testrun: runs busted inside the host (osara test).
--
-- The specs run in a pooled coroutine on the worker's loop, so they can
-- call osara.sleep, start processes and wait for them like handlers do.
local vm = require "osara.vm_c"

local M = {}

local EXIT = {}

function M.run(paths, output)
  local args = {}
  for i, p in ipairs(paths) do
    args[i] = p
  end
  if #args == 0 then
    args[1] = "spec"
  end
  if output then
    table.insert(args, 1, "--output=" .. output)
  end
  args[0] = "osara test"
  rawset(_G, "arg", args)
  local compat = require "busted.compatibility"
  local code = 0
  -- busted ends by calling os.exit; end the host gracefully instead.
  compat.exit = function(c)
    code = c
    error(EXIT, 0)
  end
  local ok, err = pcall(require "busted.runner", { standalone = false })
  if not ok and err ~= EXIT then
    io.stderr:write("osara test: ", tostring(err), "\n")
    code = 1
  end
  io.stdout:flush()
  local testing = package.loaded["osara.testing"]
  if testing then testing.cleanup() end -- data folders of apps not closed
  vm.stop(code == 0 and 0 or 1)
end

return M
