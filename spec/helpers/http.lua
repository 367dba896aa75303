-- HTTP helpers for integration specs: curl and a raw TCP client (bash's
-- /dev/tcp) for pipelining, slow and malformed requests.
local H = require "spec.helpers.host"

local T = {}

-- Waits until p logs the address it listens on; returns the port. Hosts
-- started with --http 127.0.0.1:0 let the kernel pick a free port, so
-- specs running side by side never collide.
function T.listening(p, timeout)
  local line = H.expect(p, "http: listening on http://", timeout or 10)
  return tonumber(line:match("http://[%d.]+:(%d+)"))
end

-- curl ARGS... -> status, headers (lowercased), body
function T.curl(args, timeout)
  local argv = { "curl", "-s", "-i", "--max-time", tostring(timeout or 10) }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  -- curl's own status is not asserted: specs provoke resets and timeouts
  local p = H.child(argv, { status = false })
  H.finish(p, { timeout = timeout and timeout + 5 or 15 })
  local out = p:output()
  local head, body = out:match("^(.-)\r\n\r\n(.*)$")
  head = head or out
  local status = tonumber(head:match("^HTTP/1%.%d (%d+)"))
  local headers = {}
  for k, v in head:gmatch("\n([^:\r\n]+): ([^\r\n]*)") do headers[k:lower()] = v end
  return status, headers, body or "", out
end

-- Sends raw bytes (a Lua string, may contain \r\n) on one connection after
-- optional pauses; returns everything the server answered until it closed
-- or `timeout` passed.
function T.raw(port, chunks, timeout)
  -- Read in the background: the server may answer (and close) before all
  -- chunks were written; writes after that must not kill the script.
  local script = { "exec 3<>/dev/tcp/127.0.0.1/" .. port, "trap '' PIPE",
                   "timeout " .. (timeout or 2) .. " cat <&3 &" }
  for _, c in ipairs(type(chunks) == "string" and { chunks } or chunks) do
    if type(c) == "number" then
      script[#script + 1] = "sleep " .. c
    else
      local esc = c:gsub("\\", "\\\\"):gsub("'", "'\\''"):gsub("\r", "\\r"):gsub("\n", "\\n")
      script[#script + 1] = "printf '%b' '" .. esc .. "' >&3 2>/dev/null"
    end
  end
  script[#script + 1] = "wait"
  local p = H.child({ "bash", "-c", table.concat(script, "\n") }, { status = false })
  H.finish(p, { timeout = (timeout or 2) + 10 })
  return p:output()
end

-- The resident memory of process p in KiB (/proc/PID/status).
function T.rss_kb(p)
  local f = assert(io.open("/proc/" .. p.pid .. "/status"))
  local kb = tonumber(f:read("*a"):match("VmRSS:%s*(%d+)"))
  f:close()
  return kb
end

-- Starts an app on a port and waits until it listens. opts as for H.osara
-- (errors: the ERROR lines the spec expects).
function T.app(dir, source, extra_args, opts)
  H.write(dir .. "/app.lua", source)
  local args = { "run", "--http", "127.0.0.1:0" }
  for _, a in ipairs(extra_args or {}) do args[#args + 1] = a end
  args[#args + 1] = dir .. "/app.lua"
  local p = H.osara(args, nil, opts)
  return p, T.listening(p)
end

return T
