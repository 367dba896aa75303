-- osara.config: YAML typed as kata's PyYAML reads it, environment overrides,
-- and one clear line for a malformed file.
local config = require "osara.config"
local yaml = require "osara.yaml_c"

describe("osara.config YAML", function()
  it("reads kata's config.yaml example as written", function()
    local data = config.parse([[
database:
  name: kata
  host: localhost
  password: secret
  pool_size: 10
  port: 5432
  user: kata
cache:
  memcached:
    type: memcached
    prefix: app_
    hosts:
      - 'localhost:11211'
      - 'localhost:11212'
  memory:
    type: memory
  redis:
    type: redis
    db: 0
    host: 'localhost:6379'
    prefix: app_
]], "config.yaml", {})
    assert.are.same({ name = "kata", host = "localhost", password = "secret", pool_size = 10,
                      port = 5432, user = "kata" }, data.database)
    assert.are.same({ "localhost:11211", "localhost:11212" }, data.cache.memcached.hosts)
    assert.are.same({ type = "memory" }, data.cache.memory)
    assert.are.equal(0, data.cache.redis.db)
  end)

  it("types plain scalars as YAML 1.1 and keeps quoted ones strings", function()
    local v = yaml.load([[
a: 12
b: -3.5
c: 0x1F
d: 0o17
e: yes
f: off
g: ~
h: "12"
i: 'true'
j: .inf
k: !!str 42
l: 1e3
m: hello world
n: 1_000
]], "t.yaml")
    assert.are.same({ a = 12, b = -3.5, c = 31, d = 15, e = true, f = false, h = "12", i = "true",
                      j = math.huge, k = "42", l = 1000, m = "hello world", n = 1000 }, v)
  end)

  it("resolves anchors, aliases and merge keys", function()
    local v = yaml.load([[
base: &base { host: h, port: 1 }
dev:
  <<: *base
  port: 2
list: [*base]
]], "t.yaml")
    assert.are.same({ host = "h", port = 2 }, v.dev)
    assert.are.equal("h", v.list[1].host)
  end)

  it("names file:line:column of a malformed file in one line", function()
    local ok, err = pcall(config.parse, "cache:\n  redis:\n    host: [a, b\n  x: 1\n", "/srv/app/config.yaml", {})
    assert.is_false(ok)
    assert.matches("^/srv/app/config%.yaml:%d+:%d+: ", err)
    assert.is_nil(err:find("\n"))
    local _, err2 = yaml.load("a: 1\n b: 2\n", "c.yaml")
    assert.are.equal("c.yaml:2:3: mapping values are not allowed in this context", err2)
  end)

  it("refuses a file whose top is not a mapping", function()
    local ok, err = pcall(config.parse, "- a\n- b\n", "c.yaml", {})
    assert.is_false(ok)
    assert.matches("c.yaml:1:1: the top of a config file must be a mapping", err, 1, true)
  end)

  it("reads an empty file as an empty config", function()
    assert.are.same({}, config.parse("", "c.yaml", {}))
    assert.are.same({}, config.parse("# nothing\n", "c.yaml", {}))
  end)
end)

describe("osara.config environment overrides", function()
  it("sets nested keys with double underscores, typed like YAML scalars", function()
    local data = config.parse("database:\n  host: localhost\n  port: 5432\n", "c.yaml", {
      OSARA__DATABASE__HOST = "db.internal",
      OSARA__DATABASE__PORT = "6543",
      OSARA__CACHE__REDIS__DB = "2",
      OSARA__CACHE__MEMCACHED__HOSTS = "[a:1, b:2]",
      OSARA__DEBUG = "true",
      OSARA__NAME = "",
      OTHER__X = "ignored",
    })
    assert.are.equal("db.internal", data.database.host)
    assert.are.equal(6543, data.database.port)
    assert.are.equal(2, data.cache.redis.db)
    assert.are.same({ "a:1", "b:2" }, data.cache.memcached.hosts)
    assert.is_true(data.debug)
    assert.are.equal("", data.name)
    assert.is_nil(data.other)
  end)

  it("matches existing keys whatever their case, and keeps unparsable values as strings", function()
    local data = config.parse("Cache:\n  Redis: { host: a }\n", "c.yaml", {
      OSARA__CACHE__REDIS__HOST = "b:6379",
      OSARA__CACHE__REDIS__PASSWORD = "p@ss: [x",
    })
    assert.are.equal("b:6379", data.Cache.Redis.host)
    assert.are.equal("p@ss: [x", data.Cache.Redis.password)
  end)
end)
