-- Runs examples/kata/ (kata's project, ported) against real servers:
-- Debian's PostgreSQL, redis-server and two memcached, each on a free
-- loopback port, pointed at by environment overrides of config.yaml.
local osara = require "osara"
local H = require "spec.helpers.host"
local T = require "spec.helpers.http"
local P = require "spec.helpers.postgres"
local R = require "spec.helpers.redis"
local MC = require "spec.helpers.memcached"
local cjson = require "cjson"
local msgpack = osara.codec.get("msgpack")

-- What a memcached server holds under key (nil if nothing).
local function memcached_get(server, key)
  local p = H.child({ "bash", "-c", ("exec 3<>/dev/tcp/127.0.0.1/%d; printf 'get %s\\r\\nquit\\r\\n' >&3; cat <&3")
                      :format(server.port, key) })
  H.finish(p, { timeout = 10 })
  return p:output():match("VALUE [^\r\n]+\r\n([^\r\n]*)")
end

local function redis_get(server, key)
  local p = H.child { "redis-cli", "-p", tostring(server.port), "GET", key }
  H.finish(p, { timeout = 10 })
  local v = p:output():gsub("%s+$", "")
  return v ~= "" and v or nil
end

describe("examples/kata", function()
  local pg, redis, mc1, mc2
  setup(function()
    pg = P.start()
    pg:psql("CREATE ROLE kata LOGIN PASSWORD 'kata'")
    pg:psql("CREATE DATABASE kata OWNER kata")
    redis, mc1, mc2 = R.start(), MC.start(), MC.start()
  end)
  teardown(function()
    redis.stop()
    mc1.stop()
    mc2.stop()
    pg:destroy()
    H.cleanup()
  end)

  local function start_app(dir)
    local p = H.osara({ "run", "--http", "127.0.0.1:0", "--data", dir, "examples/kata/app.lua" }, {
      OSARA__DATABASE__PORT = tostring(pg.port),
      OSARA__CACHE__REDIS__HOST = redis.addr,
      OSARA__CACHE__MEMCACHED__HOSTS = ("[%s, %s]"):format(mc1.addr, mc2.addr),
    })
    return p, T.listening(p)
  end

  it("serves resources in json, msgpack and html from PostgreSQL through both containers", function()
    local dir = H.tmpdir()
    local p, port = start_app(dir)
    H.expect(p, "kata: schema ready (2 migration(s) applied)", 20)
    local base = "http://127.0.0.1:" .. port

    -- kata's Bar resource in each format
    local s, h, b = T.curl { base .. "/foo/bar/123" }
    assert.are.equal(200, s)
    assert.are.same({ baz = "123", something = "else" }, cjson.decode(b))
    s, h, b = T.curl { base .. "/msgpack/foo/bar/123" }
    assert.matches("msgpack", h["content-type"])
    assert.are.same({ baz = "123", something = "else" }, msgpack.decode(b))
    s, _, b = T.curl { "-H", "Content-Type: application/msgpack", "--data-binary",
                       msgpack.encode({ qty = 2 }), base .. "/foo/bar/7" }
    assert.are.equal(201, s, b)
    assert.are.same({ baz = "7", body = { qty = 2 } }, cjson.decode(b))

    -- rows through the table helper
    s, _, b = T.curl { "-H", "Content-Type: application/json", "-d",
                       '[{"name":"ada","score":3},{"name":"bob","score":5},{"name":"cy","score":1}]', base .. "/users" }
    assert.are.equal(201, s, b)
    local created = cjson.decode(b).users
    assert.are.equal(3, #created)
    local ada, bob, cy = created[1].id, created[2].id, created[3].id

    -- the attribute container: the order asked, null where there is no row
    s, _, b = T.curl { ("%s/users?ids=%d,%d,%d,999"):format(base, cy, ada, bob) }
    assert.are.equal(200, s, b)
    local got = cjson.decode(b)
    assert.are.same({ "cy", "ada", "bob" }, { got.users[1].name, got.users[2].name, got.users[3].name })
    assert.are.equal(cjson.null, got.users[4])
    assert.are.equal(3, got.total)
    -- each user is now in memcached (kata_ prefix, on one of the two hosts)
    for _, id in ipairs { ada, bob, cy } do
      local v = memcached_get(mc1, "kata_user:" .. id) or memcached_get(mc2, "kata_user:" .. id)
      assert.truthy(v, "user " .. id .. " not in memcached")
    end

    -- the simple container: json, msgpack and html from redis
    s, _, b = T.curl { base .. "/users/" .. ada }
    assert.are.equal("ada", cjson.decode(b).name)
    assert.are.equal("ada", cjson.decode(redis_get(redis, "kata_user:" .. ada)).name)
    s, _, b = T.curl { base .. "/msgpack/users/" .. bob }
    assert.are.equal("bob", msgpack.decode(b).name)
    s, h, b = T.curl { base .. "/html/users/" .. cy }
    assert.matches("text/html", h["content-type"])
    assert.are.equal("<h1>cy</h1><p>score 1</p>", b)
    assert.are.equal(404, (T.curl { base .. "/users/999" }))

    -- an update dirties both containers: nothing stale is served
    s, _, b = T.curl { "-X", "PUT", "-H", "Content-Type: application/json", "-d", '{"name":"ada lovelace"}',
                       base .. "/users/" .. ada }
    assert.are.equal(200, s, b)
    assert.are.equal("ada lovelace", cjson.decode(b).name)
    _, _, b = T.curl { ("%s/users?ids=%d"):format(base, ada) }
    assert.are.equal("ada lovelace", cjson.decode(b).users[1].name)
    H.stop(p)

    -- a second start applies no migration again
    local p2 = start_app(dir)
    H.expect(p2, "kata: schema ready (0 migration(s) applied)", 20)
    H.stop(p2)
  end)
end)
