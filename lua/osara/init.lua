-- osara: the public Lua API. C gives the primitives (osara.*_c modules),
-- this module gives the surface: defaults, names, convenience. Broker,
-- store, HTTP and schema areas load lazily on first use (osara.kafka, ...).
local util = require "osara.util"
local where, signature = util.where, util.signature
local vm_c = require "osara.vm_c"
local sched_c = require "osara.sched_c"
local timer_c = require "osara.timer_c"
local log_c = require "osara.log_c"
local metrics_c = require "osara.metrics_c"
local options = require "osara.options"

local osara = { version = "0.1.0" }

-- Areas implemented in their own modules, loaded on first access.
local lazy = {
  kafka = "osara.kafka",
  nats = "osara.nats",
  amqp = "osara.amqp",
  store = "osara.store",
  http = "osara.http",
  schema = "osara.schema",
  codec = "osara.codec",
  testing = "osara.testing",
  cache = "osara.cache",
  sql = "osara.sql",
  rpc = "osara.rpc",
}

-- osara.process: the C module, with spawn's options checked first.
local function process_module()
  local process_c = require "osara.process_c"
  return setmetatable({
    spawn = function(opts) return process_c.spawn(options.check("osara.process.spawn", opts)) end,
  }, { __index = process_c })
end

-- Schema type constructors at the top level: osara.number{min=0}, ...
local schema_names = { number = true, integer = true, string = true, boolean = true,
                       array = true, map = true, optional = true, nullable = true,
                       enum = true, any = true, field = true }

-- Limits of this script's handlers, in seconds (0 or false: off); read
-- and set as osara.runaway_timeout = 2 (host/core/sched_limits.c).
local limits = { runaway_timeout = true, handler_timeout = true, slow_handler_warning = true }

local function set_limit(k, v)
  if v == false then v = 0 end
  if type(v) ~= "number" or v ~= v or v < 0 then
    options.raise(("osara.%s must be seconds (a number >= 0) or false, got %s"):format(k, tostring(v)))
  end
  sched_c.limit(k, v)
end

setmetatable(osara, {
  __newindex = function(t, k, v)
    if limits[k] then return set_limit(k, v) end
    rawset(t, k, v)
  end,
  __index = function(t, k)
    if limits[k] then
      local v = sched_c.limit(k)
      return v > 0 and v or false
    end
    if k == "route" or k == "resource" or k == "response" or k == "sse" then
      local v = require("osara.http")[k]
      rawset(t, k, v)
      return v
    end
    if k == "config" then
      return require("osara.config").data() -- per script version, not cached here
    end
    if k == "serialize" or k == "null" then
      local v = require("osara.sql")[k]
      rawset(t, k, v)
      return v
    end
    if k == "process" then
      local v = process_module()
      rawset(t, k, v)
      return v
    end
    if k == "cached" then
      local v = require("osara.cache").cached
      rawset(t, k, v)
      return v
    end
    if schema_names[k] then
      local v = require("osara.schema")[k]
      rawset(t, k, v)
      return v
    end
    local name = lazy[k]
    if name then
      local m = require(name)
      rawset(t, k, m)
      return m
    end
    return nil
  end,
})

osara._where = where

osara.now = timer_c.now
osara.monotonic = timer_c.monotonic
osara.sleep = timer_c.sleep
osara.yield = sched_c.yield

function osara.mode()
  return vm_c.mode()
end

function osara.paths()
  return vm_c.paths()
end

-- Timers registered at load get stable keys, so a reload keeps them
-- running when the interval and order are unchanged.
local ordinals = {}
local function timer_key(kind, seconds, opts)
  if opts and opts.name then
    return kind .. " " .. opts.name
  end
  local base = ("%s %g"):format(kind, seconds)
  ordinals[base] = (ordinals[base] or 0) + 1
  return ("%s #%d"):format(base, ordinals[base])
end

local function check_timer_args(name, seconds, fn, opts)
  if type(seconds) ~= "number" or seconds ~= seconds or seconds < 0 then
    options.raise(("osara.%s: seconds must be a number >= 0, got %s"):format(name, tostring(seconds)))
  end
  if type(fn) ~= "function" then
    options.raise(("osara.%s: expected a function as argument 2, got %s"):format(name, type(fn)))
  end
  return options.check("osara." .. name, opts)
end

-- osara.every(seconds, fn [, {name=}]) -> handle with :cancel()
function osara.every(seconds, fn, opts)
  opts = check_timer_args("every", seconds, fn, opts)
  if seconds == 0 then
    options.raise("osara.every: seconds must be > 0")
  end
  local key = vm_c.loading() and timer_key("every", seconds, opts) or nil
  return timer_c.new(seconds, fn, true, key, where(2))
end

-- osara.after(seconds, fn [, {name=}]) -> handle with :cancel()
function osara.after(seconds, fn, opts)
  opts = check_timer_args("after", seconds, fn, opts)
  local key = vm_c.loading() and timer_key("after", seconds, opts) or nil
  return timer_c.new(seconds, fn, false, key, where(2))
end

-- osara.spawn(fn, ...) starts a background task (panini's @app.task).
-- Called while the script loads, the task starts once the script's
-- handlers are subscribed (on the next loop turn), as a service of that
-- version of the script.
-- osara.middleware{ before =, after =, client =, direction = } (lua/osara/middleware.lua)
osara.middleware = require("osara.middleware").add

function osara.spawn(fn, ...)
  if type(fn) ~= "function" then
    error("osara.spawn: expected a function, got " .. type(fn), 2)
  end
  if vm_c.loading() then
    local args = { n = select("#", ...), ... }
    timer_c.new(0, function()
      sched_c.spawn_service(fn, unpack(args, 1, args.n))
    end, false, nil, where(2))
    return true
  end
  return sched_c.spawn(fn, ...)
end

-- osara.on_start(fn) / osara.on_stop(fn): start-up and shutdown hooks
-- (osara.lifecycle says when they run).
function osara.on_start(fn) require("osara.lifecycle").on_start(fn) end
function osara.on_stop(fn) require("osara.lifecycle").on_stop(fn) end

-- How many arguments a format string takes ("%%" takes none).
local function format_args(fmt)
  local _, n = fmt:gsub("%%%%", ""):gsub("%%[-+ #0]*%d*%.?%d*%a", "")
  return n
end

-- Logging: osara.log.info("x=%d", x [, fields]); one C logger for host and
-- scripts. A table after the format's arguments holds fields: text lines
-- append them as k=v, JSON lines as fields, with where (file:line) and the
-- running handler's context (topic, offset, route...).
local LEVEL_RANK = { debug = 1, info = 2, warn = 3, error = 4, off = 5 }

-- A logger's function for one level. name: a named logger's name (a
-- `logger` field on each line); min: its own level, if it has one.
local function make_logger(level, name, min)
  local own_fields = name and { logger = name }
  return function(fmt, ...)
    local forced = false
    if min then
      if LEVEL_RANK[level] < LEVEL_RANK[min] then return end
      forced = true
    elseif not log_c.enabled(level) then
      return
    end
    fmt = tostring(fmt)
    local n, fields = select("#", ...), nil
    if n > 0 and type((select(n, ...))) == "table" and format_args(fmt) < n then
      fields = select(n, ...)
    end
    local msg = fmt
    if n > 0 and (n > 1 or not fields) then
      local ok, s = pcall(string.format, fmt, ...)
      msg = ok and s or (fmt .. " (bad log format: " .. s .. ")")
    end
    if own_fields then
      if fields then
        local merged = { logger = name }
        for k, v in pairs(fields) do merged[k] = v end
        fields = merged
      else
        fields = own_fields
      end
    end
    log_c.write(level, msg, fields, util.log_context(), where(2), nil, forced)
  end
end

local function new_logger(name, min)
  return {
    name = name,
    debug = make_logger("debug", name, min),
    info = make_logger("info", name, min),
    warn = make_logger("warn", name, min),
    error = make_logger("error", name, min),
  }
end

osara.log = new_logger(nil, nil)
osara.log.level = log_c.level

-- osara.log.get(name [, {level=}]) -> a named logger (panini's get_logger):
-- its name is a `logger` field on every line (text: logger=name; JSON: a
-- field). Its level: opts.level, else config.yaml's log.levels.<name>, else
-- the process-wide --log-level. The same name gives the same logger.
local named = {}
function osara.log.get(name, opts)
  if type(name) ~= "string" or name == "" then
    options.raise("osara.log.get: expected a logger name")
  end
  opts = options.check("osara.log.get", opts)
  local min = opts.level
  if min == nil then
    local cfg = require("osara.config").data()
    local levels = type(cfg.log) == "table" and cfg.log.levels
    min = type(levels) == "table" and levels[name] or nil
    if min ~= nil and not LEVEL_RANK[min] then
      options.raise(("config: log.levels.%s: unknown level '%s' (debug, info, warn, error, off)"):format(name, tostring(min)))
    end
  end
  local key = name .. "|" .. tostring(min)
  named[key] = named[key] or new_logger(name, min)
  return named[key]
end

-- Metrics kept in C (exposed by the HTTP server's /metrics).
local function series(kind)
  return function(name, labels, help)
    local s = { name = name, labels = labels, help = help }
    if kind == "counter" then
      function s:inc(n) metrics_c.add(name, labels, help, n or 1) end
    elseif kind == "gauge" then
      function s:set(v) metrics_c.set(name, labels, help, v) end
    else
      function s:observe(v) metrics_c.observe(name, labels, help, v) end
    end
    function s:value() return metrics_c.value(name, labels) end
    return s
  end
end

osara.metrics = {
  counter = series("counter"),
  gauge = series("gauge"),
  histogram = series("histogram"),
  value = metrics_c.value,
  render = metrics_c.render,
}

-- Low-level scheduling for modules built on top (request/reply, locks).
osara._sched = sched_c
osara._vm = vm_c

return osara
