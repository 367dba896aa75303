-- Kafka helpers for integration specs: a standalone `osara broker` and kcat
-- as an independent client.
local H = require "spec.helpers.host"

local K = {}

-- Starts `osara broker`; returns the process and its bootstrap address.
function K.broker(args)
  local argv = { "broker" }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local p = H.osara(argv)
  local line = assert(p:line(10), "osara broker printed no address")
  assert(line:match("^[%d.]+:%d+"), "unexpected first line: " .. line)
  return p, line
end

-- kcat -P: produces "key:value" lines (or values when no key), with headers.
function K.produce(bootstrap, topic, lines, headers)
  local argv = { "kcat", "-b", bootstrap, "-t", topic, "-P", "-K", "\t" }
  for k, v in pairs(headers or {}) do
    argv[#argv + 1] = "-H"
    argv[#argv + 1] = k .. "=" .. v
  end
  local p = H.child(argv)
  for _, l in ipairs(lines) do
    p:write(l .. "\n")
  end
  p:close_stdin()
  H.finish(p, { timeout = 30 })
end

-- kcat -C -e: every message of the topic as {key=, value=, headers=}.
function K.consume(bootstrap, topic, timeout)
  local p = H.child({ "kcat", "-b", bootstrap, "-t", topic, "-C",
    "-o", "beginning", "-e", "-q", "-f", "%k\t%s\t%h\n" }, { status = false })
  H.finish(p, { timeout = timeout or 30 })
  local out = {}
  for line in p:output():gmatch("[^\n]+") do
    local k, v, h = line:match("^(.-)\t(.-)\t(.*)$")
    if k then out[#out + 1] = { key = k, value = v, headers = h } end
  end
  return out
end

-- Waits until fn(messages of topic) is truthy, re-reading with kcat.
function K.eventually(bootstrap, topic, fn, timeout, what)
  local last
  local ok = pcall(H.eventually, function()
    last = K.consume(bootstrap, topic)
    return fn(last)
  end, timeout or 30, what)
  if not ok then
    error(("timed out waiting for %s on %s; saw %d message(s)"):format(what or "messages", topic, #(last or {})), 2)
  end
  return last
end

return K
