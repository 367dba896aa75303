local osara = require "osara"

describe("coroutine scheduler", function()
  it("resumes many concurrent sleepers in deadline order", function()
    local order, done = {}, 0
    local n = 200
    -- Under a sanitizer on a loaded machine spawning 200 tasks takes
    -- milliseconds, and a timer's due time may count from the loop's
    -- cached time or from the moment it was armed: two sleepers may
    -- swap by at most that spread, never more.
    local first = osara.monotonic()
    for i = 1, n do
      osara.spawn(function()
        local d = ((i * 7) % n) / 1000
        osara.sleep(d)
        order[#order + 1] = d
        done = done + 1
      end)
    end
    local spread = osara.monotonic() - first
    local t0 = osara.monotonic()
    while done < n and osara.monotonic() - t0 < 5 do
      osara.sleep(0.01)
    end
    assert.are.equal(n, done)
    for k = 2, n do
      assert.is_true(order[k - 1] <= order[k] + spread + 0.002,
        ("sleeper of %g s woke before one of %g s (spawn spread %g s)"):format(
          order[k], order[k - 1], spread))
    end
  end)
end)

-- gh_12: a handle waited on in an expression (`x:wait()` on a temporary)
-- is reachable only from the waiting C call; lua_yield drops that frame, so
-- a collection during the wait used to run its __gc and lose the waiter:
-- the wait never returned.
describe("gh_12 waiting survives a full collection mid-wait", function()
  -- Runs fn in a task while another task collects garbage every
  -- millisecond; returns fn's results, or fails if it does not return.
  local function under_gc(fn, secs)
    local stop, out = false, nil
    osara.spawn(function()
      while not stop do
        collectgarbage("collect")
        osara.sleep(0.001)
      end
    end)
    local function pack(...) return { n = select("#", ...), ... } end
    osara.spawn(function() out = pack(pcall(fn)) end)
    local t0 = osara.monotonic()
    while not out and osara.monotonic() - t0 < (secs or 5) do
      osara.sleep(0.01)
    end
    stop = true
    assert(out, "the wait did not return")
    assert(out[1], out[2])
    return unpack(out, 2, out.n)
  end

  it("process:wait on a handle nothing else references", function()
    local status = under_gc(function()
      return osara.process.spawn { argv = { "sh", "-c", "sleep 0.05" } }:wait(3)
    end)
    assert.are.equal(0, status)
  end)

  -- gh_12: the exit is a future (one completion primitive), the lines a
  -- stream: one task may wait for the exit while another reads lines.
  it("process:wait while another task waits for a line", function()
    local p = osara.process.spawn { argv = { "sh", "-c", "sleep 0.1; echo done" } }
    local line
    osara.spawn(function() line = p:line(3) end)
    local status = under_gc(function() return p:wait(3) end)
    assert.are.equal(0, status)
    assert.are.equal("done", line)
    assert.are.same({ 0, 0 }, { p:wait(0) }) -- done: answers at once
  end)

  it("osara.sleep and park with a timeout", function()
    local v, err = under_gc(function()
      osara.sleep(0.02)
      return require("osara.sched_c").park(0.02)
    end)
    assert.is_nil(v)
    assert.are.equal("timeout", err)
  end)

  it("a Kafka receipt of the embedded cluster", function()
    local kafka = osara.kafka { ["osara.partitions"] = 1 }
    local ok, err = under_gc(function()
      for i = 1, 3 do
        local ok, err = kafka:topic("gc.wait"):send({ n = i }):wait()
        if not ok then return ok, err end
      end
      return true
    end)
    assert.is_true(ok, err)
  end)

  local has_nats = os.execute("command -v nats-server >/dev/null 2>&1") == 0
  local it_nats = has_nats and it or pending
  it_nats("a JetStream publish acknowledgement", function()
    local N = require "spec.helpers.nats"
    local H = require "spec.helpers.host"
    local server, url = N.server(nil, H.tmpdir())
    local nats = osara.nats { servers = url }
    nats:stream { name = "GCWAIT", subjects = { "gcwait.>" } }
    local seq, err = under_gc(function()
      local seq, err
      for i = 1, 20 do
        seq, err = nats:jspublish("gcwait.x", { n = i }):wait()
        if not seq then break end
      end
      return seq, err
    end, 10)
    server:kill("TERM")
    server:wait(5)
    H.cleanup()
    assert.are.equal(20, seq, err)
  end)
end)

-- gh_12: the inbox drained until empty, and a task that yields re-posts
-- itself, so a task looping on osara.yield() kept the loop in one drain:
-- no timer fired and no socket was read until it stopped
describe("a task that keeps yielding", function()
  it("lets timers fire while it runs", function()
    local ticks, stop = 0, false
    local t = osara.every(0.01, function() ticks = ticks + 1 end)
    osara.spawn(function()
      while not stop do osara.yield() end
    end)
    local t0 = osara.monotonic()
    osara.sleep(0.2)
    local slept = osara.monotonic() - t0
    stop = true
    t:cancel()
    assert.is_true(slept < 1, ("sleep(0.2) took %.2f s"):format(slept))
    assert.is_true(ticks >= 5, "only " .. ticks .. " timer ticks in 0.2 s")
  end)
end)
