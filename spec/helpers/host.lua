-- Helpers for integration specs: temp folders, files, and the real osara
-- binary started as a child process whose output is awaited line by line.
local osara = require "osara"

local H = {}

local counter = 0

-- A fresh empty folder under /tmp, removed by H.cleanup().
function H.tmpdir()
  counter = counter + 1
  local dir = ("/tmp/osara-spec-%d-%d-%d"):format(os.time(), math.random(1e6), counter)
  assert(os.execute("mkdir -p " .. dir) == 0 or true)
  H._dirs = H._dirs or {}
  H._dirs[#H._dirs + 1] = dir
  return dir
end

function H.cleanup()
  for _, d in ipairs(H._dirs or {}) do
    os.execute("rm -rf " .. d)
  end
  H._dirs = {}
end

function H.write(path, content)
  -- Write to a temp name and rename, as editors do: watchers see one change.
  local tmp = path .. ".tmp"
  local f = assert(io.open(tmp, "w"))
  f:write(content)
  f:close()
  assert(os.rename(tmp, path))
end

function H.exe()
  return osara.paths().exe
end

-- Starts `osara <args...>`; returns the process (see osara.process).
function H.osara(args, env)
  local argv = { H.exe() }
  for _, a in ipairs(args) do
    argv[#argv + 1] = a
  end
  return assert(osara.process.spawn { argv = argv, env = env })
end

-- Runs `osara <args...>` to completion; returns status, output.
function H.run(args, timeout, env)
  local p = H.osara(args, env)
  local status, sig = p:wait(timeout or 20)
  if status == nil then
    p:kill("KILL")
    error("osara " .. table.concat(args, " ") .. " did not exit within " .. (timeout or 20) .. "s:\n" .. p:output())
  end
  H.drain(p)
  return status, p:output(), sig
end

-- Reads until both output pipes closed (after the process exited, its last
-- output may still be in flight).
function H.drain(p)
  while true do
    local line, err = p:line(5)
    if not line then
      assert(err == "eof", "output did not end: " .. tostring(err))
      return
    end
  end
end

-- Waits for a line containing text; fails with the output so far.
function H.expect(p, text, timeout)
  local line, err = p:expect(text, timeout or 10)
  if not line then
    error(("expected output containing %q (%s); output was:\n%s"):format(text, err, p:output()), 2)
  end
  return line
end

-- Asserts the process exits within timeout; returns the status.
function H.exit_status(p, timeout)
  local status, sig = p:wait(timeout or 15)
  if status == nil then
    p:kill("KILL")
    error("process did not exit; output:\n" .. p:output(), 2)
  end
  return status, sig
end

-- Polls fn() until it returns a truthy value or timeout passes.
function H.eventually(fn, timeout, what)
  local deadline = osara.monotonic() + (timeout or 10)
  while true do
    local v = fn()
    if v then
      return v
    end
    if osara.monotonic() > deadline then
      error("timed out waiting for " .. (what or "condition"), 2)
    end
    osara.sleep(0.01)
  end
end

return H
