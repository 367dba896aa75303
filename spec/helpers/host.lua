-- Helpers for integration specs: temp folders, files, and child processes
-- (the real osara binary, brokers, tools) whose output is awaited line by
-- line and checked when they stop.
--
-- Every child goes through H.osara / H.child so that, when the spec stops it,
-- its exit status is asserted and its whole log is searched (Test::Nginx's
-- "no error_log"): no sanitizer report, no "loop stall" warning, and for
-- osara no ERROR line other than those the spec lists in `errors`.
local osara = require "osara"

local H = {}

-- Where spec folders go: a RAM file system when there is one. A store
-- commits and fsyncs on the loop thread; on a disk shared with parallel
-- builds an fsync takes 100-400 ms now and then, which the loop-stall
-- watchdog (on in every child, and fatal to a spec) reports as a stall of
-- the disk, not of the code under test.
local TMP = os.getenv("OSARA_SPEC_TMP")
if not TMP then
  local probe = io.open("/dev/shm/.osara-spec-probe", "w")
  if probe then
    probe:close()
    os.remove("/dev/shm/.osara-spec-probe")
    TMP = "/dev/shm"
  else
    TMP = "/tmp"
  end
end

-- A fresh empty folder under TMP (mktemp: unique even when several suites
-- run side by side), removed by H.cleanup().
function H.tmpdir()
  local f = assert(io.popen("mktemp -d " .. TMP .. "/osara-spec-XXXXXXXX"))
  local dir = f:read("*l")
  f:close()
  assert(dir and dir ~= "", "mktemp -d failed")
  H._dirs = H._dirs or {}
  H._dirs[#H._dirs + 1] = dir
  return dir
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

-- ---- Children -------------------------------------------------------------

-- Lines that fail any child's log, searched as plain text. UBSan reports
-- "<file>:<line>:<col>: runtime error: ..."; the watchdog logs "loop stall".
H.FORBIDDEN = { "AddressSanitizer", "LeakSanitizer", "ThreadSanitizer",
                "runtime error:", "loop stall" }

local children = {} -- in spawn order, until H.cleanup
local info = setmetatable({}, { __mode = "k" }) -- process -> what to check

-- An osara log line at ERROR level, plain or JSON format.
local function is_error_line(line)
  return line:match("^%d%d%d%d%-%d%d%-%d%dT[%d:.]+Z ERROR ") ~= nil
      or line:find('"level":"error"', 1, true) ~= nil
end

-- Starts argv as a tracked child. opts: env; status (the exit status
-- H.stop expects, default 0; a list of statuses; false: not checked); errors (Lua patterns of
-- the ERROR lines this spec expects; osara children only); name.
function H.child(argv, opts)
  opts = opts or {}
  local p = assert(osara.process.spawn { argv = argv, env = opts.env })
  info[p] = {
    name = opts.name or argv[1]:match("[^/]*$"),
    osara = opts.osara or false,
    status = opts.status == nil and 0 or opts.status,
    errors = opts.errors or {},
  }
  children[#children + 1] = p
  return p
end

-- Starts `osara <args...>`; returns the process (see osara.process).
-- opts as for H.child (env may also be passed as the second argument).
function H.osara(args, env, opts)
  opts = opts or {}
  local argv = { H.exe() }
  for _, a in ipairs(args) do
    argv[#argv + 1] = a
  end
  return H.child(argv, { env = env or opts.env, status = opts.status, errors = opts.errors,
                         name = "osara " .. (args[1] or ""), osara = true })
end

-- Lines of the log that break the rules for p, or nil.
local function offending(p, i)
  local bad = {}
  for line in p:output():gmatch("[^\n]+") do
    local why
    for _, f in ipairs(H.FORBIDDEN) do
      if line:find(f, 1, true) then why = f break end
    end
    if not why and i.osara and is_error_line(line) then
      why = "unexpected ERROR"
      for _, pat in ipairs(i.errors) do
        if line:find(pat) then why = nil break end
      end
    end
    if why then bad[#bad + 1] = line end
  end
  return #bad > 0 and bad or nil
end

-- Checks the log of an exited child (after reading it to the end) and, if
-- want is a status or a list of them, its exit status; raises naming the child, what is wrong
-- (forbidden lines first: a sanitizer report explains a bad status), then
-- the whole log.
local function check_exited(p, status, sig, want, level)
  local i = assert(info[p], "not a tracked child")
  i.checked = true
  H.drain(p)
  local problems = {}
  local bad = offending(p, i)
  if bad then
    problems[#problems + 1] = ("its log has %d forbidden line(s):\n  %s")
      :format(#bad, table.concat(bad, "\n  ", 1, math.min(#bad, 20)))
  end
  local wanted = type(want) == "table" and want or { want }
  local ok = want == false or want == nil
  for _, w in ipairs(wanted) do ok = ok or status == w end
  if not ok then
    problems[#problems + 1] = ("it exited with status %d (signal %d), expected %s")
      :format(status, sig or 0, table.concat(wanted, " or "))
  end
  if #problems > 0 then
    error(("%s (pid %d): %s\n--- whole log ---\n%s")
      :format(i.name, p.pid, table.concat(problems, "; "), p:output()), level + 1)
  end
end

-- Checks the log of a child that exited (its status is the caller's).
function H.check_log(p)
  check_exited(p, nil, nil, false, 2)
end

-- Waits for p to exit, then checks its log and its status (opts.status,
-- else the one given at spawn; false skips). Returns the status.
local function finish(p, timeout, opts)
  local i = info[p]
  local status, sig = p:wait(timeout or 20)
  if status == nil then
    p:kill("KILL")
    p:wait(5)
    i.checked = true
    error(("%s (pid %d) did not exit within %ss; output:\n%s"):format(i.name, p.pid, timeout or 20, p:output()), 3)
  end
  local want = opts.status
  if want == nil then want = i.status end
  check_exited(p, status, sig, want, 3)
  return status, sig
end

-- Stops a child with SIGTERM (or opts.signal), then asserts its exit status
-- and checks its log. opts: signal, status, timeout.
function H.stop(p, opts)
  opts = opts or {}
  if not p.exited then p:kill(opts.signal or "TERM") end
  return finish(p, opts.timeout, opts)
end

-- Kills a child with SIGKILL (a crash the spec stages): its status is not
-- checked, its log is.
function H.kill9(p)
  p:kill("KILL")
  return finish(p, 10, { status = false })
end

-- Waits for a child that exits by itself, asserts its status and checks its
-- log. opts: status, timeout.
function H.finish(p, opts)
  opts = opts or {}
  return finish(p, opts.timeout, opts)
end

-- Stops (SIGTERM) and checks every tracked child not checked yet; raises
-- after all were stopped if any failed.
function H.check_children()
  local list = children
  children = {}
  local errs = {}
  for _, p in ipairs(list) do
    local i = info[p]
    if i and not i.checked then
      local ok, err = pcall(H.stop, p, { timeout = 20 })
      if not ok then errs[#errs + 1] = tostring(err) end
    end
  end
  if #errs > 0 then error(table.concat(errs, "\n\n"), 0) end
end

-- Stops and checks every tracked child still unchecked, then removes the
-- temp folders. Call it from after_each (or teardown).
function H.cleanup()
  local ok, err = pcall(H.check_children)
  for _, d in ipairs(H._dirs or {}) do
    os.execute("rm -rf " .. d)
  end
  H._dirs = {}
  if not ok then error(err, 0) end
end

-- Runs `osara <args...>` to completion; returns status, output, signal. Its
-- log is checked like a stopped child's; opts.errors lists the ERROR lines
-- the spec expects (a failing script logs one).
function H.run(args, timeout, env, opts)
  opts = opts or {}
  local p = H.osara(args, env, { status = false, errors = opts.errors })
  local status, sig = p:wait(timeout or 20)
  if status == nil then
    info[p].checked = true
    p:kill("KILL")
    error("osara " .. table.concat(args, " ") .. " did not exit within " .. (timeout or 20) .. "s:\n" .. p:output())
  end
  H.check_log(p)
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

-- Asserts the process exits within timeout; returns the status. The log is
-- checked as by H.finish, without a status check (the caller asserts it).
function H.exit_status(p, timeout)
  return finish(p, timeout or 15, { status = false })
end

-- How many times the Lua pattern occurs in text (a log).
function H.count(text, pattern)
  local n = 0
  for _ in text:gmatch(pattern) do n = n + 1 end
  return n
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
