-- The host itself, driven as a child process: loading, errors, reload,
-- check, shutdown. Each spec writes its app into a temp folder.
local H = require "spec.helpers.host"

describe("osara run", function()
  after_each(H.cleanup)

  it("logs an error in a timer with file:line and keeps running", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local n = 0
osara.every(0.05, function()
  n = n + 1
  if n == 2 then error("boom") end
  osara.log.info("tick %d", n)
end)
]])
    local p = H.osara({ "run", dir .. "/app.lua" }, nil, { errors = { "error in timer at .*: boom" } })
    local line = H.expect(p, "boom")
    assert.matches("error in timer at .*app.lua:3: .*app.lua:5: boom", line)
    H.expect(p, "tick 4")
    H.stop(p)
  end)

  it("stops gracefully on SIGTERM, letting an in-flight sleep finish", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
osara.after(0, function()
  osara.log.info("tick sleeping")
  osara.sleep(0.5)
  osara.log.info("tick finished")
end)
]])
    local p = H.osara { "run", dir .. "/app.lua" }
    H.expect(p, "tick sleeping")
    p:kill("TERM")
    H.expect(p, "tick finished")
    H.finish(p)
  end)

  it("cancels work still running after the grace period and exits 0", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
osara.after(0, function() osara.log.info("forever") osara.sleep(3600) end)
]])
    local p = H.osara { "run", "--grace", "0.2", dir .. "/app.lua" }
    H.expect(p, "forever")
    p:kill("TERM")
    H.expect(p, "after the 0.2s grace period")
    H.finish(p)
  end)

  it("rejects assignment to an undeclared global with file:line", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", "local osara = require 'osara'\ncounter = 1\n")
    local status, out = H.run({ "run", dir .. "/app.lua" }, nil, nil, { errors = { "undeclared global 'counter'" } })
    assert.are.equal(1, status)
    assert.matches("app.lua:2: assignment to undeclared global 'counter'", out)
  end)

  it("lets modules from the system path set globals; the user's own files stay strict", function()
    local dir = H.tmpdir()
    assert(os.execute("mkdir -p " .. dir .. "/lib " .. dir .. "/app") == 0)
    H.write(dir .. "/lib/globby.lua", "globby = { answer = 42 }\nreturn globby\n")
    H.write(dir .. "/app/app.lua", [[
local osara = require "osara"
local lyaml = require "lyaml"                 -- Debian's lua-yaml sets the global 'yaml'
local globby = require "globby"
osara.log.info("yaml %s globby %s", lyaml.load("a: 7").a, globby.answer)
local ok, err = pcall(require, "leaky")       -- a user module in the script folder
osara.log.info("leaky %s %s", tostring(ok), tostring(err))
osara.after(0, function() osara.log.info("done") end)
]])
    H.write(dir .. "/app/leaky.lua", "leaked = true\nreturn {}\n")
    local p = H.osara({ "run", dir .. "/app/app.lua" }, { LUA_PATH = dir .. "/lib/?.lua;;" })
    H.expect(p, "yaml 7 globby 42")
    assert.matches("leaky false .*leaky.lua:1: assignment to undeclared global 'leaked'", H.expect(p, "leaky "))
    H.expect(p, "done")
    H.stop(p)
  end)

  it("resolves require relative to the script folder", function()
    local dir = H.tmpdir()
    H.write(dir .. "/helper.lua", "return { greeting = 'hello from helper' }\n")
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local helper = require "helper"
osara.after(0, function() osara.log.info(helper.greeting) end)
]])
    local p = H.osara { "run", dir .. "/app.lua" }
    H.expect(p, "hello from helper")
    H.stop(p)
  end)

  it("writes JSON log lines with --log-format json", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
osara.after(0, function() osara.log.warn("quote \" here") end)
]])
    local p = H.osara { "run", "--log-format", "json", dir .. "/app.lua" }
    local line = H.expect(p, "quote")
    local v = require("cjson").decode(line)
    assert.are.equal("warn", v.level)
    assert.are.equal('quote " here', v.msg)
    H.stop(p)
  end)
end)

describe("bad input", function()
  after_each(H.cleanup)

  it("a missing script is a one-line error and exit code 3", function()
    local status, out = H.run { "run", "/nonexistent/app.lua" }
    assert.are.equal(3, status)
    assert.matches("cannot open /nonexistent/app.lua: No such file", out)
  end)

  it("a folder instead of a script is exit code 3", function()
    local dir = H.tmpdir()
    local status, out = H.run { "run", dir }
    assert.are.equal(3, status)
    assert.matches("is a directory", out)
  end)

  it("a non-Lua file is a syntax error with file:line and exit code 1", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", "\27ELF\0\0binary junk\n{{{\n")
    local status, out = H.run({ "run", dir .. "/app.lua" }, nil, nil, { errors = { "not a Lua script" } })
    assert.are.equal(1, status)
    assert.matches("app.lua", out)
    assert.is_nil(out:find("Segmentation"))
  end)

  it("a script that errors at load names file:line, exit code 1", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", "local x = nil\nlocal y = x.field\n")
    local status, out = H.run({ "run", dir .. "/app.lua" }, nil, nil, { errors = { "attempt to index local 'x'" } })
    assert.are.equal(1, status)
    assert.matches("app.lua:2: attempt to index local 'x'", out)
  end)

  it("a script that never finishes loading hits the load timeout", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", "while true do end\n")
    local status, out = H.run({ "run", "--load-timeout", "0.3", dir .. "/app.lua" }, 20, nil,
                              { errors = { "did not finish loading" } })
    assert.are.equal(1, status)
    assert.matches("app.lua:1: script did not finish loading within 0.3s", out)
  end)

  it("an unknown option is a usage error, exit code 2", function()
    local status, out = H.run { "run", "--frobnicate", "x.lua" }
    assert.are.equal(2, status)
    assert.matches("unknown option %-%-frobnicate", out)
  end)
end)

describe("osara check", function()
  after_each(H.cleanup)

  it("prints what the script registered", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
osara.every(1, function() end)
osara.after(2.5, function() end, { name = "warmup" })
]])
    local status, out = H.run { "check", dir .. "/app.lua" }
    assert.are.equal(0, status)
    assert.matches("ok, 2 registration", out)
    assert.matches("timer%s+every 1 #1%s+[^\n]*app.lua:2%s+every 1", out)
    assert.matches("timer%s+after warmup%s+[^\n]*app.lua:3", out)
  end)

  it("writes nothing to disk, even for a store and a database used at load", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local seen = osara.store "seen"
seen:set("loaded", true)
local db = osara.sql()
osara.log.info("check %s", tostring(seen:get("loaded")))
]])
    local status, out = H.run { "check", dir .. "/app.lua" }
    assert.are.equal(0, status)
    assert.matches("check true", out)
    local listing = io.popen("ls -A " .. dir):read("*a")
    assert.are.equal("app.lua\n", listing)
  end)

  it("exits 1 with the error on a broken script", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", "local osara = require 'osara'\nosara.every(1, function() end\n")
    local status, out = H.run({ "check", dir .. "/app.lua" }, nil, nil, { errors = { "expected" } })
    assert.are.equal(1, status)
    assert.matches("app.lua:%d+: .*expected", out)
  end)
end)

describe("hot reload", function()
  after_each(H.cleanup)

  local function app(version)
    return ([[
local osara = require "osara"
osara.every(0.05, function() osara.log.info("version %s") end)
]]):format(version)
  end

  it("swaps to the new code when the script changes (--watch)", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", app("one"))
    local p = H.osara { "run", "--watch", dir .. "/app.lua" }
    H.expect(p, "version one")
    H.write(dir .. "/app.lua", app("two"))
    local line = H.expect(p, "reloaded")
    assert.matches("1 kept, 0 added, 0 removed", line)
    local ms = tonumber(line:match("in ([%d.]+) ms"))
    assert.is_true(ms < 100, "reload took " .. tostring(ms) .. " ms")
    H.expect(p, "version two")
    H.stop(p)
  end)

  it("gh_12_watch: picks up a change written while it was loading or re-arming its watch", function()
    -- the load line comes before the watch is armed (at start and after
    -- each reload): a write right after it raised no event and was missed
    local dir = H.tmpdir()
    local function loads(v)
      return ("local osara = require 'osara'\nosara.log.info('loaded v%d')\n"):format(v)
    end
    H.write(dir .. "/app.lua", loads(0))
    local p = H.osara { "run", "--watch", dir .. "/app.lua" }
    H.expect(p, "loaded v0")
    for v = 1, 20 do
      H.write(dir .. "/app.lua", loads(v))
      H.expect(p, "loaded v" .. v, 5)
    end
    H.stop(p)
  end)

  it("keeps the old code and prints file:line when the new one is broken", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", app("one"))
    local p = H.osara({ "run", "--watch", dir .. "/app.lua" }, nil, { errors = { "reload failed" } })
    H.expect(p, "version one")
    H.write(dir .. "/app.lua", "local osara = require 'osara'\nosara.every(0.05, function()\n")
    local line = H.expect(p, "reload failed")
    assert.matches("app.lua:%d+:", line)
    assert.matches("still running the previous version", line)
    H.expect(p, "version one")
    -- and a fixed version is picked up again
    H.write(dir .. "/app.lua", app("three"))
    H.expect(p, "version three")
    H.stop(p)
  end)

  it("reloads when a required module changes", function()
    local dir = H.tmpdir()
    H.write(dir .. "/words.lua", "return { word = 'alpha' }\n")
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local words = require "words"
osara.every(0.05, function() osara.log.info("word " .. words.word) end)
]])
    local p = H.osara { "run", "--watch", dir .. "/app.lua" }
    H.expect(p, "word alpha")
    H.write(dir .. "/words.lua", "return { word = 'beta' }\n")
    H.expect(p, "word beta")
    H.stop(p)
  end)

  it("reloads on SIGHUP without --watch", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", app("one"))
    local p = H.osara { "run", dir .. "/app.lua" }
    H.expect(p, "version one")
    H.write(dir .. "/app.lua", app("two"))
    p:kill("HUP")
    H.expect(p, "reloaded")
    H.expect(p, "version two")
    H.stop(p)
  end)

  it("restarts a timer whose interval changed and stops a removed one", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
osara.every(0.05, function() osara.log.info("fast A") end)
osara.every(0.07, function() osara.log.info("other B") end)
]])
    local p = H.osara { "run", "--watch", dir .. "/app.lua" }
    H.expect(p, "other B")
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
osara.every(0.06, function() osara.log.info("slower C") end)
]])
    local line = H.expect(p, "reloaded")
    assert.matches("0 kept, 1 added, 2 removed", line)
    H.expect(p, "slower C")
    -- after the reload line, neither old timer fires again
    local deadline = require("osara").monotonic() + 0.3
    while require("osara").monotonic() < deadline do
      local l = p:line(0.05)
      if l then
        assert.is_nil(l:find("fast A"), l)
        assert.is_nil(l:find("other B"), l)
      end
    end
    H.stop(p)
  end)
end)

describe("hot reload of tasks", function()
  after_each(H.cleanup)

  it("replaces tasks spawned at load instead of running old and new side by side", function()
    local dir = H.tmpdir()
    local function app(v)
      return ([[
local osara = require "osara"
osara.spawn(function()
  while true do
    osara.log.info("task %s")
    osara.sleep(0.05)
  end
end)
]]):format(v)
    end
    H.write(dir .. "/app.lua", app("old"))
    local p = H.osara { "run", "--watch", dir .. "/app.lua" }
    H.expect(p, "task old")
    H.write(dir .. "/app.lua", app("new"))
    H.expect(p, "reloaded")
    H.expect(p, "task new")
    -- no line from the old task after the new one started
    local deadline = require("osara").monotonic() + 0.3
    while require("osara").monotonic() < deadline do
      local l = p:line(0.05)
      if l then assert.is_nil(l:find("task old"), l) end
    end
    -- a service loop started at load is cancelled at stop, not waited for
    local t0 = require("osara").monotonic()
    H.stop(p)
    assert.is_true(require("osara").monotonic() - t0 < 2)
  end)
end)

describe("osara check with schemas", function()
  after_each(H.cleanup)

  it("prints each schema with its fields", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local Order = osara.schema({ id = "integer", amount = osara.number { min = 0 },
                             address = { zip = "string" } }, { name = "Order" })
]])
    local status, out = H.run { "check", dir .. "/app.lua" }
    assert.are.equal(0, status)
    assert.matches("schema Order %(.*app.lua:2%)", out)
    assert.matches("amount: number, min 0", out)
    assert.matches("address: record", out)
    assert.matches("zip: string", out)
  end)
end)

describe("spec helpers check every child", function()
  after_each(H.cleanup)

  -- Starts an app that logs `line` at `level`, then stops it with H.stop;
  -- returns whether H.stop passed and its message.
  local function stop_after(level, line, opts)
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", ([[
local osara = require "osara"
osara.after(0, function() osara.log.%s(%q) osara.log.info("logged") end)
]]):format(level, line))
    local p = H.osara({ "run", dir .. "/app.lua" }, nil, opts)
    H.expect(p, "logged")
    return pcall(H.stop, p)
  end

  it("fails on an ERROR line the spec did not list, passes on a listed one", function()
    local ok, err = stop_after("error", "disk on fire")
    assert.is_false(ok)
    assert.matches("forbidden line.*disk on fire", tostring(err))
    assert.is_true((stop_after("error", "disk on fire", { errors = { "disk on %a+" } })))
  end)

  it("fails on a sanitizer report or a loop stall whatever the level", function()
    for _, line in ipairs { "==1==ERROR: AddressSanitizer: heap-use-after-free",
                            "Direct leak of 8 byte(s): LeakSanitizer", "x.c:3:5: runtime error: shift",
                            "loop stall: 250 ms in kafka poll" } do
      local ok, err = stop_after("warn", line, { errors = { "." } })
      assert.is_false(ok, line)
      assert.matches("forbidden line", tostring(err))
    end
  end)

  it("fails on an unexpected exit status", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", "local osara = require 'osara'\nosara.after(0, function() os.exit(7) end)\n")
    local p = H.osara { "run", dir .. "/app.lua" }
    local ok, err = pcall(H.finish, p)
    assert.is_false(ok)
    assert.matches("exited with status 7", tostring(err))
  end)
end)
