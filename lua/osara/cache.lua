-- osara.cache: kata's caches behind one interface (docs/cache.md).
--   local c = osara.cache { type = "redis", host = "127.0.0.1:6379", prefix = "app:" }
--   local c = osara.cache "memcached"      -- config.yaml's cache.memcached
--   c:get(k)  c:get_multi(keys)  c:set(k, v, expire)  c:set_multi(map, expire)
--   c:delete(k)  c:delete_multi(keys)
-- Values go through a codec (json by default). A server that is down makes
-- a get a miss and a set a logged failure (nil, err): never an error in the
-- handler. Misuse (a non-string key, a value the codec cannot encode)
-- raises.
local cache_c = require "osara.cache_c"
local codec = require "osara.codec"
local timer_c = require "osara.timer_c"
local log_c = require "osara.log_c"
local metrics = require "osara.metrics_c"

local M = {}

-- ---- options -------------------------------------------------------------------
-- Checked against lua/osara/option_tables.lua ("osara.cache"); the options
-- of one type are refused on another.

local options = require "osara.options"

local only_for = { host = "redis", db = "redis", password = "redis", name = "store",
                   hosts = { redis = true, memcached = true }, timeout = { redis = true, memcached = true } }

local function check_options(given)
  local opts = options.check("osara.cache", given)
  for k in pairs(given) do
    local want = only_for[k]
    local ok = want == nil or want == opts.type or (type(want) == "table" and want[opts.type])
    if not ok then
      options.raise(("option '%s' in osara.cache does not apply to type '%s'"):format(k, opts.type))
    end
  end
  return opts
end

-- "host:port" (or a one-item hosts list) -> host, port
local function host_port(opts, default_port)
  local hp = opts.host
  if hp == nil and type(opts.hosts) == "table" then
    if #opts.hosts > 1 then options.raise("osara.cache: redis takes one host") end
    hp = opts.hosts[1]
  end
  hp = tostring(hp or ("127.0.0.1:" .. default_port))
  local host, port = hp:match("^(.*):(%d+)$")
  if not host then host, port = hp, default_port end
  if host == "localhost" then host = "127.0.0.1" end
  return host, tonumber(port), hp
end

-- ---- backends: raw bytes under full keys ----------------------------------------
-- get(keys) -> { [key] = bytes } [, err]; set(keys, values, expire) -> true | nil, err;
-- delete(keys) -> true | nil, err

local Memory = {}
Memory.__index = Memory

function Memory:get(keys)
  local out, now = {}, timer_c.now()
  for _, k in ipairs(keys) do
    local e = self.data[k]
    if e and (e.exp == nil or e.exp > now) then out[k] = e.bytes end
  end
  return out
end

function Memory:set(keys, values, expire)
  local now = timer_c.now()
  local exp = expire and expire > 0 and now + expire or nil
  for i, k in ipairs(keys) do
    if not self.data[k] then self.count = self.count + 1 end
    self.data[k] = { bytes = values[i], exp = exp }
  end
  -- Expired entries nobody reads again: swept when the table doubled.
  if self.count >= self.sweep_at then
    for k, e in pairs(self.data) do
      if e.exp and e.exp <= now then
        self.data[k] = nil
        self.count = self.count - 1
      end
    end
    self.sweep_at = math.max(1024, 2 * self.count)
  end
  return true
end

function Memory:delete(keys)
  for _, k in ipairs(keys) do
    if self.data[k] then
      self.data[k] = nil
      self.count = self.count - 1
    end
  end
  return true
end

local Redis = {}
Redis.__index = Redis

function Redis:get(keys)
  if #keys == 1 then
    local v, err = self.c:call({ "GET", keys[1] })
    if err then return {}, err end
    return { [keys[1]] = v }
  end
  local cmd = { "MGET" }
  for i, k in ipairs(keys) do cmd[i + 1] = k end
  local r, err = self.c:call(cmd)
  if not r then return {}, err end
  local out = {}
  for i, k in ipairs(keys) do out[k] = r[i] end
  return out
end

function Redis:set(keys, values, expire)
  local ms = expire and expire > 0 and math.max(1, math.floor(expire * 1000)) or nil
  if #keys == 1 then
    local ok, err = self.c:call(ms and { "SET", keys[1], values[1], "PX", ms } or { "SET", keys[1], values[1] })
    return ok and true or nil, err
  end
  if not ms then
    local cmd = { "MSET" }
    for i, k in ipairs(keys) do cmd[2 * i], cmd[2 * i + 1] = k, values[i] end
    local ok, err = self.c:call(cmd)
    return ok and true or nil, err
  end
  local cmds = {}
  for i, k in ipairs(keys) do cmds[i] = { "SET", k, values[i], "PX", ms } end
  local ok, err = self.c:pipeline(cmds)
  return ok and true or nil, err
end

function Redis:delete(keys)
  local cmd = { "DEL" }
  for i, k in ipairs(keys) do cmd[i + 1] = k end
  local ok, err = self.c:call(cmd)
  return ok and true or nil, err
end

local Memcached = {}
Memcached.__index = Memcached

-- Errors come from libmemcached without the hosts: name them.
local function named(label, first, err)
  if err then return first, label .. ": " .. err end
  return first
end

function Memcached:get(keys) return named(self.label, self.c:get(keys)) end
function Memcached:delete(keys) return named(self.label, self.c:delete(keys)) end
function Memcached:set(keys, values, expire)
  local e = 0
  if expire and expire > 0 then
    e = math.ceil(expire)
    -- memcached reads more than 30 days as a Unix time
    if e > 30 * 24 * 3600 then e = math.floor(timer_c.now()) + e end
  end
  return named(self.label, self.c:set(keys, values, e))
end

local Store = {}
Store.__index = Store

function Store:get(keys) return self.db:get_many(keys) end
function Store:delete(keys)
  for _, k in ipairs(keys) do self.db:delete(k) end
  return true
end
function Store:set(keys, values, expire)
  local map = {}
  for i, k in ipairs(keys) do map[k] = values[i] end
  self.db:set_many(map, expire and expire > 0 and { ttl = expire } or nil)
  return true
end

local function new_backend(kind, opts)
  if kind == "memory" then
    return setmetatable({ data = {}, count = 0, sweep_at = 1024 }, Memory), "memory"
  elseif kind == "store" then
    local name = opts.name or "cache"
    local db = require("osara.store")(name, { codec = "raw" })
    return setmetatable({ db = db }, Store), "store " .. name
  elseif kind == "redis" then
    local host, port, label = host_port(opts, 6379)
    local db, timeout = tonumber(opts.db) or 0, opts.timeout or 1
    local key = ("%s:%d/%d/%s/%g"):format(host, port, db, opts.password or "", timeout)
    local c = cache_c.redis(key, host, port, db, opts.password, timeout)
    return setmetatable({ c = c }, Redis), "redis " .. label
  end
  local hosts = opts.hosts
  if type(hosts) == "string" then hosts = { hosts } end
  if type(hosts) ~= "table" or #hosts == 0 then
    options.raise("osara.cache: memcached needs hosts = { 'host:port', ... }")
  end
  local list = {}
  for i, h in ipairs(hosts) do list[i] = tostring(h):gsub("^localhost:", "127.0.0.1:") end
  local timeout = opts.timeout or 1
  local c = cache_c.memcached(table.concat(list, ",") .. "/" .. timeout, list, timeout)
  local label = "memcached " .. table.concat(list, ",")
  return setmetatable({ c = c, label = label }, Memcached), label
end

-- ---- the one interface ----------------------------------------------------------

local Cache = {}
Cache.__index = Cache

-- Up/down state per server, so a server that is down is logged once per
-- change, however many calls fail meanwhile. _failed returns the error as
-- the caller sees it.
local down = {}

function Cache:_failed(op, err)
  if err == "timeout" then err = self.label .. ": timed out" end -- the wait's own timeout
  metrics.add("osara_cache_errors_total", { type = self.type, op = op },
              "cache operations that failed (server down, timeout)")
  if not down[self.label] then
    down[self.label] = err
    log_c.write("warn", ("cache %s failing: %s (gets miss, sets are dropped until it answers)"):format(self.label, tostring(err)))
  end
  return err
end

function Cache:_ok()
  if down[self.label] then
    down[self.label] = nil
    log_c.write("info", ("cache %s answers again"):format(self.label))
  end
end

local function check_key(key)
  local t = type(key)
  if t == "number" then return tostring(key) end
  if t ~= "string" or key == "" then
    options.raise("osara.cache: keys are non-empty strings, got " .. t)
  end
  return key
end

local function check_expire(expire)
  if expire ~= nil and (type(expire) ~= "number" or expire < 0) then
    options.raise("osara.cache: expire must be a number of seconds >= 0")
  end
  return expire
end

function Cache:_encode(key, value)
  if value == nil then options.raise("osara.cache: cannot set a nil value (use delete)") end
  local bytes, err = self.codec.encode(value)
  if bytes == nil then
    options.raise(("osara.cache: cannot encode the value of '%s': %s"):format(key, tostring(err)))
  end
  return bytes
end

-- c:get_multi(keys) -> { [key] = value } (misses absent) [, err]
function Cache:get_multi(keys)
  if type(keys) ~= "table" then options.raise("osara.cache: get_multi takes a list of keys") end
  local full, seen = {}, {}
  for _, k in ipairs(keys) do
    k = check_key(k)
    if not seen[k] then
      seen[k] = true
      full[#full + 1] = self.prefix .. k
    end
  end
  if #full == 0 then return {} end
  local got, err = self.b:get(full)
  if err then err = self:_failed("get", err) else self:_ok() end
  local out, np = {}, #self.prefix
  for fk, bytes in pairs(got or {}) do
    local v, derr = self.codec.decode(bytes)
    if v ~= nil then
      out[fk:sub(np + 1)] = v
    elseif derr then
      metrics.add("osara_cache_errors_total", { type = self.type, op = "decode" },
                  "cache operations that failed (server down, timeout)")
    end
  end
  return out, err
end

-- c:get(key) -> value | nil [, err]
function Cache:get(key)
  key = check_key(key)
  local out, err = self:get_multi({ key })
  return out[key], err
end

-- c:set_multi({ [key] = value }, expire) -> true | nil, err
function Cache:set_multi(map, expire)
  if type(map) ~= "table" then options.raise("osara.cache: set_multi takes a table of key = value") end
  check_expire(expire)
  local keys, values = {}, {}
  for k, v in pairs(map) do
    k = check_key(k)
    keys[#keys + 1] = self.prefix .. k
    values[#values + 1] = self:_encode(k, v)
  end
  if #keys == 0 then return true end
  return self:_outcome("set", self.b:set(keys, values, expire))
end

-- Counts and logs a failed write (then nil, err), or notes the server answers.
function Cache:_outcome(op, ok, err)
  if not ok then
    return nil, self:_failed(op, err)
  end
  self:_ok()
  return true
end

-- c:set(key, value, expire) -> true | nil, err
function Cache:set(key, value, expire)
  key = check_key(key)
  check_expire(expire)
  return self:_outcome("set", self.b:set({ self.prefix .. key }, { self:_encode(key, value) }, expire))
end

-- c:delete_multi(keys) -> true | nil, err
function Cache:delete_multi(keys)
  if type(keys) ~= "table" then options.raise("osara.cache: delete_multi takes a list of keys") end
  local full = {}
  for i, k in ipairs(keys) do full[i] = self.prefix .. check_key(k) end
  if #full == 0 then return true end
  return self:_outcome("delete", self.b:delete(full))
end

function Cache:delete(key)
  return self:delete_multi({ check_key(key) })
end

-- ---- construction ----------------------------------------------------------------

local named = {} -- caches built from config.yaml, by name (one per script version)

local function new(opts)
  if type(opts) == "string" then
    local name = opts
    if named[name] then return named[name] end
    local c = new(require("osara.config").section("cache", name))
    c.name = name
    named[name] = c
    return c
  end
  if type(opts) ~= "table" then
    options.raise("osara.cache: expected a table of options or a name from config.yaml")
  end
  opts = check_options(opts)
  local kind = opts.type
  local b, label = new_backend(kind, opts)
  return setmetatable({ type = kind, b = b, label = label, prefix = opts.prefix or "",
                        codec = codec.get(opts.codec or "json") }, Cache)
end

-- A cache over an osara.store handle, values kept as the store encodes them
-- (osara.cached{store = db}, from before caches existed).
local passthrough = { name = "store", encode = function(v) return v end, decode = function(v) return v end }
function M.wrap_store(db)
  return setmetatable({ type = "store", b = setmetatable({ db = db }, Store), label = "store " .. db.name,
                        prefix = "", codec = passthrough }, Cache)
end

-- ---- containers (kata's Simple and Attribute) --------------------------------------
-- One pull per key at a time (single flight): a cold get that finds the key
-- being pulled by another coroutine waits for that pull's result.

local sched = require "osara.sched_c"

local Cached = {}
Cached.__index = Cached

-- attribute = { Table, "column" }: pull_many through Table:get_in(column, items)
local function attribute_pull(attr)
  local tbl, col = attr[1], attr[2]
  if type(tbl) ~= "table" or type(col) ~= "string" then
    options.raise("osara.cached: attribute = { Table, 'column' }")
  end
  return function(items)
    local rows = tbl:get_in(col, items)
    local by = {}
    for _, row in ipairs(rows or {}) do by[tostring(row[col])] = row end
    local out = {}
    for _, item in ipairs(items) do out[item] = by[tostring(item)] end
    return out
  end
end

local function container_cache(opts)
  if opts.cache ~= nil then
    if type(opts.cache) == "string" then return new(opts.cache) end
    return opts.cache
  end
  local s = opts.store
  if type(s) == "string" and s ~= "memory" then
    options.raise("option 'store' in osara.cached must be an osara.store or \"memory\", got \"" .. s .. "\"")
  end
  if s ~= nil and s ~= "memory" then return M.wrap_store(s) end
  return new({ type = "memory" })
end

-- osara.cached{ cache = c | "name", key = fn(...) -> key, expire = s,
--               pull = fn(...) -> value | pull_many = fn(items) -> { [item] = value }
--               | attribute = { Table, "column" } }
function M.cached(opts)
  opts = options.check("osara.cached", opts)
  local pull_many = opts.pull_many or (opts.attribute and attribute_pull(opts.attribute))
  if type(opts.pull) ~= "function" and type(pull_many) ~= "function" then
    options.raise("osara.cached: pull (or pull_many, or attribute) required")
  end
  return setmetatable({ cache = container_cache(opts), key = opts.key or tostring,
                        expire = opts.expire or opts.ttl, pull = opts.pull, pull_many = pull_many,
                        flights = {}, pulls = 0 }, Cached)
end

-- Waits for another coroutine's pull of the same key: ok, value.
local function join_flight(f)
  if not f.done then
    local token, seq = sched.current()
    if not token then return nil end -- cannot wait here: pull again
    f.waiters[#f.waiters + 1] = { token, seq }
    sched.park()
  end
  return f.ok, f.value
end

local function land_flights(self, flights, ok, values)
  for k, f in pairs(flights) do
    self.flights[k] = nil
    f.done, f.ok = true, ok
    f.value = ok and values[k] or values
    for _, w in ipairs(f.waiters) do sched.wake(w[1], w[2]) end
  end
end

-- Pulls the items (a list, keys[i] = key of items[i]) this coroutine owns,
-- stores what came back and lands their flights. Returns { [key] = value }.
function Cached:_pull(items, keys, pull_many)
  local flights = {}
  for _, k in ipairs(keys) do
    flights[k] = { waiters = {} }
    self.flights[k] = flights[k]
  end
  self.pulls = self.pulls + #items
  local ok, got = pcall(function()
    if pull_many then return pull_many(items) end
    local out = {}
    for i, item in ipairs(items) do out[item] = self.pull(item) end
    return out
  end)
  local by_key = {}
  if ok then
    for i, item in ipairs(items) do by_key[keys[i]] = (got or {})[item] end
    if next(by_key) then self.cache:set_multi(by_key, self.expire) end
  end
  land_flights(self, flights, ok, ok and by_key or got)
  if not ok then error(got, 0) end
  return by_key
end

-- c:get(...) -> value: the cached value, or pull(...) stored with expire.
-- A container built with pull_many/attribute takes a list: c:get(items).
function Cached:get(...)
  if not self.pull then return self:get_many(...) end
  local k = tostring(self.key(...))
  local v = self.cache:get(k)
  if v ~= nil then return v end
  local f = self.flights[k]
  if f then
    local ok, value = join_flight(f)
    if ok then return value end
    if ok == false then error(value, 0) end
  end
  local flights = { [k] = { waiters = {} } }
  self.flights[k] = flights[k]
  self.pulls = self.pulls + 1
  local res = { pcall(self.pull, ...) }
  if res[1] and res[2] ~= nil then self.cache:set(k, res[2], self.expire) end
  land_flights(self, flights, res[1], res[1] and { [k] = res[2] } or res[2])
  if not res[1] then error(res[2], 0) end
  return res[2]
end

-- c:get_many(items [, pull_many]) -> values in the order asked (nil where
-- nothing was found): one get_multi, then one pull of the misses only.
function Cached:get_many(items, pull_many)
  if type(items) ~= "table" then options.raise("osara.cached: get_many takes a list") end
  pull_many = pull_many or self.pull_many
  local keys = {}
  for i, item in ipairs(items) do keys[i] = tostring(self.key(item)) end
  local got = self.cache:get_multi(keys)
  local out, mine, mine_keys, theirs, claimed = {}, {}, {}, {}, {}
  for i, k in ipairs(keys) do
    if got[k] ~= nil then
      out[i] = got[k]
    elseif self.flights[k] then
      theirs[#theirs + 1] = { i, self.flights[k] }
    elseif not claimed[k] then
      claimed[k] = true
      mine[#mine + 1], mine_keys[#mine_keys + 1] = items[i], k
    end
  end
  local pulled = #mine > 0 and self:_pull(mine, mine_keys, pull_many) or {}
  for i, k in ipairs(keys) do
    if out[i] == nil and pulled[k] ~= nil then out[i] = pulled[k] end
  end
  for _, t in ipairs(theirs) do
    local ok, value = join_flight(t[2])
    if ok then out[t[1]] = value end
  end
  return out
end

-- c:dirty(...) forgets the value, so the next get pulls again; a container
-- built with pull_many/attribute takes a list: c:dirty(items).
function Cached:dirty(...)
  if not self.pull then
    local items = ...
    local keys = {}
    for i, item in ipairs(items) do keys[i] = tostring(self.key(item)) end
    return self.cache:delete_multi(keys)
  end
  return self.cache:delete(tostring(self.key(...)))
end

setmetatable(M, { __call = function(_, opts) return new(opts) end })

M.Cache = Cache
return M
