-- http_c.parse: the server's parser and limits without a socket (what the
-- http fuzz target drives; spec/fuzz).
local http_c = require "osara.http_c"

describe("http_c.parse", function()
  local LIMITS = { max_header = 200, max_body = 10 }

  it("returns pipelined requests as the router receives them", function()
    local reqs, status, upgrade = http_c.parse(
      "GET /a?x=1 HTTP/1.1\r\nHost: h\r\nX-Y: z\r\n\r\n" ..
      "POST /b HTTP/1.1\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc", LIMITS)
    assert.is_nil(status)
    assert.is_false(upgrade)
    assert.are.equal(2, #reqs)
    assert.are.same({ "GET", "/a?x=1", "z", "", true },
      { reqs[1].method, reqs[1].target, reqs[1].headers["x-y"], reqs[1].body, reqs[1].keepalive })
    assert.are.same({ "POST", "/b", "abc", false },
      { reqs[2].method, reqs[2].target, reqs[2].body, reqs[2].keepalive })
  end)

  it("parses past the pipelining bound (the parser pauses every 32 requests)", function()
    local reqs, status = http_c.parse(("GET / HTTP/1.1\r\n\r\n"):rep(100))
    assert.is_nil(status)
    assert.are.equal(100, #reqs)
  end)

  it("answers what the server refuses with: 413, 431, 400", function()
    local reqs, status = http_c.parse("GET /a HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 11\r\n\r\n", LIMITS)
    assert.are.same({ 1, 413 }, { #reqs, status })
    local _, chunked = http_c.parse("POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n", LIMITS)
    assert.are.equal(413, chunked)
    assert.are.equal(431, select(2, http_c.parse("GET / HTTP/1.1\r\nX: " .. ("h"):rep(300) .. "\r\n\r\n", LIMITS)))
    assert.are.equal(400, select(2, http_c.parse("BLAH\r\n\r\n", LIMITS)))
  end)

  it("stops at a WebSocket upgrade", function()
    local reqs, status, upgrade = http_c.parse("GET /rpc HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\129\0")
    assert.are.same({ 0, nil, true }, { #reqs, status, upgrade })
  end)
end)
