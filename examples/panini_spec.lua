-- Runs the panini-style NATS examples with the real binary (embedded
-- nats-server each) and checks what they log.
local H = require "spec.helpers.host"
local T = require "spec.helpers.http"

local function run(example, text, timeout)
  local dir = H.tmpdir()
  local p = H.osara { "run", "--data", dir, "examples/panini/" .. example }
  H.expect(p, text, timeout or 15)
  H.stop(p)
  assert.is_nil(p:output():find("deprecated", 1, true), "the example uses a deprecated spelling (docs/api.md)")
end

describe("NATS examples", function()
  after_each(H.cleanup)

  it("publish.lua receives what its task and timer publish", function()
    run("publish.lua", "got message 10: value1")
  end)

  it("request.lua gets its ten responses", function()
    run("request.lua", "response 10: request has been processed")
  end)

  it("validators.lua handles valid messages and reports the invalid one", function()
    local dir = H.tmpdir()
    local p = H.osara({ "run", "--data", dir, "examples/panini/validators.lua" }, nil,
                      { errors = { "schema failed" } })
    H.expect(p, "got valid message 3: value1", 15)
    local line = H.expect(p, "schema failed", 5)
    assert.matches("/key1: expected string, got integer", line)
    H.stop(p)
  end)

  it("reply_to.lua receives responses on the third subject", function()
    run("reply_to.lua", "received response 10 on reply.to.subject")
  end)

  it("sync.lua is the publish example in osara's one style", function()
    run("sync.lua", "got message 20: value1")
  end)

  it("http.lua serves its HTTP endpoints beside a NATS one", function()
    local p = H.osara { "run", "--data", H.tmpdir(), "--http", "127.0.0.1:0", "examples/panini/http.lua" }
    local base = "http://127.0.0.1:" .. T.listening(p)
    local s1, _, b1 = T.curl { base .. "/get" }
    assert.are.same({ 200, "Hello, world" }, { s1, b1 })
    local s2, _, b2 = T.curl { base .. "/path/to/rest/endpoints" }
    assert.are.same({ 200, "Hello, REST world" }, { s2, b2 })
    local s3, _, b3 = T.curl { "-X", "POST", "-d", "", base .. "/path/to/rest/endpoints" }
    assert.are.same({ 200, "Hello, REST world" }, { s3, b3 })
    assert.are.equal(405, (T.curl { "-X", "DELETE", base .. "/path/to/rest/endpoints" }))
    H.stop(p)
  end)

  it("logging.lua logs through named loggers, with the name on each line", function()
    local p = H.osara({ "run", "--data", H.tmpdir(), "examples/panini/logging.lua" }, nil,
                      { errors = { "some error log", "some exception log" } })
    H.expect(p, "some log logger=some_logger_name")
    local out = p:output()
    H.stop(p)
    assert.matches("INFO  some log logger=ms_template_sync_by_lib", out)
    assert.matches("WARN  some warn log logger=ms_template_sync_by_lib", out)
    assert.matches("ERROR some error log logger=ms_template_sync_by_lib", out)
    assert.matches("some exception log with automatic traceback logging.*stack traceback", out)
  end)
end)
