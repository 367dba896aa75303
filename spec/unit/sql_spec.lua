-- osara.sql on SQLite (embedded): queries, types, placeholders,
-- transactions, the pool, the table helper, migrations, serialize.
-- Postgres: spec/integration/sql_spec.lua.
local osara = require "osara"
local H = require "spec.helpers.host"
local cjson = require "cjson"

local null = osara.null

local function fresh()
  return osara.sql("sqlite:" .. H.tmpdir() .. "/t.db")
end

local function migrations(files)
  local dir = H.tmpdir()
  for name, text in pairs(files) do H.write(dir .. "/" .. name, text) end
  return dir
end

describe("osara.sql (sqlite)", function()
  after_each(H.cleanup)

  it("round-trips every column type, NULL as osara.null, big integers as strings", function()
    local db = fresh()
    assert(db:exec("CREATE TABLE t (i INTEGER, r REAL, s TEXT, b BLOB, n INTEGER, flag BOOLEAN)"))
    assert(db:exec("INSERT INTO t VALUES ($1, $2, $3, $4, $5, $6)",
      -(2 ^ 53), 0.25, "héllo", "a\0b\255", null, true))
    assert(db:exec("INSERT INTO t VALUES ($1, $2, $3, $4, $5, $6)",
      "9223372036854775807", -1e300, "", "", nil, false))
    local rows = assert(db:query("SELECT * FROM t ORDER BY rowid"))
    assert.are.same({ i = -(2 ^ 53), r = 0.25, s = "héllo", b = "a\0b\255", n = null, flag = 1 }, rows[1])
    assert.are.same({ i = "9223372036854775807", r = -1e300, s = "", b = "", n = null, flag = 0 }, rows[2])
    assert.are.equal(null, rows[1].n)
    assert.are.equal("number", type(rows[1].i))
  end)

  it("returns affected rows and the last insert id from exec", function()
    local db = fresh()
    assert(db:exec("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"))
    assert.are.same({ 1, 1 }, { db:exec("INSERT INTO t (v) VALUES ($1)", "a") })
    assert.are.same({ 1, 2 }, { db:exec("INSERT INTO t (v) VALUES ($1)", "b") })
    assert.are.same({ 2 }, { db:exec("UPDATE t SET v = $1", "c") })
    assert.are.same({ 1, 9 }, { db:exec("INSERT INTO t (id, v) VALUES (9, 'x') RETURNING id") })
  end)

  it("binds $n placeholders by number and refuses other styles", function()
    local db = fresh()
    local rows = assert(db:query("SELECT $2 AS b, $1 AS a, $1 || $2 AS ab", "x", "y"))
    assert.are.same({ { a = "x", b = "y", ab = "xy" } }, rows)
    local r, err = db:query("SELECT ?", 1)
    assert.is_nil(r)
    assert.matches("placeholders are %$1, %$2", err)
    r, err = db:query("SELECT $1, $2", 1)
    assert.is_nil(r)
    assert.matches("takes 2 parameters, got 1", err)
    assert.has_error(function() db:query("SELECT $1", {}) end,
      "osara.sql: parameter $1 must be a string, number, boolean, nil or osara.null, got table")
    r, err = db:query("SELECT 1; SELECT 2")
    assert.is_nil(r)
    assert.matches("one statement per query", err)
  end)

  it("stores injection attempts through values as plain text", function()
    local db = fresh()
    assert(db:exec("CREATE TABLE t (v TEXT)"))
    local evil = "x'); DROP TABLE t; --"
    assert(db:exec("INSERT INTO t (v) VALUES ($1)", evil))
    assert.are.same({ { v = evil } }, db:query("SELECT v FROM t WHERE v = $1", evil))
  end)

  it("returns nil, err for SQL errors and raises for misuse", function()
    local db = fresh()
    local rows, err = db:query("SELECT * FROM missing")
    assert.is_nil(rows)
    assert.are.equal("sqlite: no such table: missing", err)
    local ok, msg = pcall(function() db:query(42) end)
    assert.is_false(ok)
    assert.matches("sql_spec.lua:%d+: osara.sql: db:query expects SQL text as argument 1, got number", msg)
    ok, msg = pcall(function() db:exec("SELECT $1", function() end) end)
    assert.matches("sql_spec.lua:%d+: osara.sql: parameter %$1 must be", msg)
  end)

  it("commits a transaction and returns the function's results", function()
    local db = fresh()
    assert(db:exec("CREATE TABLE t (v INTEGER)"))
    local a, b = db:tx(function(tx)
      assert(tx:exec("INSERT INTO t VALUES (1)"))
      assert(tx:exec("INSERT INTO t VALUES (2)"))
      return "done", 2
    end)
    assert.are.same({ "done", 2 }, { a, b })
    assert.is_true(db:tx(function() end))
    assert.are.equal(2, #db:query("SELECT * FROM t"))
  end)

  it("rolls back and re-raises when the function raises", function()
    local db = fresh()
    assert(db:exec("CREATE TABLE t (v INTEGER)"))
    local ok, err = pcall(db.tx, db, function(tx)
      assert(tx:exec("INSERT INTO t VALUES (1)"))
      error("boom", 0)
    end)
    assert.is_false(ok)
    assert.are.equal("boom", err)
    assert.are.same({}, db:query("SELECT * FROM t"))
  end)

  it("rolls back on nil, err and on any failed statement inside", function()
    local db = fresh()
    assert(db:exec("CREATE TABLE t (v INTEGER UNIQUE)"))
    local r, err = db:tx(function(tx)
      assert(tx:exec("INSERT INTO t VALUES (1)"))
      return nil, "changed my mind"
    end)
    assert.are.same({ nil, "changed my mind" }, { r, err })
    r, err = db:tx(function(tx)
      assert(tx:exec("INSERT INTO t VALUES (2)"))
      tx:exec("INSERT INTO t VALUES (2)") -- fails: unique; ignored by the caller
      return true
    end)
    assert.is_nil(r)
    assert.matches("UNIQUE constraint failed", err)
    assert.are.same({}, db:query("SELECT * FROM t"))
  end)

  it("raises when a transaction is used after db:tx returned", function()
    local db = fresh()
    local kept
    db:tx(function(tx) kept = tx end)
    assert.has_error(function() kept:query("SELECT 1") end)
  end)

  it("makes others wait for a transaction that yields, up to pool_timeout", function()
    local path = H.tmpdir() .. "/t.db"
    local db = osara.sql("sqlite:" .. path, { pool_timeout = 0.2 })
    assert(db:exec("CREATE TABLE t (v INTEGER)"))
    local release = false
    osara.spawn(function()
      db:tx(function(tx)
        tx:exec("INSERT INTO t VALUES (1)")
        while not release do osara.sleep(0.01) end
      end)
    end)
    local t0 = osara.monotonic()
    local rows, err = db:query("SELECT count(*) AS n FROM t")
    assert.is_nil(rows)
    assert.matches("pool exhausted: no connection to sqlite:.* free within 0.2 s %(pool_size 1, pool_timeout 0.2%)", err)
    assert.is_true(osara.monotonic() - t0 >= 0.19)
    osara.after(0.05, function() release = true end)
    rows = assert(db:query("SELECT count(*) AS n FROM t"))
    assert.are.same({ { n = 1 } }, rows) -- waited for the commit, then saw it
    local labels = { db = "sqlite:" .. path }
    assert.are.equal(1, osara.metrics.value("osara_sql_pool_timeouts_total", labels))
    assert.are.equal(2, osara.metrics.value("osara_sql_pool_waits_total", labels))
  end)

  it("serves waiters first come, first served (a newcomer queues behind them)", function()
    local db = fresh()
    local order, holding = {}, true
    osara.spawn(function()
      db:tx(function() while holding do osara.sleep(0.01) end end)
      order[#order + 1] = "holder done"
      assert(db:query("SELECT 1")) -- arrives while the waiter waits
      order[#order + 1] = "newcomer"
    end)
    osara.spawn(function()
      osara.sleep(0.02) -- the holder has the connection now
      assert(db:query("SELECT 1"))
      order[#order + 1] = "waiter"
    end)
    osara.sleep(0.06)
    holding = false
    H.eventually(function() return #order == 3 end, 5, "all three")
    assert.are.same({ "holder done", "waiter", "newcomer" }, order)
  end)

  it("checkpoints the WAL off the loop every 1000 pages", function()
    local db = fresh()
    assert(db:exec("CREATE TABLE t (v TEXT)"))
    local pad = ("x"):rep(3000) -- about one page per row
    for i = 1, 1100 do
      assert(db:exec("INSERT INTO t (v) VALUES ($1)", pad .. i))
      if i % 100 == 0 then osara.sleep(0.001) end
    end
    H.eventually(function() return db:stats().checkpoints >= 1 end, 10, "a checkpoint on the thread pool")
    assert.is_true(osara.metrics.value("osara_sql_checkpoints_total", { db = db.url }) >= 1)
    assert.are.equal(1100, db:query("SELECT count(*) AS n FROM t")[1].n)
  end)

  it("checks options: unknown keys name the caller's line and suggest", function()
    local ok, err = pcall(function()
      osara.sql("sqlite::memory:", { pool = 2 })
    end)
    assert.is_false(ok)
    assert.matches("sql_spec.lua:%d+: unknown option 'pool' in osara.sql %(did you mean 'pool_size'%?%)", err)
    assert.has_error(function() osara.sql("sqlite::memory:", { pool_size = 2 }) end)
    assert.has_error(function() osara.sql("mysql://x") end)
  end)

  describe("table helper", function()
    local db, Foo
    before_each(function()
      db = fresh()
      assert(db:exec("CREATE TABLE foo (id INTEGER PRIMARY KEY, bar TEXT, qux INTEGER)"))
      Foo = db:table("foo")
    end)

    it("creates, gets with order and limit, gets in a list, updates and deletes", function()
      local made = assert(Foo:create { { bar = "baz", qux = 3 }, { bar = "corge", qux = 5 }, { bar = "baz", qux = 1 } })
      assert.are.same({ 1, 2, 3 }, { made[1].id, made[2].id, made[3].id })
      local got = assert(Foo:get({ bar = "baz" }, { order_by = "qux", limit = 5 }))
      assert.are.same({ 1, 3 }, { got[1].qux, got[2].qux })
      got = assert(Foo:get({}, { order_by = "-qux", limit = 1 }))
      assert.are.same({ { id = 2, bar = "corge", qux = 5 } }, got)
      got = assert(Foo:get_in("bar", { "corge", "quux" }))
      assert.are.equal(1, #got)
      assert.are.same({}, Foo:get_in("bar", {}))
      assert.are.equal(1, Foo:update({ bar = "grault" }, { where = { qux = 3 } }))
      assert.are.equal(1, #Foo:get { bar = "grault" })
      assert.are.equal(2, Foo:delete { bar = { "grault", "corge" } })
      assert.are.equal(1, #Foo:get())
      assert.are.same({}, Foo:create {}) -- no rows
      assert.are.same({ { id = 4, bar = null, qux = null } }, Foo:create { {} })
      assert.are.equal(1, #Foo:get { bar = null })
    end)

    it("refuses identifiers that are not real columns (no injection through keys)", function()
      Foo:create { bar = "x" }
      assert.has_error(function() Foo:get { ["bar = bar OR 1=1; --"] = 1 } end,
        "osara.sql: table 'foo' has no column 'bar = bar OR 1=1; --'")
      assert.has_error(function() Foo:get({}, { order_by = "qux; DROP TABLE foo" }) end)
      assert.has_error(function() Foo:create { { ['bar") VALUES (1); --'] = 1 } } end)
      assert.has_error(function() Foo:update({ bar = 1 }, { where = { ["1=1 --"] = 1 } }) end)
      assert.has_error(function() db:table('foo"; DROP TABLE foo; --') end)
      assert.has_error(function() Foo:update({ bar = 1 }) end,
        "osara.sql: update needs where (pass where = {} to touch every row)")
      assert.has_error(function() Foo:delete() end)
      assert.are.equal(1, #Foo:get())
    end)

    it("refreshes the column list on a miss", function()
      Foo:create { bar = "x" }
      assert(db:exec("ALTER TABLE foo ADD COLUMN extra TEXT"))
      assert(Foo:create { bar = "y", extra = "e" })
      assert.are.equal(1, #Foo:get { extra = "e" })
    end)

    it("runs inside a transaction through tx:table", function()
      local ok = pcall(db.tx, db, function(tx)
        tx:table("foo"):create { bar = "gone" }
        error("undo")
      end)
      assert.is_false(ok)
      assert.are.same({}, Foo:get())
    end)
  end)

  it("serializes rows as json and msgpack", function()
    local rows = { { id = 1, v = null } }
    assert.are.equal('[{"id":1}]', osara.serialize({ { id = 1 } }, "json"))
    assert.are.equal("[]", osara.serialize({}, "json"))
    local mp = osara.codec.get("msgpack")
    assert.are.same({ { id = 1 } }, mp.decode(osara.serialize({ { id = 1 } }, "msgpack")))
    assert.has_error(function() osara.serialize(rows, "xml") end)
    assert.are.same(rows, cjson.decode(osara.serialize(rows)))
  end)

  describe("migrations", function()
    local files = {
      ["001_create.sql"] = "CREATE TABLE a (id INTEGER PRIMARY KEY, v TEXT);\nINSERT INTO a (v) VALUES ('one');",
      ["002_more.sql"] = "CREATE TABLE b (id INTEGER PRIMARY KEY);",
      ["README.md"] = "not a migration",
    }

    it("applies numbered files in order once; a second run applies nothing", function()
      local db, dir = fresh(), migrations(files)
      assert.are.same({ "001_create.sql", "002_more.sql" }, osara.sql.migrate(db, dir))
      assert.are.same({}, osara.sql.migrate(db, dir))
      assert.are.same({ { v = "one" } }, db:query("SELECT v FROM a"))
      assert.are.same({ { version = 1 }, { version = 2 } },
        db:query("SELECT version FROM osara_migrations ORDER BY version"))
    end)

    it("starts at { from = n }", function()
      local db, dir = fresh(), migrations(files)
      assert.are.same({ "002_more.sql" }, osara.sql.migrate(db, dir, { from = 2 }))
      assert.is_nil(db:query("SELECT * FROM a"))
    end)

    it("rolls a failing migration back and stops there", function()
      local db = fresh()
      local dir = migrations {
        ["1-ok.sql"] = "CREATE TABLE a (id INTEGER);",
        ["2-bad.sql"] = "CREATE TABLE b (id INTEGER); INSERT INTO nope VALUES (1);",
        ["3-later.sql"] = "CREATE TABLE c (id INTEGER);",
      }
      local done, err, applied = osara.sql.migrate(db, dir)
      assert.is_nil(done)
      assert.matches("migration 2%-bad.sql failed: sqlite: no such table: nope", err)
      assert.are.same({ "1-ok.sql" }, applied)
      assert.is_nil(db:query("SELECT * FROM b"))
      assert.is_nil(db:query("SELECT * FROM c"))
    end)

    it("resets only with confirm, then re-applies everything", function()
      local db, dir = fresh(), migrations(files)
      assert(osara.sql.migrate(db, dir))
      assert(db:exec("INSERT INTO a (v) VALUES ('two')"))
      assert.has_error(function() osara.sql.reset(db, dir) end,
        "osara.sql.reset: drops every table; refuses without { confirm = true }")
      assert.are.equal(2, #db:query("SELECT * FROM a"))
      assert.are.same({ "001_create.sql", "002_more.sql" }, osara.sql.reset(db, dir, { confirm = true }))
      assert.are.same({ { v = "one" } }, db:query("SELECT v FROM a"))
    end)

    it("reports a missing folder as nil, err", function()
      local done, err = osara.sql.migrate(fresh(), "/nonexistent/schema")
      assert.is_nil(done)
      assert.matches("/nonexistent/schema: No such file", err)
    end)
  end)
end)
