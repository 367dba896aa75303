-- Issue 14 item 7: generated documents. `osara docs app.lua --asyncapi`
-- (AsyncAPI 3.0 of the Kafka topics, NATS subjects and AMQP exchanges handled or sent to,
-- payloads from osara.schema) and `--openapi` (OpenAPI 3.1 of the routes),
-- both validated against the official JSON schemas (spec/tools, installed
-- by scripts/setup); served at /asyncapi.json and /openapi.json with
-- osara.http{ docs = true }.
local H = require "spec.helpers.host"
local T = require "spec.helpers.http"
local cjson = require "cjson"

local APP = [[
local osara = require "osara"
osara.http { docs = DOCS }
local kafka = osara.kafka { ["group.id"] = "shop" }
local Order = osara.schema({ id = "integer", user = osara.string { min_len = 1 },
  amount = osara.number { min = 0 }, tags = osara.array "string", note = osara.optional "string",
  kind = osara.enum { "retail", "trade" }, address = { street = "string", zip = osara.nullable "string" } },
  { name = "Order" })
local enriched = kafka:topic("orders.enriched", { schema = Order })
kafka:handle("orders", { schema = Order, dlq = "orders.dlq" }, function(msg) enriched:send(msg.value) end)
if AMQP then -- osara docs connects nothing: no broker needed
  local amqp = osara.amqp { url = "amqp://guest:guest@127.0.0.1:5672/" }
  amqp:handle({ exchange = "billing", routing_key = "invoice.*", queue = "invoices" }, { schema = Order },
    function(msg) end)
end
local nats = osara.nats { servers = NATS }
nats:handle("price.*", { sink = "prices" }, function(msg) return { price = 42 } end)
osara.route("GET", "/totals/{user}", function(req, user) return { total = 1 } end)
osara.route("GET", "/users/{id:int}/files/*", function(req, id, rest) return {} end,
  { format = { "json", "msgpack" } })
osara.route("POST", "/orders", function(req) return 201, { id = req.value.id } end, { schema = Order })
]]

local function app(docs, nats)
  return (APP:gsub("DOCS", tostring(docs)):gsub("NATS", nats and ("%q"):format(nats) or "nil")
    :gsub("AMQP", tostring(nats == nil)))
end

-- Validates a document with the official schema; returns it decoded.
local function validated(kind, text, dir)
  local path = ("%s/%s.json"):format(dir, kind)
  H.write(path, text)
  local p = H.child({ "node", "spec/tools/validate_docs.js", kind, path }, { status = false })
  local status = H.finish(p, { timeout = 60, status = false })
  assert(status == 0, kind .. " document not valid:\n" .. p:output() .. "\n" .. text)
  assert.matches("^valid", p:output())
  return cjson.decode(text)
end

describe("osara docs", function()
  after_each(H.cleanup)

  it("writes a valid AsyncAPI 3.0 document of every channel, with schemas", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", app(false))
    local status, out = H.run { "docs", dir .. "/app.lua", "--asyncapi" }
    assert.are.equal(0, status, out)
    local doc = validated("asyncapi", out, dir)
    assert.are.equal("3.0.0", doc.asyncapi)
    local addresses = {}
    for _, c in pairs(doc.channels) do addresses[c.address] = true end
    assert.are.same({ orders = true, ["orders.enriched"] = true, ["orders.dlq"] = true,
                      ["price.*"] = true, prices = true, billing = true }, addresses)
    assert.are.equal("amqp", doc.servers[doc.channels["amqp.billing"].servers[1]["$ref"]:match("[^/]+$")].protocol)
    assert.are.equal("receive", doc.operations["receive.kafka.orders"].action)
    assert.are.equal("send", doc.operations["send.kafka.orders.enriched"].action)
    local order = doc.components.messages["orders.Order"].payload
    assert.are.same({ type = "number", minimum = 0 }, order.properties.amount)
    assert.are.same({ type = "string", minLength = 1 }, order.properties.user)
    assert.are.same({ "retail", "trade" }, order.properties.kind.enum)
    assert.are.same({ "string", "null" }, order.properties.address.properties.zip.type)
    assert.are.same({ type = "array", items = { type = "string" } }, order.properties.tags)
    table.sort(order.required)
    assert.are.same({ "address", "amount", "id", "kind", "tags", "user" }, order.required)
    assert.are.equal("application/json", doc.components.messages["orders.Order"].contentType)
  end)

  it("writes a valid OpenAPI 3.1 document of the routes, with parameter types and bodies", function()
    local dir = H.tmpdir()
    H.write(dir .. "/app.lua", app(false))
    local status, out = H.run { "docs", dir .. "/app.lua", "--openapi" }
    assert.are.equal(0, status, out)
    local doc = validated("openapi", out, dir)
    assert.are.equal("3.1.0", doc.openapi)
    local files = doc.paths["/users/{id}/files/{rest}"].get
    assert.are.same({ type = "integer" }, files.parameters[1].schema)
    assert.are.equal("rest", files.parameters[2].name)
    assert.is_truthy(files.responses["200"].content["application/msgpack"])
    local post = doc.paths["/orders"].post
    local body = post.requestBody.content["application/json"].schema
    assert.are.same({ type = "integer" }, body.properties.id)
    assert.is_truthy(post.responses["400"])
    assert.are.same({ type = "string" }, doc.paths["/totals/{user}"].get.parameters[1].schema)
  end)

  it("serves /asyncapi.json and /openapi.json with osara.http{ docs = true }, else 404", function()
    local N = require "spec.helpers.nats"
    local server, url = N.server()
    local dir = H.tmpdir()
    local p, port = T.app(dir, app(true, url))
    local base = "http://127.0.0.1:" .. port
    local s1, _, asyncapi = T.curl { base .. "/asyncapi.json" }
    assert.are.equal(200, s1)
    local doc = validated("asyncapi", asyncapi, dir)
    assert.are.equal("3.0.0", doc.asyncapi)
    local s2, _, openapi = T.curl { base .. "/openapi.json" }
    assert.are.equal(200, s2)
    assert.are.equal("3.1.0", validated("openapi", openapi, dir).openapi)
    H.stop(p)
    local p2, port2 = T.app(dir, app(false, url))
    assert.are.equal(404, (T.curl { "http://127.0.0.1:" .. port2 .. "/openapi.json" }))
    H.stop(p2)
    H.stop(server)
  end)
end)
