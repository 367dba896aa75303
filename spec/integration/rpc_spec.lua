-- WebSocket RPC (osara.rpc) through the real binary: Python's websockets
-- (spec/tools/ws_rpc_client.py, no osara code) and osara's own client in a
-- second host as callers.
local osara = require "osara"
local H = require "spec.helpers.host"
local T = require "spec.helpers.http"
local cjson = require "cjson"

local TOOL = "spec/tools/ws_rpc_client.py"
local PYTHON = "/usr/bin/python3" -- Debian's, with python3-websockets

local SERVER = [[
local osara = require "osara"
osara.rpc.serve { max_message = 65536 }
osara.rpc.expose("add", function(a, b) return a + b end, { doc = "adds two numbers" })
osara.rpc.expose {
  slow = { function(seconds, v)
    osara.log.info("slow %s started", tostring(v))
    osara.sleep(seconds)
    osara.log.info("slow %s done", tostring(v))
    return v
  end, doc = "returns v after some seconds" },
  echo = function(s) return s end,
  boom = function() error("kaboom") end,
  refuse = function() error({ code = 42, message = "not today" }) end,
  version = function() return VERSION end,
}
]]

-- Runs a scenario of the Python client; returns what it printed (JSON).
local function tool(url, scenario, ...)
  local p = H.child({ PYTHON, TOOL, url, scenario, ... }, { name = "ws_rpc_client " .. scenario })
  H.finish(p, { timeout = 60 })
  local last
  for line in p:output():gmatch("[^\n]+") do
    if line:match("^[%[{]") then last = line end
  end
  assert(last, "no result from " .. scenario .. ":\n" .. p:output())
  return cjson.decode(last)
end

local function metric(port, name)
  local _, _, body = T.curl { "http://127.0.0.1:" .. port .. "/metrics" }
  return tonumber(body:match(name:gsub("[%[%]%-%.]", "%%%0") .. " ([%d.e+-]+)"))
end

local function server_app(dir, version)
  return (SERVER:gsub("VERSION", ("%q"):format(version)))
end

-- Starts the server app with other osara.rpc.serve options; p, port, url.
local function serving(dir, serve_opts)
  local p, port = T.app(dir, (server_app(dir, "v1"):gsub("max_message = 65536", serve_opts)))
  return p, port, "ws://127.0.0.1:" .. port .. "/rpc"
end

-- A raw WebSocket upgrade request for path (key from RFC 6455's example).
local function upgrade(path, key)
  return "GET " .. path .. " HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    .. (key and "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" or "")
    .. "Sec-WebSocket-Version: 13\r\n\r\n"
end

describe("rpc over WebSocket, called by an independent client", function()
  local dir, p, port, url
  setup(function()
    dir = H.tmpdir()
    p, port = T.app(dir, server_app(dir, "v1"), nil, { errors = { "rpc boom failed", "rpc add failed" } })
    url = "ws://127.0.0.1:" .. port .. "/rpc"
  end)
  teardown(function()
    H.stop(p, { timeout = 30 })
    H.cleanup()
  end)

  it("answers 100 concurrent calls on one connection in completion order", function()
    local r = tool(url, "concurrent", "100")
    assert.are.equal(100, r.replies)
    assert.is_true(r.correct)
    -- the first calls sleep longest, so their replies come back last
    assert.is_false(r.in_send_order)
  end)

  it("lists the targets with their doc and arguments, and one target's info", function()
    local r = tool(url, "calls", cjson.encode { { "rpc.targets" }, { "rpc.info", { "add" } } })
    local names = {}
    for _, t in ipairs(r[1].result) do names[#names + 1] = t.target end
    assert.are.same({ "add", "boom", "echo", "refuse", "slow", "version" }, names)
    assert.are.same({ target = "add", args = { "a", "b" }, doc = "adds two numbers" }, r[2].result)
  end)

  it("answers an unknown method, bad params, malformed JSON and errors without a stack trace", function()
    local r = tool(url, "calls", cjson.encode {
      { "nope", { 1 } }, { "add", "not params" }, { "boom" }, { "refuse" }, { "add", { a = 1 } },
    })
    assert.are.same({ code = -32601, message = "no such method: nope" }, r[1].error)
    assert.are.equal(-32602, r[2].error.code)
    assert.are.same({ code = -32000, message = "kaboom" }, r[3].error)
    assert.are.same({ code = 42, message = "not today" }, r[4].error)
    assert.are.equal(-32000, r[5].error.code) -- named params: one table argument
    for _, reply in ipairs(r) do
      assert.is_nil(reply.error.message:find("traceback", 1, true))
      assert.is_nil(reply.error.message:find(".lua:", 1, true))
    end
    local parse = tool(url, "raw_text", "{not json")
    assert.are.equal(-32700, parse.error.code)
    assert.are.equal(cjson.null, parse.id)
    local invalid = tool(url, "raw_text", '{"id": 7, "params": []}')
    assert.are.equal(-32600, invalid.error.code)
    assert.are.equal(7, invalid.id)
    assert.is_true(metric(port, 'osara_rpc_calls_total{result="error"}') >= 7)
    assert.is_true(metric(port, 'osara_rpc_calls_total{result="ok"}') >= 100)
  end)

  it("closes with 1002 on a malformed frame and keeps serving others", function()
    -- an unmasked text frame: clients must mask (RFC 6455 5.1)
    assert.are.same({ status = 101, close_code = 1002, closed = true }, tool(url, "raw_frame", "81026869"))
    -- a masked frame with the reserved opcode 3
    assert.are.same({ status = 101, close_code = 1002, closed = true }, tool(url, "raw_frame", "838000000000"))
    assert.are.equal(5, tool(url, "calls", cjson.encode { { "add", { 2, 3 } } })[1].result)
  end)

  it("closes with 1009 on a message over max_message", function()
    assert.are.same({ closed = true, code = 1009 }, tool(url, "oversized", "100000"))
    assert.are.equal("x", tool(url, "calls", cjson.encode { { "echo", { "x" } } })[1].result)
  end)

  it("drops the result of a call whose client disconnected, and frees the connection", function()
    tool(url, "disconnect", "0.5")
    H.expect(p, "slow late done", 15) -- the call finished after its client left
    H.eventually(function() return metric(port, 'osara_ws_connections{side="server"}') == 0 end, 10,
      "the server connection count back to 0")
    assert.are.equal(3, tool(url, "calls", cjson.encode { { "add", { 1, 2 } } })[1].result)
  end)

  it("answers 404 to a WebSocket upgrade on a path that serves none", function()
    assert.matches("^HTTP/1.1 404", T.raw(port, upgrade("/elsewhere", true)))
    assert.matches("^HTTP/1.1 400", T.raw(port, upgrade("/rpc", false))) -- no key
  end)
end)

describe("rpc across a reload", function()
  after_each(H.cleanup)

  it("finishes calls in flight on the old script and sends new calls to the new one", function()
    local dir = H.tmpdir()
    local p, port = T.app(dir, server_app(dir, "v1"))
    local url = "ws://127.0.0.1:" .. port .. "/rpc"
    local inflight = H.child({ PYTHON, TOOL, url, "calls", cjson.encode { { "slow", { 1.5, "old" } } } },
      { name = "ws_rpc_client in flight" })
    H.eventually(function() return metric(port, 'osara_ws_connections{side="server"}') == 1 end, 10,
      "the in-flight call's connection")
    H.write(dir .. "/app.lua", server_app(dir, "v2"))
    p:kill("HUP")
    H.expect(p, "reloaded", 30)
    assert.are.equal("v2", tool(url, "calls", cjson.encode { { "version" } })[1].result)
    H.finish(inflight, { timeout = 30 })
    assert.matches('"result": "old"', inflight:output())
    H.stop(p, { timeout = 30 })
  end)
end)

describe("rpc when the script or the host goes", function()
  after_each(H.cleanup)

  local function holding(url, calls)
    local p = H.child({ PYTHON, TOOL, url, "hold", cjson.encode(calls), "20" }, { name = "ws_rpc_client hold" })
    H.expect(p, '"connected"', 15)
    return p
  end

  local function held(p)
    H.finish(p, { timeout = 40 })
    local last
    for line in p:output():gmatch("[^\n]+") do last = line end
    return cjson.decode(last)
  end

  it("a reload that exposes nothing finishes the calls in flight, then says going away", function()
    local dir = H.tmpdir()
    local p, port = T.app(dir, server_app(dir, "v1"))
    local client = holding("ws://127.0.0.1:" .. port .. "/rpc", { { "slow", { 1, "in flight" } } })
    H.expect(p, "slow in flight started", 15)
    H.write(dir .. "/app.lua", 'local osara = require "osara"\nosara.route("GET", "/x", function() return {} end)\n')
    p:kill("HUP")
    H.expect(p, "reloaded", 30)
    local r = held(client)
    assert.are.equal("in flight", r.replies[1].result)
    assert.are.equal(1001, r.close_code)
    H.stop(p, { timeout = 30 })
  end)

  it("answers 503 past max_connections and accepts again once one closed", function()
    local p, port, url = serving(H.tmpdir(), "max_connections = 1")
    local client = holding(url, { { "slow", { 1, "held" } } })
    H.expect(p, "slow held started", 15)
    assert.matches("^HTTP/1.1 503", T.raw(port, upgrade("/rpc", true)))
    client:kill("TERM")
    H.finish(client, { status = false })
    H.eventually(function() return metric(port, 'osara_ws_connections{side="server"}') == 0 end, 10,
      "the held connection closed")
    assert.are.equal(3, tool(url, "calls", cjson.encode { { "add", { 1, 2 } } })[1].result)
    H.stop(p, { timeout = 30 })
  end)

  it("pings a silent connection and closes it when it stays silent; a live client stays", function()
    local p, _, url = serving(H.tmpdir(), "ping_interval = 0.3")
    -- websockets answers pings itself: a 2 s call outlives several intervals
    local live = holding(url, { { "slow", { 2, "still here" } } })
    local r = tool(url, "silent", "10")
    assert.are.equal(101, r.status)
    assert.are.same({ 9 }, r.opcodes) -- one ping, then the socket closed
    assert.is_true(r.closed)
    assert.is_true(r.seconds < 5)
    assert.are.equal("still here", held(live).replies[1].result)
    H.stop(p, { timeout = 30 })
  end)

  it("a stopping host answers the calls in flight, then says going away and exits 0", function()
    local dir = H.tmpdir()
    local p, port = T.app(dir, server_app(dir, "v1"))
    local client = holding("ws://127.0.0.1:" .. port .. "/rpc", { { "slow", { 1, "last" } } })
    H.expect(p, "slow last started", 15)
    p:kill("TERM")
    local r = held(client)
    assert.are.equal("last", r.replies[1].result)
    assert.are.equal(1001, r.close_code)
    H.finish(p, { timeout = 30 })
  end)
end)

describe("osara.rpc.client", function()
  after_each(H.cleanup)

  local CALLER = [[
local osara = require "osara"
local cjson = require "cjson"
local rpc = osara.rpc.client(os.getenv("RPC_URL"), { timeout = 5 })
local function report(name, ...)
  local values = { ... }
  for i = 1, select("#", ...) do
    if values[i] == nil then values[i] = cjson.null end
  end
  osara.log.info("RESULT %s %s", name, cjson.encode(values))
end
osara.spawn(function()
  -- call_async: the first call is the slowest, so the results come in the other order
  local done = {}
  local futures = { rpc.slow:call_async(0.6, "a"), rpc.slow:call_async(0.3, "b"), rpc.slow:call_async(0.05, "c") }
  for i, f in ipairs(futures) do
    osara.spawn(function() local v = f:result() done[#done + 1] = v end)
  end
  report("sync", rpc.add(2, 3))
  while #done < 3 do osara.sleep(0.02) end
  report("order", unpack(done))
  report("unknown", rpc.nope(1))
  report("remote_error", rpc.refuse())
  local targets = rpc:targets()
  report("targets", #targets, targets[1].target, targets[1].doc)
  report("info", tostring(rpc.add.info))
  report("timeout", rpc.slow:call_async(3, "z"):result(0.2))
  local many = {}
  for i = 1, 100 do many[i] = rpc.add:call_async(i, 1) end
  local sum = 0
  for i = 1, 100 do sum = sum + many[i]:result() end
  report("sum", sum)
  while true do
    report("loop", rpc.version())
    osara.sleep(0.1)
  end
end)
]]

  it("calls a server that is not osara (Python's websockets) speaking the same protocol", function()
    local dir = H.tmpdir()
    local port = tonumber(io.popen([[/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])']]):read("*l"))
    local server = H.child({ PYTHON, "spec/tools/ws_rpc_server.py", tostring(port) },
      { name = "ws_rpc_server", status = false })
    H.expect(server, "listening", 15)
    H.write(dir .. "/app.lua", [=[
local osara = require "osara"
local cjson = require "cjson"
local py = osara.rpc.client(os.getenv("RPC_URL"), { timeout = 5 })
osara.spawn(function()
  local slow, fast = py.sleep_echo:call_async(0.4, "slow"), py.sleep_echo:call_async(0.01, "fast")
  local order = {}
  osara.spawn(function() local v = slow:result() order[#order + 1] = v end)
  osara.spawn(function() local v = fast:result() order[#order + 1] = v end)
  local _, err, e = py.fail()
  osara.log.info("RESULT %s", cjson.encode({ py.concat("a", "b"), err, e.code, #py:targets(), tostring(py.sleep_echo.info) }))
  while #order < 2 do osara.sleep(0.02) end
  osara.log.info("ORDER %s", table.concat(order, ","))
end)
]=])
    local b = H.osara({ "run", "--http", "127.0.0.1:0", dir .. "/app.lua" },
      { RPC_URL = "ws://127.0.0.1:" .. port .. "/" })
    local line = H.expect(b, "RESULT ", 30)
    assert.are.same({ "ab", "python says no", 7, 3, "RPC target sleep_echo(seconds, v)\nv after some seconds" },
      cjson.decode(line:match("RESULT (.*)$")))
    assert.matches("ORDER fast,slow", H.expect(b, "ORDER ", 30))
    H.stop(b, { timeout = 30 })
    H.stop(server, { timeout = 10 })
  end)

  it("calls another osara host: sync, call_async out of order, targets, info, errors, reconnects", function()
    local dir = H.tmpdir()
    local a_dir, b_dir = dir .. "/a", dir .. "/b"
    os.execute("mkdir -p " .. a_dir .. " " .. b_dir)
    local a, port = T.app(a_dir, server_app(a_dir, "v1"))
    H.write(b_dir .. "/app.lua", CALLER)
    local b = H.osara({ "run", "--http", "127.0.0.1:0", b_dir .. "/app.lua" },
      { RPC_URL = "ws://127.0.0.1:" .. port .. "/rpc" })
    local function result(name)
      local line = H.expect(b, "RESULT " .. name .. " ", 30)
      return cjson.decode(line:match("RESULT %S+ (.*)$"))
    end
    assert.are.same({ 5 }, result("sync"))
    assert.are.same({ "c", "b", "a" }, result("order"))
    assert.are.same({ cjson.null, "no such method: nope", { code = -32601, message = "no such method: nope" } },
      result("unknown"))
    assert.are.same({ cjson.null, "not today", { code = 42, message = "not today" } }, result("remote_error"))
    assert.are.same({ 6, "add", "adds two numbers" }, result("targets"))
    assert.are.same({ "RPC target add(a, b)\nadds two numbers" }, result("info"))
    assert.are.same({ cjson.null, "timeout" }, result("timeout"))
    assert.are.same({ 5150 }, result("sum"))
    assert.are.same({ "v1" }, result("loop"))
    -- the server goes away: calls fail; it comes back on the same port: calls work again
    H.stop(a, { timeout = 30 })
    local failed = result("loop")
    while failed[1] ~= cjson.null do failed = result("loop") end
    assert.matches("connect", failed[2] .. "")
    H.write(a_dir .. "/app.lua", server_app(a_dir, "v2"))
    local a2 = H.osara({ "run", "--http", "127.0.0.1:" .. port, a_dir .. "/app.lua" })
    T.listening(a2)
    local back = result("loop")
    while back[1] ~= "v2" do back = result("loop") end
    H.stop(b, { timeout = 30 })
    H.stop(a2, { timeout = 30 })
  end)
end)
