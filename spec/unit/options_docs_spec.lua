-- The option tables in README.md and docs/*.md are generated from
-- lua/osara/option_tables.lua (one source). This spec fails when a table
-- in the docs is out of date; regenerate them with
--   OSARA_UPDATE_DOCS=1 ./build/osara test spec/unit/options_docs_spec.lua
local options = require "osara.options"

local function read(path)
  local f = assert(io.open(path))
  local s = f:read("*a")
  f:close()
  return s
end

local function doc_files()
  local files = { "README.md" }
  local p = io.popen("ls docs/*.md")
  for line in p:lines() do files[#files + 1] = line end
  p:close()
  return files
end

describe("option tables in the docs", function()
  local documented = {}

  for _, path in ipairs(doc_files()) do
    it(path .. " shows the current option tables", function()
      local text = read(path)
      local fresh, seen = options.render_docs(text)
      for _, call in ipairs(seen) do documented[options.tables[call].list] = true end
      if fresh ~= text and os.getenv("OSARA_UPDATE_DOCS") == "1" then
        local f = assert(io.open(path, "w"))
        f:write(fresh)
        f:close()
        text = fresh
      end
      assert(fresh == text, path .. " has option tables out of date with lua/osara/option_tables.lua; run "
        .. "OSARA_UPDATE_DOCS=1 ./build/osara test spec/unit/options_docs_spec.lua")
    end)
  end

  it("documents every builder's options", function()
    for _, call in ipairs(options.order) do
      assert(documented[options.tables[call].list], call .. " has no option table in README.md or docs/*.md")
    end
  end)
end)
