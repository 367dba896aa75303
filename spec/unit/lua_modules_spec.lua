-- The embedded Lua modules never read or write an undeclared global (a
-- typo would otherwise be nil at run time, or leak across reloads).
local osara = require "osara"

local ALLOWED = {}
for name in ([[require type error pairs ipairs tostring tonumber setmetatable
  getmetatable pcall select unpack table string math os io debug coroutine rawget
  rawset next assert print loadfile package _G jit rawequal xpcall load loadstring]]):gmatch("%S+") do
  ALLOWED[name] = true
end

describe("lua/osara modules", function()
  it("use no globals beyond the standard library", function()
    local ls = assert(io.popen("ls lua/osara/*.lua"))
    local files = {}
    for f in ls:lines() do files[#files + 1] = f end
    ls:close()
    assert.is_true(#files >= 10)
    for _, f in ipairs(files) do
      local p = assert(osara.process.spawn { argv = { "luajit", "-bl", f } })
      p:wait(10)
      require("spec.helpers.host").drain(p)
      for name in p:output():gmatch('GSET%s+%d+%s+%d+%s+; "([%w_]+)"') do
        -- GSET always is a global write: never allowed
        error(f .. " assigns the global " .. name)
      end
      for name in p:output():gmatch('GGET%s+%d+%s+%d+%s+; "([%w_]+)"') do
        assert.is_true(ALLOWED[name] or false, f .. " reads the global " .. name)
      end
    end
  end)
end)
