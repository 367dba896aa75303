-- Runs examples/rest.lua and examples/sse.lua with the real binary.
local H = require "spec.helpers.host"
local T = require "spec.helpers.http"
local cjson = require "cjson"

describe("HTTP examples", function()
  after_each(H.cleanup)

  it("rest.lua creates, lists, reads and deletes items", function()
    local dir = H.tmpdir()
    local p = H.osara { "run", "--data", dir, "--http", "127.0.0.1:0", "examples/rest.lua" }
    local port = T.listening(p)
    local base = "http://127.0.0.1:" .. port
    local s1, _, b1 = T.curl { "-H", "Content-Type: application/json", "-d", '{"name":"pen","qty":2}', base .. "/items" }
    assert.are.equal(201, s1)
    local id = cjson.decode(b1).id
    local s2 = T.curl { "-H", "Content-Type: application/json", "-d", '{"name":"pen","qty":0}', base .. "/items" }
    assert.are.equal(400, s2)
    local _, _, b3 = T.curl { base .. "/items/" .. id }
    assert.are.equal("pen", cjson.decode(b3).name)
    local _, _, b4 = T.curl { base .. "/items" }
    assert.are.equal(1, #cjson.decode(b4).items)
    local _, h5, b5 = T.curl { base .. "/items.html" }
    assert.matches("text/html", h5["content-type"])
    assert.matches("<li>pen", b5)
    assert.are.equal(204, (T.curl { "-X", "DELETE", base .. "/items/" .. id }))
    assert.are.equal(404, (T.curl { base .. "/items/" .. id }))
    H.stop(p)
  end)

  it("sse.lua streams the time as it changes", function()
    local dir = H.tmpdir()
    local p = H.osara { "run", "--data", dir, "--http", "127.0.0.1:0", "examples/sse.lua" }
    local port = T.listening(p)
    local out = T.raw(port, "GET /updates HTTP/1.1\r\nHost: x\r\n\r\n", 2.5)
    local _, n = out:gsub("data: %d%d:%d%d:%d%d", "")
    assert.is_true(n >= 2, out)
    H.stop(p)
  end)
end)
