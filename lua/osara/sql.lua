-- osara.sql: SQL databases for handlers (docs/sql.md). SQLite is the
-- default (embedded, nothing to install); PostgreSQL runs on the worker's
-- loop through libpq's asynchronous API, so a query yields the handler's
-- coroutine and the loop keeps serving. C (host/sql) gives pools and
-- leases; this module gives db:query/exec/tx, the table helper, migrations
-- and serialize.
local sql_c = require "osara.sql_c"
local vm_c = require "osara.vm_c"
local options = require "osara.options"
local cjson = require "cjson"

local null = cjson.null
local pack = function(...) return { n = select("#", ...), ... } end

local M = { null = null }

-- ---- opening ---------------------------------------------------------------

local function pct(s)
  return (s:gsub("[^%w%-%._~]", function(c) return ("%%%02X"):format(c:byte()) end))
end

-- kata's database settings -> postgres URL
local function url_of(cfg)
  if cfg.url then return cfg.url end
  if not (cfg.host or cfg.name or cfg.user) then return nil end
  local auth = cfg.user and (pct(cfg.user) .. (cfg.password and (":" .. pct(cfg.password)) or "") .. "@") or ""
  return ("postgres://%s%s%s/%s"):format(auth, cfg.host or "localhost",
    cfg.port and (":" .. math.floor(cfg.port)) or "", cfg.name and pct(cfg.name) or "")
end

-- "sqlite:x" | "postgres://..." -> driver, target, label
local function parse_url(url)
  local path = url:match("^sqlite:(.*)$")
  if path then
    if path:sub(1, 2) == "//" then path = path:sub(3) end
    if path == "" then return nil, "sqlite: needs a path (sqlite:app.db)" end
    if path ~= ":memory:" and path:sub(1, 1) ~= "/" then
      path = vm_c.paths().data_dir .. "/" .. path
    end
    return "sqlite", path, "sqlite:" .. path
  end
  if url:match("^postgres://") or url:match("^postgresql://") then
    local label = url:gsub("^(postgres%w*://[^:/@]*):[^@/]*@", "%1@")
    return "postgres", url, label
  end
  return nil, ("unsupported URL '%s' (sqlite:PATH or postgres://user:pass@host:port/db)"):format(url)
end

local DB, Tx, Table = {}, {}, {}
DB.__index, Tx.__index, Table.__index = DB, Tx, Table

local function open(url_or_cfg, opts, level, from_env)
  if type(url_or_cfg) == "table" then
    opts, url_or_cfg = url_or_cfg, nil
  elseif url_or_cfg ~= nil and type(url_or_cfg) ~= "string" then
    error(("osara.sql: expected a URL or a table, got %s"):format(type(url_or_cfg)), level + 1)
  end
  opts = options.check("osara.sql", opts)
  local env = os.getenv("OSARA_SQL_URL")
  local url = (from_env and env ~= nil and env ~= "" and env) or url_or_cfg or url_of(opts)
  if url == nil or url:match("^[%w_%-]+$") then
    -- a name, or nothing: config.yaml's database (databases.<name>), else SQLite
    local curl, copts = require("osara.config").database(url)
    if not curl and url then
      options.raise(("osara.sql: no database '%s' in config.yaml (databases.%s or database.%s)"):format(url, url, url))
    end
    for k, v in pairs(copts or {}) do
      if opts[k] == nil then opts[k] = v end
    end
    url = curl or "sqlite:osara.db"
  end
  local driver, target, label = parse_url(url)
  if not driver then error("osara.sql: " .. target, level + 1) end
  local size = opts.pool_size or (driver == "postgres" and 4 or 1)
  if size < 1 then
    error(("osara.sql: pool_size must be >= 1, got %s"):format(size), level + 1)
  end
  if driver == "sqlite" and size ~= 1 then
    error("osara.sql: pool_size must be 1 for SQLite (one writer; a waiting caller waits in the pool, not in SQLite)", level + 1)
  end
  local timeout = opts.pool_timeout
  if timeout < 0 then error("osara.sql: pool_timeout must be >= 0", level + 1) end
  local min = opts.pool_min or 0
  if min > size then
    error(("osara.sql: pool_min (%d) is larger than pool_size (%d)"):format(min, size), level + 1)
  end
  if vm_c.mode() == "check" then min = 0 end -- osara check connects nothing
  local pool = sql_c.pool(driver, target, label, size, timeout, min)
  return setmetatable({ _pool = pool, _columns = {}, driver = driver, url = label }, DB)
end

-- osara.sql([url | name | settings], [opts]) -> db. OSARA_SQL_URL overrides
-- the URL; a name (or nothing) looks in config.yaml (osara.config.database).
setmetatable(M, {
  __call = function(_, url, opts)
    local db = open(url, opts, 2, true) -- not a tail call: levels count this frame
    return db
  end,
})

-- ---- running statements ----------------------------------------------------

local function check_sql(sql, what, level)
  if type(sql) ~= "string" then
    error(("osara.sql: %s expects SQL text as argument 1, got %s"):format(what, type(sql)), level + 1)
  end
end

-- A connection from the pool: lease | nil, err; raises at `level` when it
-- would have to wait outside a handler, timer or task.
local function acquire(db, level)
  local ok, lease, err = pcall(db._pool.acquire, db._pool)
  if not ok then error(lease, level + 1) end
  return lease, err
end

-- One statement on a fresh lease: rows | affected, id | nil, err[, sqlstate]
local function run_once(db, mode, what, sql, ...)
  check_sql(sql, what, 3)
  local lease, err = acquire(db, 3)
  if not lease then return nil, err end
  local ok, a, b, c = pcall(lease.run, lease, sql, mode, ...)
  lease:release()
  if not ok then error(a, 3) end
  return a, b, c
end

function DB:stats() return self._pool:stats() end

local function tx_run(tx, mode, what, sql, ...)
  if tx._done then
    error(("osara.sql: %s on a transaction that already ended (used after db:tx returned)"):format(what), 3)
  end
  check_sql(sql, what, 3)
  local ok, a, b, c = pcall(tx._lease.run, tx._lease, sql, mode, ...)
  if not ok then error(a, 3) end
  if a == nil then tx._err = tx._err or b end
  return a, b, c
end

-- db:query(sql, ...) / tx:query -> rows | nil, err
-- db:exec(sql, ...) / tx:exec -> affected, last_id | nil, err
-- _script(sql): several statements, no parameters (migrations)
-- (No tail calls: error levels count these frames.)
for name, mode in pairs { query = "rows", exec = "exec", _script = "script" } do
  DB[name] = function(self, sql, ...)
    local a, b, c = run_once(self, mode, "db:" .. name, sql, ...)
    return a, b, c
  end
  Tx[name] = function(self, sql, ...)
    local a, b, c = tx_run(self, mode, "tx:" .. name, sql, ...)
    return a, b, c
  end
end

local function finish(lease, how)
  local ok, err = lease:run(how, "script")
  lease:release()
  return ok, err
end

-- db:tx(function(tx) ... end) -> fn's results | nil, err. Commits when fn
-- returns; rolls back and re-raises when it raises; rolls back and returns
-- nil, err when fn returns nil, err or a statement in it failed.
function DB:tx(fn)
  if type(fn) ~= "function" then
    error(("osara.sql: db:tx expects a function, got %s"):format(type(fn)), 2)
  end
  local lease, err = acquire(self, 2)
  if not lease then return nil, err end
  local pok, ok, berr = pcall(lease.run, lease, "BEGIN", "script")
  if not (pok and ok) then lease:release() end
  if not pok then error(ok, 2) end
  if not ok then return nil, berr end
  local tx = setmetatable({ _lease = lease, _db = self }, Tx)
  local res = pack(pcall(fn, tx))
  tx._done = true
  if not res[1] then
    finish(lease, "ROLLBACK")
    error(res[2], 0)
  end
  local failed = tx._err or (res.n >= 3 and res[2] == nil and res[3])
  if failed then
    finish(lease, "ROLLBACK")
    return nil, failed
  end
  local cok, cerr = finish(lease, "COMMIT")
  if not cok then return nil, cerr end
  if res.n == 1 then return true end
  return unpack(res, 2, res.n)
end

-- ---- table helper -------------------------------------------------------------

local IDENT = "^[%a_][%w_]*$"

local function quote(name) return '"' .. name:gsub('"', '""') .. '"' end

local function new_table(db, exec, name, level)
  if type(name) ~= "string" then
    error(("osara.sql: table name must be a string, got %s"):format(type(name)), level + 1)
  end
  local schema, tname = name:match("^([^.]+)%.([^.]+)$")
  tname = tname or name
  if not tname:match(IDENT) or (schema and not schema:match(IDENT)) then
    error(("osara.sql: invalid table name '%s' (letters, digits, _; optionally schema.table)"):format(name), level + 1)
  end
  local q = schema and (quote(schema) .. "." .. quote(tname)) or quote(tname)
  return setmetatable({ _db = db, _exec = exec, name = name, _schema = schema, _tname = tname, _q = q }, Table)
end

-- db:table(name) -> Table; tx:table(name) runs its statements in the transaction.
function DB:table(name) return new_table(self, self, name, 2) end
function Tx:table(name) return new_table(self._db, self, name, 2) end

-- The table's real columns (a set), queried once per db and refreshed on a miss.
local function columns(t, refresh)
  local cache = t._db._columns
  if cache[t.name] and not refresh then return cache[t.name] end
  local rows, err
  if t._db.driver == "sqlite" then
    rows, err = t._exec:query("SELECT name FROM pragma_table_info($1)", t._tname)
  else
    rows, err = t._exec:query("SELECT column_name AS name FROM information_schema.columns " ..
      "WHERE table_name = $1 AND table_schema = coalesce($2::text, current_schema())",
      t._tname, t._schema or null)
  end
  if not rows then return nil, err end
  local set = {}
  for _, r in ipairs(rows) do set[r.name] = true end
  if next(set) == nil then
    error(("osara.sql: table '%s' does not exist"):format(t.name), 4)
  end
  cache[t.name] = set
  return set
end

-- Checks keys against the real columns; returns a quoting function or nil, err.
local function column_checker(t)
  local cols, err = columns(t)
  if not cols then return nil, err end
  return function(col, level)
    if type(col) ~= "string" then
      error(("osara.sql: column names are strings, got %s in table '%s'"):format(type(col), t.name), level + 1)
    end
    if not cols[col] then
      cols = columns(t, true) or cols
      if not cols[col] then
        error(("osara.sql: table '%s' has no column '%s'"):format(t.name, col), level + 1)
      end
    end
    return quote(col)
  end
end

local function sorted_keys(map)
  local keys = {}
  for k in pairs(map) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  return keys
end

-- WHERE clause from { col = value | null | {v1, v2} }, params appended.
local function where_sql(col, where, params, level)
  if type(where) ~= "table" then
    error(("osara.sql: where must be a table of column = value, got %s"):format(type(where)), level + 1)
  end
  local parts = {}
  for _, k in ipairs(sorted_keys(where)) do
    local v, c = where[k], col(k, level + 1)
    if v == null then
      parts[#parts + 1] = c .. " IS NULL"
    elseif type(v) == "table" then
      if #v == 0 then
        parts[#parts + 1] = "1 = 0"
      else
        local ph = {}
        for i = 1, #v do
          params[#params + 1] = v[i]
          ph[i] = "$" .. #params
        end
        parts[#parts + 1] = c .. " IN (" .. table.concat(ph, ", ") .. ")"
      end
    else
      params[#params + 1] = v
      parts[#parts + 1] = c .. " = $" .. #params
    end
  end
  return #parts > 0 and (" WHERE " .. table.concat(parts, " AND ")) or ""
end

local function order_sql(col, order_by, level)
  local terms = {}
  for term in order_by:gmatch("[^,]+") do
    term = term:match("^%s*(.-)%s*$")
    local desc = false
    if term:sub(1, 1) == "-" then desc, term = true, term:sub(2) end
    local name, dir = term:match("^(%S+)%s+(%a+)$")
    if name then
      dir = dir:lower()
      if dir ~= "asc" and dir ~= "desc" then
        error(("osara.sql: order_by: expected asc or desc, got '%s'"):format(dir), level + 1)
      end
      term, desc = name, dir == "desc"
    end
    terms[#terms + 1] = col(term, level + 1) .. (desc and " DESC" or "")
  end
  return " ORDER BY " .. table.concat(terms, ", ")
end

-- Foo:get(where, { order_by = "qux" | "-qux" | "a, b desc", limit =, offset = }) -> rows | nil, err
function Table:get(where, opts)
  opts = options.check("table:get", opts)
  local col, err = column_checker(self)
  if not col then return nil, err end
  local params = {}
  local sql = "SELECT * FROM " .. self._q .. where_sql(col, where or {}, params, 2)
  if opts.order_by then sql = sql .. order_sql(col, opts.order_by, 2) end
  for _, k in ipairs { "limit", "offset" } do
    local n = opts[k]
    if n then
      if n < 0 then error(("osara.sql: %s must be >= 0"):format(k), 2) end
      params[#params + 1] = n
      sql = sql .. (" %s $%d"):format(k:upper(), #params)
    end
  end
  return self._exec:query(sql, unpack(params, 1, #params))
end

-- Foo:get_in(col, { v1, v2, ... }, opts) -> rows whose col is one of the values
function Table:get_in(column, values, opts)
  if type(values) ~= "table" then
    error(("osara.sql: get_in expects a list of values, got %s"):format(type(values)), 2)
  end
  if #values == 0 then return {} end
  return self:get({ [column] = values }, opts)
end

local MAX_PARAMS = 30000 -- under SQLite's and Postgres' limits per statement

local function insert_sql(t, col, keys, rows, first, last, level)
  local cols, params, tuples = {}, {}, {}
  for i, k in ipairs(keys) do cols[i] = col(k, level + 1) end
  for r = first, last do
    local ph = {}
    for i, k in ipairs(keys) do
      params[#params + 1] = rows[r][k]
      ph[i] = "$" .. #params
    end
    tuples[#tuples + 1] = "(" .. table.concat(ph, ", ") .. ")"
  end
  local sql = #keys == 0 and ("INSERT INTO " .. t._q .. " DEFAULT VALUES RETURNING *")
    or ("INSERT INTO %s (%s) VALUES %s RETURNING *"):format(t._q, table.concat(cols, ", "), table.concat(tuples, ", "))
  return sql, params
end

-- Statements of create: consecutive rows with the same keys share one.
local function insert_batches(t, col, rows, level)
  local batches, i = {}, 1
  while i <= #rows do
    if type(rows[i]) ~= "table" then
      error(("osara.sql: create expects rows as tables, got %s"):format(type(rows[i])), level + 1)
    end
    local keys = sorted_keys(rows[i])
    local sig, j = table.concat(keys, "\0"), i
    local per = math.max(1, math.floor(MAX_PARAMS / math.max(1, #keys)))
    while j + 1 <= #rows and j + 1 - i < per and type(rows[j + 1]) == "table"
      and table.concat(sorted_keys(rows[j + 1]), "\0") == sig do
      j = j + 1
    end
    local sql, params = insert_sql(t, col, keys, rows, i, #keys == 0 and i or j, level + 1)
    batches[#batches + 1] = { sql = sql, params = params }
    i = (#keys == 0 and i or j) + 1
  end
  return batches
end

-- Foo:create{ {...}, {...} } (or one row) -> the created rows | nil, err
function Table:create(rows)
  if type(rows) ~= "table" then
    error(("osara.sql: create expects a row or a list of rows, got %s"):format(type(rows)), 2)
  end
  if rows[1] == nil and next(rows) ~= nil then rows = { rows } end
  local col, err = column_checker(self)
  if not col then return nil, err end
  local batches = insert_batches(self, col, rows, 2)
  local function insert_all(exec)
    local out = {}
    for _, b in ipairs(batches) do
      local got, ierr, state = exec:query(b.sql, unpack(b.params, 1, #b.params))
      if not got then return nil, ierr, state end
      for _, r in ipairs(got) do out[#out + 1] = r end
    end
    return out
  end
  if #batches <= 1 or getmetatable(self._exec) == Tx then
    return insert_all(self._exec)
  end
  return self._db:tx(insert_all)
end

local function required_where(opts, what, level)
  if type(opts) ~= "table" or opts.where == nil then
    error(("osara.sql: %s needs where (pass where = {} to touch every row)"):format(what), level + 1)
  end
end

-- Foo:update({ col = value }, { where = {...} }) -> affected | nil, err
function Table:update(values, opts)
  options.check("table:update", opts)
  required_where(opts, "update", 2)
  if type(values) ~= "table" or next(values) == nil then
    error("osara.sql: update expects a table of column = value", 2)
  end
  local col, err = column_checker(self)
  if not col then return nil, err end
  local params, sets = {}, {}
  for _, k in ipairs(sorted_keys(values)) do
    params[#params + 1] = values[k]
    sets[#sets + 1] = col(k, 2) .. " = $" .. #params
  end
  local sql = "UPDATE " .. self._q .. " SET " .. table.concat(sets, ", ") .. where_sql(col, opts.where, params, 2)
  return (self._exec:exec(sql, unpack(params, 1, #params)))
end

-- Foo:delete(where) -> affected | nil, err; delete({}) deletes every row.
function Table:delete(where)
  if where == nil then
    error("osara.sql: delete needs where (pass {} to delete every row)", 2)
  end
  local col, err = column_checker(self)
  if not col then return nil, err end
  local params = {}
  local sql = "DELETE FROM " .. self._q .. where_sql(col, where, params, 2)
  return (self._exec:exec(sql, unpack(params, 1, #params)))
end

-- ---- serialize ---------------------------------------------------------------

-- osara.serialize(rows, "json" | "msgpack") -> bytes | nil, err
function M.serialize(rows, format)
  format = format or "json"
  if format ~= "json" and format ~= "msgpack" then
    error(("osara.serialize: format must be 'json' or 'msgpack', got '%s'"):format(tostring(format)), 2)
  end
  if type(rows) == "table" and next(rows) == nil then
    return format == "json" and "[]" or "\144" -- an empty array, not a map
  end
  return require("osara.codec").get(format).encode(rows)
end

-- ---- migrations ----------------------------------------------------------------

local function check_db(db, what)
  if getmetatable(db) ~= DB then
    error(("osara.sql.%s: expects a db from osara.sql(...) as argument 1"):format(what), 3)
  end
end

-- Numbered .sql files of dir, in order: { {version=, name=, path=} }
local function migration_files(dir)
  local names, err = sql_c.listdir(dir)
  if not names then return nil, "migrations: " .. err end
  local files, seen = {}, {}
  for _, name in ipairs(names) do
    local num = name:match("^(%d+).*%.sql$")
    if num then
      local v = tonumber(num)
      if seen[v] then
        return nil, ("migrations: %s and %s have the same number %d"):format(seen[v], name, v)
      end
      seen[v] = name
      files[#files + 1] = { version = v, name = name, path = dir .. "/" .. name }
    end
  end
  table.sort(files, function(a, b) return a.version < b.version end)
  return files
end

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local text = f:read("*a")
  f:close()
  return text
end

local function applied_versions(db)
  local ok, err = db:_script("CREATE TABLE IF NOT EXISTS osara_migrations (" ..
    "version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)")
  if not ok then return nil, err end
  local rows, qerr = db:query("SELECT version FROM osara_migrations")
  if not rows then return nil, qerr end
  local set = {}
  for _, r in ipairs(rows) do set[tonumber(r.version)] = true end
  return set
end

local function apply(db, file)
  local text, err = read_file(file.path)
  if not text then return nil, err end
  return db:tx(function(tx)
    local ok, serr = tx:_script(text)
    if not ok then return nil, serr end
    return tx:exec("INSERT INTO osara_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
      file.version, file.name, os.date("!%Y-%m-%dT%H:%M:%SZ"))
  end)
end

-- osara.sql.migrate(db, dir, { from = n }) -> { applied names } | nil, err, applied
-- Applies the numbered .sql files of dir not applied yet (numbered n and
-- above with from), in order, each in its own transaction.
function M.migrate(db, dir, opts)
  check_db(db, "migrate")
  if type(dir) ~= "string" then error("osara.sql.migrate: expects a folder as argument 2", 2) end
  opts = options.check("osara.sql.migrate", opts)
  local files, err = migration_files(dir)
  if not files then return nil, err, {} end
  local applied, aerr = applied_versions(db)
  if not applied then return nil, aerr, {} end
  local done = {}
  for _, f in ipairs(files) do
    if f.version >= (opts.from or 0) and not applied[f.version] then
      local ok, merr = apply(db, f)
      if not ok then
        return nil, ("migration %s failed: %s"):format(f.name, merr), done
      end
      done[#done + 1] = f.name
      require("osara").log.info("sql: applied migration %s to %s", f.name, db.url)
    end
  end
  return done
end

local function drop_everything(db)
  if db.driver == "postgres" then
    local rows, err = db:query("SELECT current_schema() AS s")
    if not rows then return nil, err end
    local s = quote(rows[1].s)
    return db:_script(("DROP SCHEMA %s CASCADE; CREATE SCHEMA %s"):format(s, s))
  end
  local rows, err = db:query("SELECT type, name FROM sqlite_master " ..
    "WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%'")
  if not rows then return nil, err end
  local stmts = { "PRAGMA foreign_keys = OFF" }
  for _, r in ipairs(rows) do
    stmts[#stmts + 1] = ("DROP %s IF EXISTS %s"):format(r.type:upper(), quote(r.name))
  end
  stmts[#stmts + 1] = "PRAGMA foreign_keys = ON"
  return db:_script(table.concat(stmts, "; "))
end

-- osara.sql.reset(db, dir, { confirm = true }): drops every table and
-- applies all migrations again. Refuses without confirm.
function M.reset(db, dir, opts)
  check_db(db, "reset")
  opts = options.check("osara.sql.reset", opts)
  if opts.confirm ~= true then
    error("osara.sql.reset: drops every table; refuses without { confirm = true }", 2)
  end
  local ok, err = drop_everything(db)
  if not ok then return nil, err, {} end
  db._columns = {}
  return M.migrate(db, dir)
end

-- `osara sql migrate SCRIPT_OR_URL DIR` (host/sql/cli.c) runs this in a task.
function M._cli_migrate()
  local target, dir = os.getenv("OSARA_SQL_CLI_TARGET"), os.getenv("OSARA_SQL_CLI_DIR")
  local is_url = target:match("^sqlite:") or target:match("^postgres")
  local ok, db = pcall(open, is_url and target or nil, nil, 1, not is_url)
  local done, err
  if ok then
    done, err = M.migrate(db, dir)
  else
    err = db
  end
  if done then
    for _, name in ipairs(done) do io.stdout:write("applied ", name, "\n") end
    if #done == 0 then io.stdout:write("nothing to apply\n") end
  else
    io.stderr:write("osara sql migrate: ", tostring(err), "\n")
  end
  io.stdout:flush()
  vm_c.stop(done and 0 or 1)
end

return M
