-- Issue 14 item 8, the rough edges outside HTTP that a newcomer hits.
local osara = require "osara"
local H = require "spec.helpers.host"

describe("rough edges", function()
  after_each(H.cleanup)

  it("gh_14: writes the log lines logged just before os.exit", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
osara.after(0, function()
  for i = 1, 200 do osara.log.info("line %d before exit", i) end
  os.exit(3)
end)
]])
    for _ = 1, 3 do -- the writer thread races exit(): try a few times
      local status, out = H.run { "run", dir .. "/app.lua" }
      assert.are.equal(3, status)
      assert.matches("line 200 before exit", out)
    end
  end)

  it("gh_14: osara.process.spawn of a missing program returns nil and an error naming it", function()
    local p, err = osara.process.spawn { argv = { "/no/such/bin", "x" } }
    assert.is_nil(p)
    assert.are.equal("cannot start /no/such/bin: no such file or directory", err)
  end)

  it("gh_14: --data creates the missing parent folders, as mkdir -p", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local db = osara.store "s"
db:set("k", "v")
osara.log.info("stored in %s", osara.paths().data_dir)
]])
    local data = dir .. "/a/b/c"
    local p = H.osara { "run", "--data", data, dir .. "/app.lua" }
    H.expect(p, "stored in " .. data)
    H.stop(p)
    assert.are.equal("directory", require("lfs").attributes(data, "mode"))
  end)

  it("gh_14: says how to stop the host and logs a last line when stopped", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[require("osara").every(1, function() end)]])
    local p = H.osara { "run", "--watch", dir .. "/app.lua" }
    assert.matches("Ctrl%-C or SIGTERM stops it, SIGHUP reloads it, and so does saving it",
      H.expect(p, "running " .. dir .. "/app.lua"))
    H.stop(p)
    assert.matches("INFO  stopped " .. dir:gsub("%-", "%%-") .. "/app.lua %(exit status 0%)\n$", p:output())
  end)
end)

describe("a Kafka broker down at start", function()
  after_each(H.cleanup)

  it("gh_14: is logged once, not once per retry and handle", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local kafka = osara.kafka { ["bootstrap.servers"] = "127.0.0.1:1" }
kafka:handle("orders", function(msg) end)
kafka:topic("out")
]])
    local p = H.osara { "run", dir .. "/app.lua" }
    H.expect(p, "WARN  kafka 127.0.0.1:1: ")
    osara.sleep(1.5) -- librdkafka retries the connection every few hundred ms meanwhile
    H.stop(p)
    local _, n = p:output():gsub("WARN  kafka 127%.0%.0%.1:1: ", "")
    assert.are.equal(1, n, p:output())
  end)
end)

describe("store limits", function()
  after_each(H.cleanup)

  it("gh_14: a key over LMDB's limit raises naming its size, on every write path", function()
    local db = osara.store("big", { dir = H.tmpdir() .. "/data" })
    local big = string.rep("k", 600)
    for what, f in pairs {
      set = function() db:set(big, 1) end,
      get = function() db:get(big) end,
      delete = function() db:delete(big) end,
      transaction = function() assert(db:transaction(function(tx) tx:set(big, 1) end)) end, -- nil, err
      set_many = function() db:set_many { [big] = 1 } end,
    } do
      local ok, err = pcall(f)
      assert.is_false(ok, what)
      assert.matches("key of 600 bytes %(keys are 1 to 511 bytes%)", err, 1, false, what)
    end
    db:set(string.rep("k", 511), "fits")
    assert.are.equal("fits", db:get(string.rep("k", 511)))
  end)

  it("gh_14: osara store names the stores there are when asked for one that is not", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
osara.store("alpha"):set("a", 1)
osara.store("beta"):set("b", 2)
osara.log.info("written")
]])
    local p = H.osara { "run", dir .. "/app.lua" }
    H.expect(p, "written")
    H.stop(p)
    local status, out = H.run { "store", dir .. "/.osara-data", "dump", "gamma" }
    assert.are.equal(1, status)
    assert.matches("no store named 'gamma' in .* %(stores: alpha, beta%)", out)
  end)

  it("gh_14: says how many stores a data folder holds", function()
    local dir = H.tmpdir() .. "/data"
    local ok, err = pcall(function()
      for i = 1, 130 do osara.store("s" .. i, { dir = dir }) end
    end)
    assert.is_false(ok)
    assert.matches("a data folder holds at most 128 stores", err)
  end)
end)
