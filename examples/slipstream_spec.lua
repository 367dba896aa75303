-- Runs the slipstream ports (examples/slipstream/) with the real binary
-- against the embedded Kafka cluster and checks the output the seed shows.
local H = require "spec.helpers.host"
local T = require "spec.helpers.http"

local function start(example, args)
  local argv = { "run", "--data", H.tmpdir() }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  argv[#argv + 1] = "examples/slipstream/" .. example
  return H.osara(argv)
end

-- The lines p printed (not the log), in order, once `n` of them arrived.
local function printed(p, n, timeout)
  local lines = {}
  H.eventually(function()
    lines = {}
    for line in p:output():gmatch("[^\n]+") do
      if not line:match("^%d%d%d%d%-%d%d%-%d%dT") then lines[#lines + 1] = line end
    end
    return #lines >= n
  end, timeout or 60, n .. " printed lines")
  return lines
end

describe("slipstream examples", function()
  after_each(H.cleanup)

  it("topic.lua produces two keyed messages and iterates them", function()
    local p = start "topic.lua"
    assert.are.same({ "trophy\t🏆", "fish\t🐟" }, printed(p, 2))
    H.stop(p)
  end)

  it("cache.lua lists the cache in key order and writes in a transaction", function()
    local p = start "cache.lua"
    assert.are.same({ "phone\t📞", "prize\t🏆", "fish\t🐟" }, printed(p, 3))
    H.stop(p)
  end)

  it("conf.lua merges Conf defaults under each client's own settings", function()
    local status, out = H.run { "check", "examples/slipstream/conf.lua" }
    assert.are.equal(0, status)
    assert.matches("{'bootstrap.servers': 'localhost:29092', 'group.id': 'default-demo'}", out, 1, true)
    assert.matches("{'bootstrap.servers': 'localhost:29091', 'group.id': 'demo', 'security.protocol': 'SASL_SSL', "
                   .. "'sasl.mechanism': 'PLAIN', 'sasl.username': 'myuser', 'sasl.password': 'mypass'}", out, 1, true)
  end)

  it("yield.lua sends zero or more outputs per input into print", function()
    local p = start "yield.lua"
    assert.are.same({ "zero: 0", "even: 0", "even: 2", "even: 4" }, printed(p, 4))
    H.stop(p)
  end)

  it("timer.lua prints the time every second", function()
    local p = start "timer.lua"
    local lines = printed(p, 2, 30)
    assert.matches("^%d%d:%d%d:%d%d$", lines[1])
    assert.matches("^%d%d:%d%d:%d%d$", lines[2])
    H.stop(p)
  end)

  it("codec.lua round-trips JSON, Avro and a custom codec", function()
    local p = start "codec.lua"
    assert.are.same({ '1\t{"msg":"🐟"}', '2\t{"msg":"🐟"}', "3\tfish" }, printed(p, 3))
    H.stop(p)
  end)

  it("endpoint.lua streams the cache's updates as server-sent events", function()
    local p = start("endpoint.lua", { "--http", "127.0.0.1:0" })
    local port = T.listening(p)
    local out = T.raw(port, "GET /updates HTTP/1.1\r\nHost: x\r\n\r\n", 2.5)
    local _, n = out:gsub("data: %d%d:%d%d:%d%d", "")
    assert.is_true(n >= 2, out)
    assert.matches("^time\t%d%d:%d%d:%d%d$", printed(p, 1)[1])
    H.stop(p)
  end)
end)
