-- Runs the osara Tap ports (examples/tap/) with the real binary against the
-- embedded Kafka cluster and checks what the seed's programs print.
local H = require "spec.helpers.host"
local T = require "spec.helpers.http"
local cjson = require "cjson"

local function start(example, args, opts)
  local argv = { "run", "--data", H.tmpdir() }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  argv[#argv + 1] = "examples/tap/" .. example
  return H.osara(argv, nil, opts)
end

describe("osara Tap examples", function()
  after_each(H.cleanup)

  it("handler.lua prints Got <msg> for each message of topic_x", function()
    local p = start "handler.lua"
    for i = 1, 3 do H.expect(p, "Got hello " .. i, 60) end
    H.stop(p)
  end)

  it("schema.lua prints the model's field and reports the message that does not fit", function()
    local p = start("schema.lua", nil, { errors = { "schema failed" } })
    H.expect(p, "Got hello", 60)
    -- the schema error may be logged before or after the good message's print
    H.eventually(function() return p:output():find("schema failed", 1, true) end, 20, "the schema error")
    assert.matches("schema failed at topic_x%[%d+%]@%d+: /msg: expected string, got integer", p:output())
    H.stop(p)
  end)

  it("map_reduce.lua reads back what it produced and stops at hello", function()
    local p = start "map_reduce.lua"
    assert.matches("^topic_x/%d+@%d+ hello$", H.expect(p, "topic_x/", 60))
    H.expect(p, "map_reduce done", 10)
    H.stop(p)
  end)

  it("sql.lua writes rows from the Kafka handler and from the HTTP route", function()
    local p = start("sql.lua", { "--http", "127.0.0.1:0" })
    local base = "http://127.0.0.1:" .. T.listening(p)
    local status, _, body = T.curl { base .. "/" }
    assert.are.equal(200, status)
    assert.are.equal("OK", body)
    local rows
    H.eventually(function()
      rows = cjson.decode((select(3, T.curl { base .. "/rows" })))
      return #rows == 2
    end, 60, "a row from Kafka and one from the web")
    local from = {}
    for _, r in ipairs(rows) do
      assert.matches("^%x+%-%x+%-4%x+%-[89ab]%x+%-%x+ from %a+$", r.txt)
      from[r.txt:match("from (%a+)$")] = true
    end
    assert.are.same({ web = true, kfk = true }, from)
    H.stop(p)
  end)
end)
