-- osara.cache against real servers: Debian's redis-server and memcached on
-- free loopback ports, stopped with their exit status checked. Each cache
-- type through the one interface, the containers (only misses pulled,
-- single flight), servers that go down, and caches named in config.yaml.
local osara = require "osara"
local H = require "spec.helpers.host"
local T = require "spec.helpers.http"
local R = require "spec.helpers.redis"
local MC = require "spec.helpers.memcached"
local cjson = require "cjson"

local redis, mc1, mc2

-- The store keeps its data between runs: every run takes its own keys.
local run = ("%d%d:"):format(os.time(), math.random(1e6))

local function options_of(kind, prefix)
  prefix = run .. (prefix or "spec:")
  if kind == "memory" then return { type = "memory", prefix = prefix } end
  if kind == "store" then return { type = "store", name = "cache_spec", prefix = prefix } end
  if kind == "redis" then return { type = "redis", host = redis.addr, prefix = prefix } end
  return { type = "memcached", hosts = { mc1.addr, mc2.addr }, prefix = prefix }
end

-- Runs fn in n tasks at once; returns their results once all finished.
local function concurrently(n, fn)
  local results, done = {}, 0
  for i = 1, n do
    osara.spawn(function()
      results[i] = fn(i)
      done = done + 1
    end)
  end
  H.eventually(function() return done == n end, 10, n .. " tasks")
  return results
end

describe("osara.cache", function()
  setup(function()
    redis, mc1, mc2 = R.start(), MC.start(), MC.start()
  end)
  teardown(function()
    redis.stop()
    mc1.stop()
    mc2.stop()
    H.cleanup()
  end)

  for _, kind in ipairs { "memory", "store", "redis", "memcached" } do
    describe(kind, function()
      it("gets, sets and deletes through the one interface", function()
        local c = osara.cache(options_of(kind))
        assert.is_nil(c:get("nothing"))
        assert.is_true(c:set("user:1", { name = "ada", langs = { "lua", "c" } }))
        assert.are.same({ name = "ada", langs = { "lua", "c" } }, c:get("user:1"))
        assert.is_true(c:set_multi({ ["user:2"] = { name = "bob" }, ["n"] = 42, ["s"] = "text" }))
        assert.are.same({ ["user:1"] = { name = "ada", langs = { "lua", "c" } }, ["user:2"] = { name = "bob" },
                          n = 42, s = "text" },
                        c:get_multi({ "user:1", "user:2", "n", "s", "absent" }))
        assert.is_true(c:delete("n"))
        assert.is_true(c:delete_multi({ "user:1", "s", "absent" }))
        assert.are.same({ ["user:2"] = { name = "bob" } }, c:get_multi({ "user:1", "user:2", "n", "s" }))
      end)

      it("lets values expire", function()
        local c = osara.cache(options_of(kind))
        assert.is_true(c:set("short", 1, 1))
        assert.is_true(c:set_multi({ short2 = 2 }, 1))
        assert.is_true(c:set("long", 3, 60))
        assert.are.equal(1, c:get("short"))
        H.eventually(function() return c:get("short") == nil and c:get("short2") == nil end, 5, "expiry")
        assert.are.equal(3, c:get("long"))
      end)

      it("keeps caches with different prefixes apart, and takes a codec", function()
        local a = osara.cache(options_of(kind, "a:"))
        local b = osara.cache(options_of(kind, "b:"))
        local opts = options_of(kind, "mp:")
        opts.codec = "msgpack"
        local m = osara.cache(opts)
        a:set("k", "from a")
        assert.is_nil(b:get("k"))
        assert.is_true(m:set("k", { 1, 2, { x = true } }))
        assert.are.same({ 1, 2, { x = true } }, m:get("k"))
        assert.are.equal("from a", a:get("k"))
      end)

      it("makes one pull for concurrent cold gets of a key (single flight)", function()
        local pulls = 0
        local c = osara.cached { cache = osara.cache(options_of(kind, "sf" .. kind .. ":")), expire = 60,
          pull = function(id)
            pulls = pulls + 1
            osara.sleep(0.05) -- the others arrive while this pull runs
            return { id = id }
          end }
        local got = concurrently(3, function() return c:get(7) end)
        assert.are.equal(1, pulls)
        for i = 1, 3 do assert.are.same({ id = 7 }, got[i]) end
        assert.are.same({ id = 7 }, c:get(7))
        assert.are.equal(1, pulls)
      end)
    end)
  end

  it("spreads memcached keys over its hosts by consistent hashing", function()
    local both = osara.cache { type = "memcached", hosts = { mc1.addr, mc2.addr }, prefix = "spread:" }
    local one = osara.cache { type = "memcached", hosts = { mc1.addr }, prefix = "spread:" }
    local two = osara.cache { type = "memcached", hosts = { mc2.addr }, prefix = "spread:" }
    local map, keys = {}, {}
    for i = 1, 100 do
      keys[i] = "k" .. i
      map[keys[i]] = i
    end
    assert.is_true(both:set_multi(map))
    local n1, n2 = 0, 0
    for _ in pairs(one:get_multi(keys)) do n1 = n1 + 1 end
    for _ in pairs(two:get_multi(keys)) do n2 = n2 + 1 end
    assert.are.equal(100, n1 + n2)
    assert.is_true(n1 > 20 and n2 > 20, ("%d / %d"):format(n1, n2))
  end)

  it("raises on misuse, naming the option and the caller's line", function()
    local ok, err = pcall(osara.cache, { type = "redis", hots = "x" })
    assert.is_false(ok)
    assert.matches("cache_spec.lua:%d+: unknown option 'hots' in osara.cache %(did you mean 'hosts'%?%)", err)
    ok, err = pcall(osara.cache, { type = "memcached", db = 1, hosts = { "127.0.0.1:1" } })
    assert.matches("option 'db' in osara.cache does not apply to type 'memcached'", err, 1, true)
    ok, err = pcall(osara.cache, { type = "disk" })
    assert.matches("option 'type' in osara.cache must be one of", err, 1, true)
    local c = osara.cache { type = "memory" }
    ok, err = pcall(c.set, c, {}, 1)
    assert.matches("keys are non-empty strings", err, 1, true)
    ok, err = pcall(c.set, c, "k", function() end)
    assert.matches("cannot encode the value of 'k'", err, 1, true)
  end)

  it("keeps a waiting call safe through full garbage collections", function()
    local collections = 0
    local gc = osara.every(0.001, function()
      collectgarbage("collect")
      collections = collections + 1
    end)
    local ok, err = pcall(function()
      -- BLPOP holds the reply 50 ms: the cache object and its client
      -- handle are garbage while the call waits.
      local before = collections
      assert.is_nil(osara.cache(options_of("redis")).b.c:call { "BLPOP", "nothing", "0.05" })
      assert.is_true(collections > before, "no collection ran during the wait")
      -- 2000 keys keep memcached's thread busy for a while
      local map, keys = {}, {}
      for i = 1, 2000 do
        keys[i] = "gc" .. i
        map[keys[i]] = i
      end
      before = collections
      assert.is_true(osara.cache(options_of("memcached")):set_multi(map))
      local got, gerr = osara.cache(options_of("memcached")):get_multi(keys)
      local n = 0
      for _ in pairs(got) do n = n + 1 end
      assert.are.equal(2000, n, tostring(gerr))
      assert.is_true(collections > before, "no collection ran during the waits")
    end)
    gc:cancel()
    assert(ok, err)
  end)

  describe("osara.cached over a cache (kata's Attribute)", function()
    it("does one get_multi, pulls only the misses, returns values in the order asked", function()
      local asked = {}
      local users = osara.cached { cache = osara.cache(options_of("redis", "attr:")), expire = 60,
        key = function(id) return "user:" .. id end,
        pull_many = function(ids)
          asked[#asked + 1] = ids
          local out = {}
          for _, id in ipairs(ids) do
            if id ~= 404 then out[id] = { id = id } end
          end
          return out
        end }
      assert.are.same({ { id = 2 } }, users:get { 2 })
      local got = users:get { 3, 1, 2, 404 }
      assert.are.same({ { id = 3 }, { id = 1 }, { id = 2 } }, got)
      assert.is_nil(got[4])
      assert.are.same({ { 2 }, { 3, 1, 404 } }, asked)
      assert.are.equal(4, users.pulls)
      users:get { 1, 2, 3 }
      assert.are.equal(2, #asked) -- all hits
      users:dirty { 1, 3 }
      users:get { 1, 2, 3 }
      assert.are.same({ 1, 3 }, asked[3])
    end)

    it("lets concurrent cold multi-gets pull each item once", function()
      local pulled = {}
      local c = osara.cached { cache = osara.cache(options_of("memcached", "attr2:")),
        pull_many = function(ids)
          osara.sleep(0.05)
          for _, id in ipairs(ids) do pulled[id] = (pulled[id] or 0) + 1 end
          local out = {}
          for _, id in ipairs(ids) do out[id] = id * 10 end
          return out
        end }
      local got = concurrently(3, function(i) return c:get { 1, 2, 2 + i } end)
      assert.are.same({ 10, 20, 30 }, got[1])
      assert.are.same({ 10, 20, 50 }, got[3])
      assert.are.same({ 1, 1, 1, 1, 1 }, pulled)
    end)

    it("pulls through a table's get_in with attribute = { Table, column }", function()
      local calls = {}
      local Foo = { get_in = function(self, col, values)
        calls[#calls + 1] = { col, values }
        local rows = {}
        for _, v in ipairs(values) do rows[#rows + 1] = { id = v, name = "n" .. v } end
        return rows
      end }
      local c = osara.cached { cache = osara.cache(options_of("memory")), attribute = { Foo, "id" },
                               key = function(id) return "foo:" .. id end }
      assert.are.same({ { id = 1, name = "n1" }, { id = 2, name = "n2" } }, c:get { 1, 2 })
      c:get { 2, 3 }
      assert.are.same({ { "id", { 1, 2 } }, { "id", { 3 } } }, calls)
    end)
  end)
end)

describe("a cache server that is down", function()
  after_each(H.cleanup)

  it("makes gets miss and sets fail in the log once, never an error in the handler", function()
    local r, m = R.start(), MC.start()
    local dir = H.tmpdir()
    local p, port = T.app(dir, ([[
local osara = require "osara"
local caches = {
  redis = osara.cache { type = "redis", host = %q, prefix = "down:", timeout = 0.5 },
  memcached = osara.cache { type = "memcached", hosts = { %q }, prefix = "down:", timeout = 0.5 },
}
osara.route("GET", "/{kind}/{key}", function(req, kind, key)
  local c = caches[kind]
  local before = c:get(key)
  local ok, err = c:set(key, { v = key })
  return { before = before, set = ok or false, err = err, after = c:get(key) }
end)
]]):format(r.addr, m.addr))
    local function hit(kind, key)
      local status, _, body = T.curl { ("http://127.0.0.1:%d/%s/%s"):format(port, kind, key) }
      assert.are.equal(200, status, body)
      return cjson.decode(body)
    end
    for _, kind in ipairs { "redis", "memcached" } do
      local b = hit(kind, "a")
      assert.is_true(b.set)
      assert.are.same({ v = "a" }, b.after)
    end
    local rport = r.port
    r.stop()
    m.stop()
    for i = 1, 5 do
      for _, kind in ipairs { "redis", "memcached" } do
        local b = hit(kind, "a" .. i)
        assert.is_false(b.set)
        assert.is_nil(b.before)
        assert.is_nil(b.after)
        assert.is_string(b.err)
      end
    end
    local _, _, metrics = T.curl { ("http://127.0.0.1:%d/metrics"):format(port) }
    local redis_sets = tonumber(metrics:match('osara_cache_errors_total{op="set",type="redis"} (%d+)'))
    local mc_sets = tonumber(metrics:match('osara_cache_errors_total{op="set",type="memcached"} (%d+)'))
    assert.are.equal(5, redis_sets, metrics)
    assert.are.equal(5, mc_sets, metrics)
    local _, fails = p:output():gsub("cache redis [^\n]* failing", "")
    assert.are.equal(1, fails, p:output())
    _, fails = p:output():gsub("cache memcached [^\n]* failing", "")
    assert.are.equal(1, fails, p:output())

    -- Back on the same port: the next calls after the retry pause work again.
    r = R.start(rport)
    H.eventually(function() return hit("redis", "back").set end, 10, "redis back")
    H.expect(p, "cache redis 127.0.0.1:" .. rport .. " answers again", 5)
    H.stop(p)
    r.stop()
  end)
end)

describe("a cache server that accepts but never answers", function()
  after_each(H.cleanup)

  it("costs a call its timeout, then a miss or a failed set", function()
    -- listens (the kernel completes connections) and never reads or writes
    local mute = H.child({ "/usr/bin/python3", "-c", "import socket, time\n"
      .. "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(16)\n"
      .. "print(s.getsockname()[1], flush=True); time.sleep(60)" }, { status = false })
    local addr = "127.0.0.1:" .. assert(tonumber(mute:line(10)))
    for _, opts in ipairs { { type = "redis", host = addr, timeout = 0.3 },
                            { type = "memcached", hosts = { addr }, timeout = 0.3 } } do
      local c = osara.cache(opts)
      local t0 = osara.monotonic()
      local v, err = c:get("k")
      local took = osara.monotonic() - t0
      assert.is_nil(v)
      assert.matches("^" .. opts.type .. " 127%.0%.0%.1:%d+: ", err)
      assert.is_true(took >= 0.25 and took < 2, opts.type .. " get took " .. took .. " s")
      local ok, serr = c:set("k", 1)
      assert.is_nil(ok)
      assert.is_string(serr)
    end
    mute:kill("KILL")
  end)
end)

describe("caches named in config.yaml", function()
  after_each(H.cleanup)

  it("builds kata's three caches from one file, with environment overrides", function()
    local r, m1, m2 = R.start(), MC.start(), MC.start()
    local dir = H.tmpdir()
    H.write(dir .. "/config.yaml", ([[
cache:
  memcached:
    type: memcached
    prefix: kata_
    hosts:
      - '%s'
      - '%s'
  memory:
    type: memory
  redis:
    type: redis
    db: 0
    host: 'localhost:1'
    prefix: kata_
]]):format(m1.addr, m2.addr))
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
osara.route("GET", "/{name}", function(req, name)
  local c = osara.cache(name)
  assert(c == osara.cache(name), "one cache per name")
  local ok, err = c:set("k", { from = name })
  return { ok = ok or false, err = err, got = c:get("k"), db = osara.config.cache.redis.db }
end)
]])
    local p = H.osara({ "run", "--http", "127.0.0.1:0", dir .. "/app.lua" },
                      { OSARA__CACHE__REDIS__HOST = r.addr, OSARA__CACHE__REDIS__DB = "3" })
    local port = T.listening(p)
    for _, name in ipairs { "memcached", "memory", "redis" } do
      local status, _, body = T.curl { ("http://127.0.0.1:%d/%s"):format(port, name) }
      assert.are.equal(200, status, body)
      local b = cjson.decode(body)
      assert.is_true(b.ok, body)
      assert.are.same({ from = name }, b.got)
      assert.are.equal(3, b.db)
    end
    -- db 3 from the environment: the value is in redis database 3
    local cli = H.child { "redis-cli", "-p", tostring(r.port), "-n", "3", "GET", "kata_k" }
    H.finish(cli)
    assert.matches('{"from":"redis"}', cli:output(), 1, true)
    H.stop(p)
    r.stop()
    m1.stop()
    m2.stop()
  end)

  it("is read again when the script reloads (and --watch watches it)", function()
    local dir = H.tmpdir()
    H.write(dir .. "/config.yaml", "greeting: hello\n")
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
osara.route("GET", "/greeting", function() return { text = osara.config.greeting } end)
]])
    local p = H.osara { "run", "--watch", "--http", "127.0.0.1:0", dir .. "/app.lua" }
    local port = T.listening(p)
    local function greeting()
      local _, _, body = T.curl { ("http://127.0.0.1:%d/greeting"):format(port) }
      return cjson.decode(body).text
    end
    assert.are.equal("hello", greeting())
    H.write(dir .. "/config.yaml", "greeting: bonjour\n")
    H.expect(p, "reloaded", 10)
    assert.are.equal("bonjour", greeting())
    H.stop(p)
  end)

  it("gives osara.kafka and osara.nats their settings by name", function()
    local dir = H.tmpdir()
    H.write(dir .. "/config.yaml", "kafka:\n  main:\n    bootstrap.servers: embedded\n    group.id: by-name\n"
      .. "nats:\n  bus:\n    servers: nats://127.0.0.1:4222\n")
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local kafka = osara.kafka "main"
local nats = osara.nats "bus"
kafka:handle("orders", function(msg) end)
nats:handle("prices", function(msg) end)
]])
    local status, out = H.run({ "check", dir .. "/app.lua" })
    assert.are.equal(0, status, out)
    assert.matches("orders", out, 1, true)
    assert.matches("prices", out, 1, true)
    H.write(dir .. "/app.lua", 'local osara = require "osara"\nlocal k = osara.kafka "nope"\n')
    status, out = H.run({ "check", dir .. "/app.lua" }, 20, nil, { errors = { "no 'kafka.nope'" } })
    assert.are.equal(1, status, out)
    assert.matches("app.lua:2: osara.kafka: no 'kafka.nope' in " .. dir .. "/config.yaml", out, 1, true)
  end)

  it("reports a malformed config file in one line with file:line:column", function()
    local dir = H.tmpdir()
    H.write(dir .. "/config.yaml", "cache:\n  redis:\n    host: 'a\n  memory: {\n")
    H.write(dir .. "/app.lua", 'local osara = require "osara"\nlocal c = osara.cache "memory"\n')
    local status, out = H.run({ "check", dir .. "/app.lua" }, 20, nil, { errors = { "config%.yaml:%d+:%d+: " } })
    assert.are.equal(1, status, out)
    local line = out:match("[^\n]*config%.yaml:[^\n]*")
    assert.truthy(line, out)
    assert.truthy(line:find(dir .. "/config.yaml:5:1: found unexpected end of stream while scanning "
                            .. "a quoted scalar at line 3, column 11", 1, true), out)
  end)

  it("reads the file named by --config, and names a missing section", function()
    local dir = H.tmpdir()
    H.write(dir .. "/other.yaml", "cache:\n  local:\n    type: memory\n")
    H.write(dir .. "/app.lua", 'local osara = require "osara"\nlocal c = osara.cache "local"\nlocal d = osara.cache "nope"\n')
    local status, out = H.run({ "check", "--config", dir .. "/other.yaml", dir .. "/app.lua" }, 20, nil,
                              { errors = { "no 'cache.nope'" } })
    assert.are.equal(1, status, out)
    assert.matches("app.lua:3: osara.cache: no 'cache.nope' in " .. dir .. "/other.yaml", out, 1, true)
  end)
end)
