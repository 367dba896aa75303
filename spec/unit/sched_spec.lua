local osara = require "osara"

describe("coroutine scheduler", function()
  it("resumes many concurrent sleepers in deadline order", function()
    local order, done = {}, 0
    local n = 200
    for i = 1, n do
      osara.spawn(function()
        osara.sleep(((i * 7) % n) / 1000)
        order[#order + 1] = (i * 7) % n
        done = done + 1
      end)
    end
    local t0 = osara.monotonic()
    while done < n and osara.monotonic() - t0 < 5 do
      osara.sleep(0.01)
    end
    assert.are.equal(n, done)
    for k = 2, n do
      assert.is_true(order[k - 1] <= order[k] + 1)
    end
  end)
end)
