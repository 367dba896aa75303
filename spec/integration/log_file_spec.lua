-- Named loggers with their own levels (panini's get_logger and per-logger
-- configuration), and --log-file: reopened on SIGUSR1 after logrotate moved
-- it, rotated by size with --log-max-size.
local H = require "spec.helpers.host"
local cjson = require "cjson"

local function read(path)
  local f = io.open(path)
  if not f then return "" end
  local s = f:read("*a")
  f:close()
  return s
end

describe("named loggers", function()
  after_each(H.cleanup)

  it("carry their name and their own level from config.yaml or the call", function()
    local dir = H.tmpdir()
    H.write(dir .. "/config.yaml", "log:\n  levels:\n    payments: debug\n    noisy: warn\n")
    H.write(dir .. "/app.lua", [[
local osara = require "osara"
local pay, noisy = osara.log.get("payments"), osara.log.get("noisy")
local quiet = osara.log.get("quiet", { level = "error" })
osara.after(0, function()
  pay.debug("payments debug %d", 1, { user = "ann" })
  noisy.info("noisy info is below its level")
  noisy.warn("noisy warn")
  quiet.warn("quiet warn is below its level")
  osara.log.debug("global debug is below --log-level")
  osara.log.info("last line")
end)
]])
    local p = H.osara { "run", "--log-format", "json", dir .. "/app.lua" }
    H.expect(p, "last line")
    local out = p:output()
    H.stop(p)
    local by_msg = {}
    for line in out:gmatch("[^\n]+") do
      local ok, v = pcall(cjson.decode, line)
      if ok and type(v) == "table" and v.msg then by_msg[v.msg] = v end
    end
    assert.are.same({ "debug", "payments", "ann" },
                    { by_msg["payments debug 1"].level, by_msg["payments debug 1"].logger, by_msg["payments debug 1"].user })
    assert.are.equal("noisy", by_msg["noisy warn"].logger)
    assert.is_nil(by_msg["noisy info is below its level"])
    assert.is_nil(by_msg["quiet warn is below its level"])
    assert.is_nil(by_msg["global debug is below --log-level"])
  end)

  it("refuses an unknown level with the option's name", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", "local osara = require 'osara'\nosara.log.get('x', { level = 'loud' })\n")
    local status, out = H.run({ "check", dir .. "/app.lua" }, nil, nil, { errors = { "level" } })
    assert.are.equal(1, status)
    assert.matches("app.lua:2: .*level", out)
  end)
end)

describe("--log-file", function()
  after_each(H.cleanup)

  local APP = [[
local osara = require "osara"
local n = 0
osara.every(0.01, function()
  n = n + 1
  osara.log.info("line %d %s", n, string.rep("x", 100))
end)
]]

  it("writes the log to the file and opens it again on SIGUSR1", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", APP)
    local log = dir .. "/osara.log"
    local p = H.osara { "run", "--log-file", log, dir .. "/app.lua" }
    H.eventually(function() return read(log):find("line 5 ", 1, true) end, 10, "lines in the log file")
    assert.is_nil(p:output():find("line 1 ", 1, true), "the log went to stderr too")
    assert(os.rename(log, log .. ".old"))                  -- what logrotate does
    p:kill("USR1")
    H.eventually(function() return read(log):find("line %d+ ") end, 10, "lines in the new file")
    local first_new = tonumber(read(log):match("line (%d+) "))
    local last_old = 0
    for k in read(log .. ".old"):gmatch("line (%d+) ") do last_old = tonumber(k) end
    assert.are.equal(last_old + 1, first_new, "a line was lost or doubled across the reopen")
    H.stop(p)
    assert.matches("stopping", read(log))
  end)

  it("rotates past --log-max-size, keeping five files", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", APP)
    local log = dir .. "/osara.log"
    local p = H.osara { "run", "--log-file", log, "--log-max-size", "2K", dir .. "/app.lua" }
    H.eventually(function() return read(log .. ".5") ~= "" end, 30, "five rotated files")
    H.stop(p)
    -- a file ends at the first batch of lines that would pass the limit
    -- (the writer thread writes what queued up while it wrote the last)
    for _, f in ipairs { log .. ".1", log .. ".5" } do
      assert.is_true(#read(f) > 1024 and #read(f) < 4096, f .. ": " .. #read(f) .. " bytes")
    end
    assert.are.equal("", read(log .. ".6"))
  end)

  it("refuses a bad size and a file it cannot open, before starting", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", APP)
    local status, out = H.run({ "run", "--log-file", dir .. "/x.log", "--log-max-size", "lots", dir .. "/app.lua" })
    assert.are.equal(2, status)
    assert.matches("%-%-log%-max%-size expects bytes like 100M or 1G, got 'lots'", out)
    status, out = H.run({ "run", "--log-file", dir .. "/no/such/dir/x.log", dir .. "/app.lua" })
    assert.are.equal(2, status)
    assert.matches("cannot open log file .*no/such/dir/x.log: No such file or directory", out)
  end)
end)
