local osara = require "osara"
local H = require "spec.helpers.host"

local function open(name, opts)
  opts = opts or {}
  opts.dir = opts.dir or (H.tmpdir() .. "/data")
  return osara.store(name, opts), opts.dir
end

for _, kind in ipairs { "lmdb", "memory" } do
  describe("osara.store (" .. kind .. ")", function()
    after_each(H.cleanup)
    local function mk(name)
      return open(name, { memory = kind == "memory" })
    end

    it("gh_12: keeps one sweep timer per store however often it is opened", function()
      local timer_c = require "osara.timer_c"
      local real, made = timer_c.new, 0
      timer_c.new = function(...) made = made + 1 return real(...) end
      local dir = H.tmpdir() .. "/data"
      local ok, err = pcall(function()
        for _ = 1, 50 do osara.store("swept", { memory = kind == "memory", dir = dir }) end
        osara.store("swept-other", { memory = kind == "memory", dir = dir })
      end)
      timer_c.new = real
      assert(ok, err)
      assert.are.equal(2, made)
    end)

    it("sets, gets, deletes and checks keys", function()
      local db = mk("crud")
      assert.is_nil(db:get("a"))
      db:set("a", { n = 1, tags = { "x" } })
      assert.are.same({ n = 1, tags = { "x" } }, db:get("a"))
      assert.is_true(db:has("a"))
      db:delete("a")
      assert.is_false(db:has("a"))
    end)

    it("iterates a prefix in key order and counts and clears it", function()
      local db = mk("iter")
      for _, k in ipairs { "user:3", "user:1", "order:1", "user:2", "zz" } do db:set(k, k) end
      local keys = {}
      for k, v in db:pairs("user:") do keys[#keys + 1] = k .. "=" .. v end
      assert.are.same({ "user:1=user:1", "user:2=user:2", "user:3=user:3" }, keys)
      assert.are.equal(3, db:count("user:"))
      assert.are.equal(3, db:clear("user:"))
      assert.are.equal(0, db:count("user:"))
      assert.are.equal(2, db:count(""))
    end)

    it("iterates more keys than one batch", function()
      local db = mk("many")
      local m = {}
      for i = 1, 700 do m[("k%04d"):format(i)] = i end
      db:set_many(m)
      local n, last = 0, ""
      for k in db:pairs("k") do
        assert.is_true(k > last)
        last = k
        n = n + 1
      end
      assert.are.equal(700, n)
      assert.are.same({ k0001 = 1, k0700 = 700 }, db:get_many { "k0001", "k0700", "nope" })
    end)

    it("hides expired keys at once", function()
      local db = mk("ttl")
      db:set("short", 1, { ttl = 0.3 }) -- room for a slow (sanitized) set and get
      db:set("long", 2, { ttl = 60 })
      assert.are.equal(1, db:get("short"))
      osara.sleep(0.35)
      assert.is_nil(db:get("short"))
      assert.are.equal(1, db:count(""))
    end)

    it("commits a transaction at the end and rolls back on error", function()
      local db = mk("tx")
      db:set("balance", 10)
      local r = db:transaction(function(tx)
        tx:set("balance", tx:get("balance") - 3)
        assert.are.equal(7, tx:get("balance"))      -- reads its own writes
        assert.are.equal(10, db:get("balance"))     -- others see the committed value
        return "done"
      end)
      assert.are.equal("done", r)
      assert.are.equal(7, db:get("balance"))
      local ok, err = db:transaction(function(tx)
        tx:set("balance", 0)
        error("changed my mind")
      end)
      assert.is_nil(ok)
      assert.matches("changed my mind", err)
      assert.are.equal(7, db:get("balance"))
    end)

    it("serialises transactions on the same key while others proceed", function()
      local db = mk("lock")
      db:set("counter", 0)
      local done = 0
      for _ = 1, 20 do
        osara.spawn(function()
          db:transaction("counter", function(tx)
            local v = tx:get("counter")
            osara.sleep(0.001)                         -- yield inside the transaction
            tx:set("counter", v + 1)
          end)
          done = done + 1
        end)
      end
      H.eventually(function() return done == 20 end, 5)
      assert.are.equal(20, db:get("counter"))
    end)

    it("gh_13_tx_isolation refuses a transaction that read a key another one changed since", function()
      local db = mk("isolated")
      db:set("k", 1)
      local a, b, blind = db:begin(), db:begin(), db:begin()
      a:set("k", a:get("k") + 1)
      b:set("k", b:get("k") + 10)
      blind:set("k", 100) -- wrote without reading: nothing to check
      assert.is_true(db:commit(a))
      assert.are.same({ nil, require("osara.store").CONFLICT }, { db:commit(b) })
      assert.are.equal(2, db:get("k"))
      assert.is_true(db:commit(blind))
      assert.are.equal(100, db:get("k"))
    end)

    it("feeds committed changes to watchers, not rolled-back ones", function()
      local db = mk("watch")
      local seen = {}
      local w = db:watch("x:")
      osara.spawn(function()
        for k, v in w do seen[#seen + 1] = k .. "=" .. tostring(v) end
      end)
      db:set("x:1", "a")
      db:set("y:1", "ignored")
      db:transaction(function(tx) tx:set("x:2", "b") error("no") end)
      db:transaction(function(tx) tx:set("x:3", "c") end)
      db:delete("x:1")
      H.eventually(function() return #seen == 3 end, 2)
      assert.are.same({ "x:1=a", "x:3=c", "x:1=nil" }, seen)
      w:close()
    end)

    it("rejects values the codec cannot encode and oversized keys", function()
      local db = mk("bad")
      assert.has_error(function() db:set("f", function() end) end)
      if kind == "lmdb" then
        assert.has_error(function() db:set(string.rep("k", 600), 1) end)
      end
      assert.has_error(function() db:set("", 1) end)
    end)
  end)
end

describe("osara.store on disk", function()
  after_each(H.cleanup)

  it("grows the map instead of failing when it fills", function()
    local db = open("big")
    local blob = string.rep("x", 1024 * 1024)
    for i = 1, 80 do db:set("blob" .. i, blob) end -- 80 MiB > the 64 MiB initial map
    assert.are.equal(80, db:count("blob"))
    assert.is_true(osara.metrics.value("osara_store_map_grows_total") >= 1)
  end)

  it("says what is wrong with a foreign file in the data folder", function()
    local dir = H.tmpdir() .. "/data"
    os.execute("mkdir -p " .. dir)
    local f = io.open(dir .. "/data.mdb", "w")
    f:write(string.rep("not an lmdb file ", 1000))
    f:close()
    local ok, err = pcall(osara.store, "x", { dir = dir })
    assert.is_false(ok)
    assert.matches("store: cannot open .*data", err)
  end)
end)

describe("osara.cached", function()
  it("pulls once, then serves from the cache until dirty", function()
    local pulls = 0
    local c = osara.cached { key = function(id) return "user:" .. id end, ttl = 60,
                             pull = function(id) pulls = pulls + 1 return { id = id } end }
    assert.are.same({ id = 1 }, c:get(1))
    assert.are.same({ id = 1 }, c:get(1))
    assert.are.equal(1, pulls)
    c:dirty(1)
    c:get(1)
    assert.are.equal(2, pulls)
  end)

  it("pulls only the misses of a multi-get", function()
    local asked
    local c = osara.cached { name = "multi", key = function(id) return "p:" .. id end,
                             pull = function(id) return id * 10 end }
    c:get(2)
    local got = c:get_many({ 1, 2, 3 }, function(missing)
      asked = missing
      local out = {}
      for _, id in ipairs(missing) do out[id] = id * 10 end
      return out
    end)
    assert.are.same({ 1, 3 }, asked)
    assert.are.same({ [1] = 10, [2] = 20, [3] = 30 }, got)
  end)
end)
