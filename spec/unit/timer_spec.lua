local osara = require "osara"

describe("timers", function()
  it("fire in deadline order", function()
    local order = {}
    osara.after(0.03, function() order[#order + 1] = "c" end)
    osara.after(0.01, function() order[#order + 1] = "a" end)
    osara.after(0.02, function() order[#order + 1] = "b" end)
    osara.sleep(0.08)
    assert.are.same({ "a", "b", "c" }, order)
  end)

  it("cancel stops a timer before it fires", function()
    local fired = false
    local t = osara.after(0.02, function() fired = true end)
    assert.is_true(t:cancel())
    osara.sleep(0.05)
    assert.is_false(fired)
    assert.is_false(t:cancel()) -- already cancelled
  end)

  it("every repeats until cancelled", function()
    local n = 0
    local t = osara.every(0.01, function() n = n + 1 end)
    osara.sleep(0.065)
    t:cancel()
    local seen = n
    assert.is_true(seen >= 3, "ticks: " .. seen)
    osara.sleep(0.04)
    assert.are.equal(seen, n)
  end)

  it("a slow tick never overlaps itself and skipped ticks do not pile up", function()
    local running, overlaps, ticks = 0, 0, 0
    local skipped_before = osara.metrics.value("osara_timer_ticks_skipped_total")
    local t = osara.every(0.01, function()
      running = running + 1
      if running > 1 then overlaps = overlaps + 1 end
      ticks = ticks + 1
      osara.sleep(0.035)
      running = running - 1
    end)
    osara.sleep(0.2)
    t:cancel()
    assert.are.equal(0, overlaps)
    assert.is_true(ticks <= 6, "ticks: " .. ticks) -- ~0.2 / 0.035, not 20
    assert.is_true(osara.metrics.value("osara_timer_ticks_skipped_total") > skipped_before)
  end)

  it("an error in a tick is contained and counted", function()
    local before = osara.metrics.value("osara_lua_errors_total")
    osara.after(0, function() error("contained") end)
    osara.sleep(0.02)
    assert.are.equal(before + 1, osara.metrics.value("osara_lua_errors_total"))
  end)

  it("sleeps at least as long as asked, even after a long busy stretch", function()
    local t0 = osara.monotonic()
    while osara.monotonic() - t0 < 0.05 do end -- busy: the loop's cached time goes stale
    local t1 = osara.monotonic()
    osara.sleep(0.03)
    assert.is_true(osara.monotonic() - t1 >= 0.029)
  end)

  it("now is wall-clock and monotonic never goes back", function()
    assert.is_true(math.abs(osara.now() - os.time()) < 2)
    local a = osara.monotonic()
    osara.sleep(0.01)
    local b = osara.monotonic()
    assert.is_true(b - a >= 0.009)
  end)

  it("rejects bad arguments naming them", function()
    assert.has_error(function() osara.every(-1, function() end) end,
      "osara.every: seconds must be a number >= 0, got -1")
    assert.has_error(function() osara.after(1, "x") end,
      "osara.after: expected a function as argument 2, got string")
  end)
end)

describe("osara.spawn", function()
  it("runs a background task concurrently", function()
    local log = {}
    osara.spawn(function()
      log[#log + 1] = "task start"
      osara.sleep(0.01)
      log[#log + 1] = "task end"
    end)
    log[#log + 1] = "caller"
    osara.sleep(0.03)
    assert.are.same({ "task start", "caller", "task end" }, log)
  end)

  it("park and wake pass values between coroutines", function()
    local token, seq
    local got
    osara.spawn(function()
      token, seq = osara._sched.current()
      got = { osara._sched.park(1) }
    end)
    assert.is_true(osara._sched.wake(token, seq, "hello", 42))
    osara.sleep(0.01)
    assert.are.same({ "hello", 42 }, got)
    assert.is_false(osara._sched.wake(token, seq, "stale"))
  end)

  it("park times out with nil, 'timeout'", function()
    local a, b = osara._sched.park(0.01)
    assert.is_nil(a)
    assert.are.equal("timeout", b)
  end)
end)
