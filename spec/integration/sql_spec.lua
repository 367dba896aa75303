-- osara.sql against a real PostgreSQL (spec/helpers/postgres.lua starts
-- Debian's in a temporary folder) and the real binary: types, the pool,
-- a server that goes away, a slow query that must not stall HTTP, kill -9
-- inside a transaction, migrations from the command line.
local osara = require "osara"
local H = require "spec.helpers.host"
local T = require "spec.helpers.http"
local P = require "spec.helpers.postgres"
local cjson = require "cjson"

local null = osara.null

-- Errors the specs cause on purpose (the server logs them).
local EXPECTED_LOG = {
  'relation "missing" does not exist',
  "duplicate key value violates unique constraint",
  "terminating connection due to administrator command",
  "canceling statement due to user request",
  "could not receive data from client",
  "unexpected EOF on client connection",
  "syntax error at or near",
  'relation "nope" does not exist',
  "current transaction is aborted",
  "the database system is shutting down", -- the pools reconnecting meanwhile
  "the database system is starting up",
  "cached plan must not change result type", -- replanned, on purpose
}

local APP = [[
local osara = require "osara"
local db = osara.sql() -- OSARA_SQL_URL names the postgres server
osara.route("GET", "/fast", function() return { ok = true } end)
osara.route("GET", "/slow", function()
  local rows, err = db:query("SELECT pg_sleep(1)::text AS s, 7 AS n")
  if not rows then return 503, { err = err } end
  return { n = rows[1].n }
end)
osara.route("GET", "/one", function()
  local rows, err = db:query("SELECT 1 AS n")
  if not rows then return 503, { err = err } end
  return { n = rows[1].n, driver = db.driver }
end)
osara.route("POST", "/tx", function()
  return db:tx(function(tx)
    assert(tx:exec("INSERT INTO killed (v) VALUES ('first')"))
    osara.log.info("tx: first row written")
    osara.sleep(30)
    assert(tx:exec("INSERT INTO killed (v) VALUES ('second')"))
    return { ok = true }
  end)
end)
]]

describe("osara.sql (postgres)", function()
  local pg, db
  setup(function()
    pg = P.start()
    db = osara.sql(pg.url)
  end)
  teardown(function()
    if pg then pg:destroy { allow = EXPECTED_LOG } end
    H.cleanup()
  end)

  it("round-trips every column type with the documented Lua types", function()
    assert(db:exec([[CREATE TABLE types (
      i2 smallint, i4 integer, i8 bigint, big bigint, f4 real, f8 double precision,
      num numeric, ok boolean, t text, vc varchar(10), bin bytea, d date,
      ts timestamptz, j json, jb jsonb, u uuid, arr integer[], nul text)]]))
    assert(db:exec([[INSERT INTO types VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
      $11, $12, $13, $14, $15, $16, $17, $18)]],
      -32768, 2147483647, -(2 ^ 53), "9223372036854775807", 1.5, 0.1,
      "12345678901234567890.123", true, "héllo", "short", "a\0b\255", "2024-02-29",
      "2024-01-02 03:04:05+00", '{"a":1}', '{"b": [1, 2]}', "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
      "{1,2,3}", null))
    local row = assert(db:query("SELECT * FROM types"))[1]
    assert.are.same({
      i2 = -32768, i4 = 2147483647, i8 = -(2 ^ 53), big = "9223372036854775807", f4 = 1.5, f8 = 0.1,
      num = "12345678901234567890.123", ok = true, t = "héllo", vc = "short", bin = "a\0b\255",
      d = "2024-02-29", ts = "2024-01-02 03:04:05+00", j = '{"a":1}', jb = '{"b": [1, 2]}',
      u = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", arr = "{1,2,3}", nul = null,
    }, row)
  end)

  it("returns affected rows, RETURNING ids, and nil, err, sqlstate", function()
    assert(db:exec("CREATE TABLE items (id serial PRIMARY KEY, name text UNIQUE)"))
    assert.are.same({ 1, 1 }, { db:exec("INSERT INTO items (name) VALUES ($1) RETURNING id", "a") })
    assert.are.same({ 1 }, { db:exec("INSERT INTO items (name) VALUES ($1)", "b") })
    assert.are.same({ 2 }, { db:exec("UPDATE items SET name = name || $1", "!") })
    local r, err, state = db:exec("INSERT INTO items (name) VALUES ($1)", "a!")
    assert.is_nil(r)
    assert.matches("^postgres: duplicate key value violates unique constraint", err)
    assert.are.equal("23505", state)
    r, err, state = db:query("SELECT * FROM missing")
    assert.are.same({ nil, 'postgres: relation "missing" does not exist', "42P01" }, { r, err, state })
  end)

  it("opens pool_min connections before the first query", function()
    local warm = osara.sql(pg.url, { pool_size = 3, pool_min = 2 })
    H.eventually(function() return warm:stats().idle == 2 end, 10, "two connections open")
    assert.are.equal(2, warm:stats().open)
    assert.has_error(function() osara.sql(pg.url, { pool_size = 1, pool_min = 2 }) end)
  end)

  it("connects by host name, resolved off the loop", function()
    local byname = osara.sql(pg.url:gsub("127%.0%.0%.1", "localhost"), { pool_size = 1 })
    assert.matches("^postgres://postgres@localhost:", byname.url)
    assert.are.same({ { n = 1 } }, byname:query("SELECT 1 AS n"))
  end)

  it("keeps injection attempts through values as data", function()
    assert(db:exec("CREATE TABLE notes (v text)"))
    local evil = "x'); DROP TABLE notes; --"
    assert(db:exec("INSERT INTO notes (v) VALUES ($1)", evil))
    assert.are.same({ { v = evil } }, db:query("SELECT v FROM notes WHERE v = $1", evil))
  end)

  it("prepares a statement once per connection", function()
    local one = osara.sql(pg.url, { pool_size = 1 })
    for i = 1, 3 do assert(one:query("SELECT $1::int + 1 AS n", i)) end
    local rows = assert(one:query("SELECT statement FROM pg_prepared_statements WHERE statement LIKE $1",
      "SELECT $1::int + 1%"))
    assert.are.equal(1, #rows)
  end)

  it("prepares again when a table changed under a cached statement", function()
    local one = osara.sql(pg.url, { pool_size = 1 })
    assert(one:exec("CREATE TABLE shifty (a int)"))
    assert(one:exec("INSERT INTO shifty VALUES (1)"))
    assert.are.same({ { a = 1 } }, one:query("SELECT * FROM shifty"))
    assert(one:exec("ALTER TABLE shifty ADD COLUMN b int"))
    assert.are.same({ { a = 1, b = null } }, one:query("SELECT * FROM shifty"))
    local r, err = one:tx(function(tx)
      assert(tx:query("SELECT * FROM shifty"))
      assert(tx:exec("ALTER TABLE shifty ADD COLUMN c int"))
      return tx:query("SELECT * FROM shifty") -- inside a transaction: fails once
    end)
    assert.is_nil(r)
    assert.matches("cached plan must not change result type", err)
    assert.are.same({ { a = 1, b = null } }, one:query("SELECT * FROM shifty")) -- rolled back, re-prepared
  end)

  it("commits, and rolls back on raise and on a failed statement", function()
    assert(db:exec("CREATE TABLE acc (id int PRIMARY KEY, n int)"))
    assert(db:tx(function(tx)
      assert(tx:exec("INSERT INTO acc VALUES (1, 10)"))
      assert(tx:exec("INSERT INTO acc VALUES (2, 20)"))
    end))
    assert.has_error(function()
      db:tx(function(tx)
        assert(tx:exec("UPDATE acc SET n = 0"))
        error("boom")
      end)
    end)
    local r, err = db:tx(function(tx)
      assert(tx:exec("UPDATE acc SET n = 0"))
      tx:exec("INSERT INTO acc VALUES (1, 1)") -- duplicate: aborts the transaction
      return "not committed"
    end)
    assert.is_nil(r)
    assert.matches("duplicate key", err)
    assert.are.same({ { n = 30 } }, db:query("SELECT sum(n)::int AS n FROM acc"))
  end)

  it("runs the table helper with identifiers checked against real columns", function()
    assert(db:exec("CREATE TABLE foo (id serial PRIMARY KEY, bar text, qux int)"))
    local Foo = db:table("foo")
    local made = assert(Foo:create { { bar = "baz", qux = 3 }, { bar = "corge", qux = 5 } })
    assert.are.same({ { id = 1, bar = "baz", qux = 3 }, { id = 2, bar = "corge", qux = 5 } }, made)
    assert.are.same({ made[1] }, Foo:get({ bar = "baz" }, { order_by = "qux", limit = 5 }))
    assert.are.equal(2, #Foo:get_in("bar", { "baz", "corge", "x" }))
    assert.are.equal(1, Foo:update({ bar = "b2" }, { where = { qux = 3 } }))
    assert.are.equal(1, Foo:delete { qux = 5 })
    assert.has_error(function() Foo:get { ['bar" = bar OR 1=1; --'] = 1 } end)
    assert.has_error(function() Foo:get({}, { order_by = "(SELECT 1)" }) end)
    assert.are.same({ { id = 1, bar = "b2", qux = 3 } }, Foo:get())
  end)

  it("fails with a clear error when the pool stays exhausted past pool_timeout", function()
    local small = osara.sql(pg.url, { pool_size = 2, pool_timeout = 0.3 })
    local finished = 0
    for _ = 1, 2 do
      osara.spawn(function()
        assert(small:query("SELECT pg_sleep(1)"))
        finished = finished + 1
      end)
    end
    H.eventually(function() return small:stats().idle == 0 and small:stats().open == 2 end, 5, "both busy")
    local t0 = osara.monotonic()
    local rows, err = small:query("SELECT 1")
    local waited = osara.monotonic() - t0
    assert.is_nil(rows)
    assert.matches("^sql: pool exhausted: no connection to postgres://postgres@127%.0%.0%.1:%d+/postgres " ..
      "free within 0%.3 s %(pool_size 2, pool_timeout 0%.3%)$", err)
    assert.is_true(waited >= 0.29 and waited < 0.9, "waited " .. waited)
    H.eventually(function() return finished == 2 end, 5, "sleepers")
    assert(small:query("SELECT 1"))
  end)

  it("applies migrations once, from the API and from the command line", function()
    local dir = H.tmpdir()
    H.write(dir .. "/001_create.sql", "CREATE TABLE m1 (id serial PRIMARY KEY, v text);\nINSERT INTO m1 (v) VALUES ('a');")
    H.write(dir .. "/002_index.sql", "CREATE INDEX m1_v ON m1 (v);")
    assert.are.same({ "001_create.sql", "002_index.sql" }, osara.sql.migrate(db, dir))
    assert.are.same({}, osara.sql.migrate(db, dir))
    H.write(dir .. "/003_more.sql", "CREATE TABLE m3 (id int);")
    local status, out = H.run({ "sql", "migrate", pg.url, dir }, 30)
    assert.are.equal(0, status, out)
    assert.matches("applied 003_more.sql", out)
    assert.is_nil(out:find("001_create", 1, true))
    status, out = H.run({ "sql", "migrate", pg.url, dir }, 30)
    assert.are.equal(0, status, out)
    assert.matches("nothing to apply", out)
    H.write(dir .. "/004_bad.sql", "CREATE TABLE m4 (id int); SELEC 1;")
    status, out = H.run({ "sql", "migrate", pg.url, dir }, 30, nil, { errors = { "failed" } })
    assert.are.equal(1, status, out)
    assert.matches("migration 004_bad.sql failed: postgres: syntax error", out)
    assert.are.equal("0", pg:psql("SELECT count(*) FROM pg_tables WHERE tablename = 'm4'"))
    assert.are.equal("1,2,3", pg:psql("SELECT string_agg(version::text, ',' ORDER BY version) FROM osara_migrations"))
  end)

  describe("through the real binary", function()
    local dir, p, port
    before_each(function()
      dir = H.tmpdir()
      p, port = T.app(dir, APP, nil, { env = { OSARA_SQL_URL = pg.url } })
    end)
    after_each(H.cleanup)
    local function stop_host()
      H.stop(p) -- exit status 0, no ERROR line in its log
      return p:output()
    end
    local function url(path) return "http://127.0.0.1:" .. port .. path end

    it("keeps answering HTTP while a query sleeps on the server", function()
      local _, _, body = T.curl { url "/one" }
      assert.are.same({ n = 1, driver = "postgres" }, cjson.decode(body)) -- OSARA_SQL_URL won
      local slow = H.child { "curl", "-s", "-w", " %{time_total}", url "/slow" }
      H.eventually(function()
        return pg:psql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(1)::text%'") == "1"
      end, 5, "the slow query to start")
      local worst, n = 0, 0
      while slow:wait(0) == nil do
        local _, _, b = T.curl { "-w", " %{time_total}", url "/fast" }
        worst = math.max(worst, tonumber(b:match(" ([%d.]+)$")))
        n = n + 1
      end
      H.drain(slow)
      local slow_body, slow_time = slow:output():match("^(.*) ([%d.]+)$")
      assert.are.same({ n = 7 }, cjson.decode(slow_body))
      assert.is_true(tonumber(slow_time) >= 1, slow_time)
      assert.is_true(n >= 3, "only " .. n .. " fast requests during the sleep")
      assert.is_true(worst < 0.1, "a fast request took " .. worst .. " s during the slow query")
      stop_host()
    end)

    it("fails queries with nil, err while postgres is down and reconnects after", function()
      assert.are.equal(200, (T.curl { url "/one" }))
      pg:stop { allow = EXPECTED_LOG }
      local up = false
      finally(function() if not up then pg:_launch() end end)
      H.expect(p, "sql: connection to postgres://postgres@127.0.0.1:" .. pg.port .. "/postgres lost", 10)
      local status, _, body = T.curl { url "/one" }
      assert.are.equal(503, status)
      -- "unavailable (reconnecting): <why>", or "cannot connect: <why>" when
      -- the request waited for a reconnect attempt that failed
      local err = cjson.decode(body).err
      assert.matches("^sql: .*postgres://postgres@127.0.0.1:%d+/postgres", err)
      assert.is_truthy(err:find("unavailable (reconnecting)", 1, true) or err:find("cannot connect", 1, true), err)
      up = true
      pg:_launch()
      H.expect(p, "sql: connected to postgres://postgres@127.0.0.1:" .. pg.port .. "/postgres again", 10)
      local _, _, metrics = T.curl { url "/metrics" }
      assert.matches('osara_sql_connections_lost_total{db="postgres://postgres@127.0.0.1:%d+/postgres"} [1-9]', metrics)
      assert.matches('osara_sql_connect_failures_total{db="postgres://postgres@127.0.0.1:%d+/postgres"} [1-9]', metrics)
      status, _, body = T.curl { url "/one" }
      assert.are.equal(200, status, body)
      stop_host()
    end)

    it("leaves no half-applied transaction when the host is killed inside db:tx", function()
      pg:psql("CREATE TABLE killed (v text)")
      local req = H.child({ "curl", "-s", "-X", "POST", url "/tx" }, { status = false }) -- its server is killed
      H.expect(p, "tx: first row written", 10)
      assert.are.equal("1", pg:psql("SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"))
      local _, sig = H.kill9(p)
      assert.are.equal(9, sig)
      req:wait(10)
      H.eventually(function()
        return pg:psql("SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'") == "0"
      end, 10, "the server to end the killed session")
      assert.are.equal("0", pg:psql("SELECT count(*) FROM killed"))
    end)
  end)

  it("keeps the pool and its connections across a reload", function()
    local dir = H.tmpdir()
    local function app(v)
      return ([[
local osara = require "osara"
local db = osara.sql(%q, { pool_size = 1 })
osara.route("GET", "/pid", function()
  local rows = assert(db:query("SELECT pg_backend_pid() AS pid"))
  return { pid = rows[1].pid, version = %d }
end)
]]):format(pg.url, v)
    end
    H.write(dir .. "/app.lua", app(1))
    local p = H.osara { "run", "--watch", "--http", "127.0.0.1:0", dir .. "/app.lua" }
    local port = T.listening(p)
    local _, _, b1 = T.curl { "http://127.0.0.1:" .. port .. "/pid" }
    H.write(dir .. "/app.lua", app(2))
    H.expect(p, "reloaded")
    local _, _, b2 = T.curl { "http://127.0.0.1:" .. port .. "/pid" }
    local v1, v2 = cjson.decode(b1), cjson.decode(b2)
    assert.are.same({ 1, 2 }, { v1.version, v2.version })
    assert.are.equal(v1.pid, v2.pid) -- the same server session: nothing reconnected
    H.stop(p)
  end)

  it("raises a clear error for a Postgres query at load time", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", ("local db = require('osara').sql(%q)\ndb:query('SELECT 1')\n"):format(pg.url))
    local status, out = H.run({ "run", dir .. "/app.lua" }, 20, nil,
      { errors = { "only inside a handler, timer or task" } })
    assert.are.equal(1, status)
    assert.matches("app.lua:2: .*only inside a handler, timer or task", out)
  end)
end)

describe("osara.sql (sqlite) through the real binary", function()
  after_each(H.cleanup)

  it("leaves no half-applied transaction when the host is killed inside db:tx", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local db = osara.sql() -- sqlite:osara.db in the data folder
assert(db:exec("CREATE TABLE IF NOT EXISTS killed (v TEXT)"))
osara.spawn(function()
  db:tx(function(tx)
    assert(tx:exec("INSERT INTO killed (v) VALUES ('first')"))
    osara.log.info("tx: first row written")
    osara.sleep(30)
  end)
end)
]])
    local p = H.osara { "run", dir .. "/app.lua" }
    H.expect(p, "tx: first row written", 10)
    local _, sig = H.kill9(p)
    assert.are.equal(9, sig)
    local check = dir .. "/check.lua"
    H.write(check, [[
local osara = require "osara"
osara.spawn(function()
  local rows = assert(osara.sql():query("SELECT count(*) AS n FROM killed"))
  osara.log.info("rows=%d", rows[1].n)
  require("osara.vm_c").stop(0)
end)
]])
    local status, out = H.run({ "run", "--data", dir .. "/.osara-data", check }, 20)
    assert.are.equal(0, status, out)
    assert.matches("rows=0", out)
  end)

  it("migrates from the command line with a script's default database", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", "-- uses osara.sql()\n")
    os.execute("mkdir -p " .. dir .. "/schema")
    H.write(dir .. "/schema/001_a.sql", "CREATE TABLE a (id INTEGER);")
    local status, out = H.run({ "sql", "migrate", dir .. "/app.lua", dir .. "/schema" }, 20)
    assert.are.equal(0, status, out)
    assert.matches("applied 001_a.sql", out)
    status, out = H.run({ "sql", "migrate", dir .. "/app.lua", dir .. "/schema" }, 20)
    assert.are.equal(0, status, out)
    assert.matches("nothing to apply", out)
    assert.is_truthy(io.open(dir .. "/.osara-data/osara.db")):close()
    status, out = H.run({ "sql", "migrate" }, 20)
    assert.are.equal(2, status)
    assert.matches("usage: osara sql migrate", out)
  end)

  it("takes its database from config.yaml: the database section, or a name", function()
    local dir = H.tmpdir()
    H.write(dir .. "/config.yaml", "database:\n  type: sqlite\n  path: from_config.db\n" ..
      "databases:\n  other:\n    url: sqlite:other.db\n    pool_size: 1\n")
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
osara.spawn(function()
  local a, b = osara.sql(), osara.sql "other"
  assert(a:exec("CREATE TABLE t (v INTEGER)"))
  osara.log.info("a=%s b=%s", a.url, b.url)
  local ok, err = pcall(osara.sql, "missing")
  osara.log.info("missing: %s", err)
  require("osara.vm_c").stop(0)
end)
]])
    local status, out = H.run({ "run", dir .. "/app.lua" }, 20)
    assert.are.equal(0, status, out)
    assert.matches("a=sqlite:[^ ]*/%.osara%-data/from_config%.db b=sqlite:[^ ]*/other%.db", out)
    assert.matches("missing: .*no database 'missing' in config.yaml", out)
  end)
end)
