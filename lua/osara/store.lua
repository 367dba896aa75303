-- osara.store: durable named stores on LMDB (host/store/store.c), an in-memory
-- variant with the same API, transactions, TTL, change feeds, and the
-- cache-aside helper osara.cached. See docs/store.md.
local store_c = require "osara.store_c"
local timer_c = require "osara.timer_c"
local vm_c = require "osara.vm_c"
local sched = require "osara.sched_c"
local codec = require "osara.codec"
local metrics = require "osara.metrics_c"
local options = require "osara.options"

local M = {}
local Store = {}
Store.__index = Store

local function expiry(opts)
  local ttl = opts and options.check("store:set", opts).ttl
  if ttl == nil then return 0 end
  if ttl <= 0 then options.raise("store: ttl must be a number of seconds > 0") end
  return (timer_c.now() + ttl) * 1000
end

-- LMDB's key limit (MDB_MAXKEYSIZE in Debian's liblmdb): checked here, so
-- a write names the size instead of failing at commit with MDB_BAD_VALSIZE.
local MAX_KEY = 511

local function check_key(key)
  if type(key) ~= "string" or key == "" then
    options.raise("store: keys are non-empty strings, got " .. type(key))
  end
  if #key > MAX_KEY then
    options.raise(("store: key of %d bytes (keys are 1 to %d bytes)"):format(#key, MAX_KEY))
  end
end

-- ---- backends: LMDB and memory share one small interface ----------------------

local Memory = {}
Memory.__index = Memory

local function mem_live(e, now)
  return e and (e.exp == 0 or e.exp > now)
end

function Memory:get(key)
  local e = self.data[key]
  if mem_live(e, timer_c.now() * 1000) then return e.bytes end
  return nil
end

function Memory:commit(ops, db2, ops2)
  if db2 and ops2 then db2:commit(ops2) end -- another memory store (check mode's offsets)
  for _, op in ipairs(ops) do
    if op[2] then
      if not self.data[op[1]] then self.sorted = nil end
      self.data[op[1]] = { bytes = op[2], exp = op[3] }
    elseif self.data[op[1]] then
      self.data[op[1]] = nil
      self.sorted = nil
    end
  end
  return true
end

function Memory:range(prefix, after, limit, keys_only)
  if not self.sorted then
    local keys = {}
    for k in pairs(self.data) do keys[#keys + 1] = k end
    table.sort(keys)
    self.sorted = keys
  end
  local out, n, now = {}, 0, timer_c.now() * 1000
  for _, k in ipairs(self.sorted) do
    if n >= limit then break end
    if (not after or k > after) and k:sub(1, #prefix) == prefix then
      local e = self.data[k]
      if mem_live(e, now) then
        out[2 * n + 1] = k
        out[2 * n + 2] = keys_only and true or e.bytes
        n = n + 1
      end
    end
  end
  return out
end

function Memory:sweep()
  local now, removed = timer_c.now() * 1000, 0
  for k, e in pairs(self.data) do
    if not mem_live(e, now) then
      self.data[k] = nil
      removed = removed + 1
    end
  end
  if removed > 0 then self.sorted = nil end
  return removed
end

local Lmdb = {}
Lmdb.__index = Lmdb
function Lmdb:get(key) return store_c.get(self.db, key) end
function Lmdb:commit(ops, db2, ops2)
  if type(db2) == "table" then db2 = db2.db end -- another store, or a raw C db
  return store_c.commit(self.db, ops, db2, ops2)
end
function Lmdb:range(prefix, after, limit, keys_only) return store_c.range(self.db, prefix, after, limit, keys_only) end
function Lmdb:sweep() return store_c.sweep(self.db) end

-- ---- opening -----------------------------------------------------------------

local memories = {} -- memory stores by name, shared within this script version
local sweepers = {} -- one sweep timer per store (per data folder and name)

-- Background sweep of expired keys (they are already invisible to reads):
-- one timer per store, however often it is opened (a handler may open it
-- for every message), at the first opening's interval.
local function start_sweeper(key, backend, seconds, name)
  if sweepers[key] then return end
  sweepers[key] = timer_c.new(seconds, function() backend:sweep() end, true, nil, "store " .. name .. " sweep")
end

-- osara.store(name, {codec=, memory=, sweep=, dir=}) -> store
-- dir: another data folder than --data (tests).
local function open(name, opts)
  if type(name) ~= "string" or not name:match("^[%w_.%-]+$") then
    options.raise("osara.store: name must be letters, digits, '_', '.', '-'")
  end
  opts = options.check("osara.store", opts)
  local dir = opts.dir or vm_c.paths().data_dir
  local backend
  -- osara check writes nothing to disk: a store written at load lives in
  -- memory. osara.testing also reports "check" but keeps real stores, in
  -- its own fresh data folder, so exactly-once replays behave as in a run.
  local checking = vm_c.mode() == "check" and not package.loaded["osara.testing"]
  if opts.memory or checking then
    backend = memories[name] or setmetatable({ data = {} }, Memory)
    memories[name] = backend
  else
    local ok, db = pcall(store_c.open, dir, name)
    if not ok then options.raise(tostring(db):gsub("^[^:]*:%d+: ", "")) end
    backend = setmetatable({ db = db }, Lmdb)
  end
  local s = setmetatable({ name = name, b = backend, codec = codec.get(opts.codec),
                           watchers = {}, locks = {}, memory = opts.memory, dir = dir }, Store)
  start_sweeper((opts.memory and "memory" or dir) .. "|" .. name, backend, opts.sweep, name)
  return s
end

setmetatable(M, { __call = function(_, name, opts) return open(name, opts) end })

-- ---- reads and writes ----------------------------------------------------------------

function Store:_decode(bytes)
  if bytes == nil then return nil end
  local v, err = self.codec.decode(bytes)
  if v == nil and err then error(("store %s: cannot decode a value: %s"):format(self.name, err), 3) end
  return v
end

function Store:_encode(value)
  local bytes, err = self.codec.encode(value)
  if bytes == nil then error(("store %s: cannot encode the value: %s"):format(self.name, err), 3) end
  return bytes
end

function Store:get(key)
  check_key(key)
  return self:_decode(self.b:get(key))
end

function Store:has(key)
  check_key(key)
  return self.b:get(key) ~= nil
end

-- Commits ops and tells the watchers (after the commit is durable).
function Store:_commit(ops, changes, db2, ops2)
  local ok, err = self.b:commit(ops, db2, ops2)
  if not ok then return nil, err end
  if next(self.watchers) then
    for _, c in ipairs(changes) do self:_notify(c[1], c[2]) end
  end
  return true
end

function Store:set(key, value, opts)
  check_key(key)
  local ok, err = self:_commit({ { key, self:_encode(value), expiry(opts) } }, { { key, value } })
  if not ok then error(err, 2) end
  return true
end

function Store:delete(key)
  check_key(key)
  local ok, err = self:_commit({ { key, false, 0 } }, { { key, nil } })
  if not ok then error(err, 2) end
  return true
end

function Store:get_many(keys)
  local out = {}
  for _, k in ipairs(keys) do out[k] = self:get(k) end
  return out
end

function Store:set_many(map, opts)
  local ops, changes, exp = {}, {}, expiry(opts)
  for k, v in pairs(map) do
    check_key(k)
    ops[#ops + 1] = { k, self:_encode(v), exp }
    changes[#changes + 1] = { k, v }
  end
  local ok, err = self:_commit(ops, changes)
  if not ok then error(err, 2) end
  return true
end

-- for key, value in db:pairs(prefix) do ... end  (key order; batched reads,
-- so the loop may yield between items)
function Store:pairs(prefix, opts)
  prefix = prefix or ""
  local batch, i, after, done = {}, 0, nil, false
  local keys_only = opts and options.check("store:pairs", opts).keys_only
  return function()
    i = i + 2
    if batch[i - 1] == nil then
      if done then return nil end
      batch = self.b:range(prefix, after, 256, keys_only)
      i = 2
      if batch[1] == nil then done = true return nil end
      if #batch < 512 then done = true end
      after = batch[#batch - 1]
    end
    local k = batch[i - 1]
    if keys_only then return k end
    return k, self:_decode(batch[i])
  end
end

function Store:count(prefix)
  local n = 0
  for _ in self:pairs(prefix, { keys_only = true }) do n = n + 1 end
  return n
end

function Store:clear(prefix)
  local ops, changes = {}, {}
  for k in self:pairs(prefix, { keys_only = true }) do
    ops[#ops + 1] = { k, false, 0 }
    changes[#changes + 1] = { k, nil }
  end
  if #ops > 0 then
    local ok, err = self:_commit(ops, changes)
    if not ok then error(err, 2) end
  end
  return #ops
end

-- ---- transactions --------------------------------------------------------------------

local Tx = {}
Tx.__index = Tx

function Tx:get(key)
  check_key(key)
  local w = self.writes[key]
  if w ~= nil then
    if w.deleted then return nil end
    return w.value
  end
  local bytes = self.store.b:get(key)
  if self.reads[key] == nil then self.reads[key] = bytes or false end -- what the commit checks
  return self.store:_decode(bytes)
end

function Tx:has(key) return self:get(key) ~= nil end

function Tx:set(key, value, opts)
  check_key(key)
  if self.writes[key] == nil then self.order[#self.order + 1] = key end
  self.writes[key] = { value = value, bytes = self.store:_encode(value), exp = expiry(opts) }
end

function Tx:delete(key)
  check_key(key)
  if self.writes[key] == nil then self.order[#self.order + 1] = key end
  self.writes[key] = { deleted = true }
end

function Tx:_ops()
  local ops, changes = {}, {}
  for _, k in ipairs(self.order) do
    local w = self.writes[k]
    ops[#ops + 1] = { k, w.deleted and false or w.bytes, w.exp or 0 }
    changes[#changes + 1] = { k, (not w.deleted) and w.value or nil }
  end
  return ops, changes
end

-- Per-key lock: waiters park in order; released on commit or rollback.
function Store:_lock(key)
  local q = self.locks[key]
  if not q then
    self.locks[key] = {}
    return
  end
  local token, seq = sched.current()
  if not token then error("store: a keyed transaction waits; run it in a handler or task", 3) end
  q[#q + 1] = { token, seq }
  sched.park()
end

function Store:_unlock(key)
  local q = self.locks[key]
  if not q then return end
  local nxt = table.remove(q, 1)
  if nxt then
    sched.wake(nxt[1], nxt[2])
  else
    self.locks[key] = nil
  end
end

-- db:begin() -> tx: a transaction committed explicitly with
-- db:commit(tx [, other_store, other_ops]) (the Kafka exactly-once path
-- commits the input's offset in the same LMDB transaction).
function Store:begin()
  return setmetatable({ store = self, writes = {}, order = {}, reads = {} }, Tx)
end

-- What a commit returns for a transaction that read a key another one
-- changed since: nothing of it was written; run it again from the start.
M.CONFLICT = "store: conflict: a key this transaction read was changed by another"

-- Optimistic isolation: a transaction commits only if every key it read
-- still holds what it read, in the store and in the commits queued ahead
-- of it (pending). Otherwise it would overwrite what it never saw.
function Store:_conflict(tx, pending)
  for k, bytes in pairs(tx.reads) do
    if (pending and pending[k]) or (self.b:get(k) or false) ~= bytes then
      metrics.add("osara_store_tx_retries_total", { store = self.name },
        "transactions run again because a key they read was changed by another")
      return true
    end
  end
  return false
end

-- nil when tx may commit now; else M.CONFLICT, once the commits queued
-- ahead of it are durable (its next run reads them, instead of conflicting
-- again with the same pending writes).
function Store:_check(tx)
  local g = self.group
  if not self:_conflict(tx, g and g.keys) then return nil end
  local token, seq = sched.current()
  if g and token then
    g.waiters[#g.waiters + 1] = { token, seq }
    sched.park()
  end
  return M.CONFLICT
end

function Store:commit(tx, db2, ops2)
  local conflict = self:_check(tx)
  if conflict then return nil, conflict end
  local ops, changes = tx:_ops()
  if #ops == 0 and not ops2 then return true end
  return self:_commit(ops, changes, db2, ops2)
end

-- db:commit_grouped(tx, other_store, other_ops) -> true | nil, err: like
-- commit, but the commits queued during one loop turn share one LMDB write
-- transaction - one fsync - and each caller is parked until it is durable.
-- A transaction that read a key changed since (committed, or queued in the
-- group) is not written: nil, M.CONFLICT, and the caller runs it again (the
-- Kafka exactly-once path does, counted in osara_store_tx_retries_total).
function Store:commit_grouped(tx, db2, ops2)
  local token, seq = sched.current()
  if not token then return self:commit(tx, db2, ops2) end
  local g = self.group
  if g and g.db2 ~= db2 then return self:commit(tx, db2, ops2) end
  local conflict = self:_check(tx)
  if conflict then return nil, conflict end
  if not g then
    g = { ops = {}, changes = {}, ops2 = {}, db2 = db2, waiters = {}, keys = {} }
    -- A task, not a timer: it also runs in a script version that is
    -- retiring after a reload, whose in-flight handlers wait for it.
    local started = sched.spawn(function()
      sched.yield() -- the rest of this loop turn joins the group
      self.group = nil
      local ok, err = self:_commit(g.ops, g.changes, g.db2, g.db2 and g.ops2)
      for _, w in ipairs(g.waiters) do sched.wake(w[1], w[2], ok, err) end
    end)
    if not started then return self:commit(tx, db2, ops2) end -- shutting down
    self.group = g
  end
  local ops, changes = tx:_ops()
  for _, op in ipairs(ops) do
    g.ops[#g.ops + 1] = op
    g.keys[op[1]] = true
  end
  for _, c in ipairs(changes) do g.changes[#g.changes + 1] = c end
  for _, op in ipairs(ops2 or {}) do g.ops2[#g.ops2 + 1] = op end
  g.waiters[#g.waiters + 1] = { token, seq }
  return sched.park()
end

-- db:transaction(fn) / db:transaction(key, fn) -> fn's results | nil, err
-- Writes are buffered and applied in one LMDB write transaction when fn
-- returns; an error in fn rolls back (nothing is written). With a key,
-- transactions on the same key run one after the other.
function Store:transaction(key, fn)
  if fn == nil then key, fn = nil, key end
  if type(fn) ~= "function" then error("store:transaction: expected a function", 2) end
  if key ~= nil then
    check_key(key)
    self:_lock(key)
  end
  local tx = setmetatable({ store = self, writes = {}, order = {}, reads = {} }, Tx)
  local res = { pcall(fn, tx) }
  local ok, err = res[1], res[2]
  if ok then
    local ops, changes = tx:_ops()
    if #ops > 0 then
      ok, err = self:_commit(ops, changes, tx.db2, tx.ops2)
    end
  end
  if key ~= nil then self:_unlock(key) end
  if not ok then
    metrics.add("osara_store_rollbacks_total", { store = self.name }, "transactions rolled back")
    return nil, tostring(err)
  end
  if #res == 1 then return true end
  return unpack(res, 2, table.maxn(res))
end

-- ---- change feed ------------------------------------------------------------------------

function Store:_notify(key, value)
  for w in pairs(self.watchers) do
    if key:sub(1, #w.prefix) == w.prefix then
      if #w.queue >= w.limit then
        table.remove(w.queue, 1) -- slow watcher: drop the oldest, count it
        metrics.add("osara_store_watch_dropped_total", { store = self.name }, "changes dropped for slow watchers")
      end
      w.queue[#w.queue + 1] = { key, value }
      if w.waiting then
        local t = w.waiting
        w.waiting = nil
        sched.wake(t[1], t[2])
      end
    end
  end
end

-- for key, value in db:watch(prefix) do ... end: each committed change
-- (value nil for a delete), after it is durable. Keeps at most opts.limit
-- (1000) undelivered changes, dropping the oldest. w:close() stops it.
function Store:watch(prefix, opts)
  local w = { prefix = prefix or "", queue = {}, limit = options.check("store:watch", opts).limit }
  self.watchers[w] = true
  local store = self
  local iter = setmetatable({}, {
    __call = function()
      while #w.queue == 0 do
        if w.closed then return nil end
        local token, seq = sched.current()
        if not token then error("store:watch: iterate inside a handler or task", 2) end
        w.waiting = { token, seq }
        sched.park()
      end
      local c = table.remove(w.queue, 1)
      return c[1], c[2]
    end,
    __index = {
      close = function()
        w.closed = true
        store.watchers[w] = nil
        if w.waiting then
          local t = w.waiting
          w.waiting = nil
          sched.wake(t[1], t[2])
        end
      end,
    },
  })
  return iter
end

-- ---- cache-aside (kata's containers) -------------------------------------------------------

-- osara.cached{store = db | "memory", ...}: the containers live in
-- osara.cache (over any cache, with single flight); kept here for the
-- callers of store.cached.
function M.cached(opts)
  return require("osara.cache").cached(opts)
end

M.open = open
return M
