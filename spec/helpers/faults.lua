-- Helpers for the fault suite (spec/faults/*_fault.lua, issue 13 item 4):
-- sizes for the short run (scripts/test) and the long one (scripts/faults),
-- numbered inputs produced with kcat, outputs read back with kcat, and the
-- one report line every case prints:
--   fault: <name> sent=N handled=N lost=N duplicated=N
local osara = require "osara"
local H = require "spec.helpers.host"
local K = require "spec.helpers.kafka"

local F = {}
local unpack = table.unpack or unpack

-- scripts/faults sets OSARA_FAULTS_LONG=1: bigger N, longer durations.
F.long = os.getenv("OSARA_FAULTS_LONG") == "1"

function F.size(short, long)
  return F.long and long or short
end

-- Produces {"id":i} for i = from..to to topic, keyed "k<i>", with headers.
function F.produce(boot, topic, from, to, headers)
  local argv = { "kcat", "-b", boot, "-t", topic, "-P", "-K", "\t" }
  for k, v in pairs(headers or {}) do
    argv[#argv + 1] = "-H"
    argv[#argv + 1] = k .. "=" .. v
  end
  local p = H.child(argv, { name = "kcat -P " .. topic })
  local chunk = {}
  for i = from, to do
    chunk[#chunk + 1] = ("k%d\t{\"id\":%d}\n"):format(i, i)
    if #chunk == 1000 or i == to then
      p:write(table.concat(chunk))
      chunk = {}
    end
  end
  p:close_stdin()
  H.finish(p, { timeout = 120 })
end

-- Produces {"id":i} for i = from..to at rate inputs a second from a
-- task, through one kcat; returns a table whose `sent` is the last id
-- written so far and `done` is true once kcat closed its input.
function F.produce_at_rate(boot, topic, from, to, rate)
  local kcat = H.child({ "kcat", "-b", boot, "-t", topic, "-P", "-K", "\t" }, { name = "kcat -P " .. topic })
  local state = { sent = from - 1, done = false }
  osara.spawn(function()
    while state.sent < to do
      local chunk = {}
      for i = state.sent + 1, math.min(to, state.sent + math.ceil(rate / 10)) do
        chunk[#chunk + 1] = ("k%d\t{\"id\":%d}\n"):format(i, i)
      end
      kcat:write(table.concat(chunk))
      state.sent = state.sent + #chunk
      osara.sleep(0.1)
    end
    kcat:close_stdin()
    H.finish(kcat, { timeout = 60 })
    state.done = true
  end)
  return state
end

-- Checks ids 1..n against a list from F.read: the set of ids seen, how
-- many distinct, how many repeats, how many missing.
function F.check(list, n)
  local seen, distinct, dup = F.tally(list)
  local lost = 0
  for id = 1, n do
    if not seen[id] then lost = lost + 1 end
  end
  return seen, distinct, dup, lost
end

-- ids of a topic's messages: a list of {id=, headers=} in topic order.
function F.read(boot, topic)
  local out = {}
  for _, m in ipairs(K.consume(boot, topic, 120)) do
    local id = tonumber(m.value:match('"id":(%d+)'))
    if id then out[#out + 1] = { id = id, headers = m.headers } end
  end
  return out
end

-- Counts of a list from F.read: a set of ids, distinct ids, repeats.
function F.tally(list)
  local seen, distinct, dup = {}, 0, 0
  for _, m in ipairs(list) do
    if seen[m.id] then dup = dup + 1 else distinct = distinct + 1 end
    seen[m.id] = (seen[m.id] or 0) + 1
  end
  return seen, distinct, dup
end

-- Re-reads topics every half second until done(lists...) is true or
-- timeout passes; returns the last lists either way (the case then
-- reports what is missing instead of only "timed out").
function F.read_until(boot, topics, done, timeout)
  local deadline = osara.monotonic() + timeout
  while true do
    local lists = {}
    for i, t in ipairs(topics) do lists[i] = F.read(boot, t) end
    if done(unpack(lists)) or osara.monotonic() > deadline then
      return unpack(lists)
    end
    osara.sleep(0.5)
  end
end

-- Prints the report line (and a note line under it); appends both to
-- $OSARA_FAULTS_OUT when set (scripts/faults collects them there).
function F.report(name, sent, handled, lost, duplicated, note)
  local line = ("fault: %s sent=%d handled=%d lost=%d duplicated=%d"):format(
    name, sent, handled, lost, duplicated)
  print("\n" .. line)
  if note then print("  " .. note) end
  local path = os.getenv("OSARA_FAULTS_OUT")
  if path then
    local f = assert(io.open(path, "a"))
    f:write(line, "\n", note and ("  " .. note .. "\n") or "")
    f:close()
  end
  return line
end

return F
