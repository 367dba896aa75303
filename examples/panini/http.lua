-- panini's "HTTP server" example: HTTP endpoints beside the NATS ones, on
-- the host's own server (no aiohttp app to start, no web_server=True).
--
--   @app.http.get('/get')                        -> "Hello, world"
--   @app.http.view('/path/to/rest/endpoints')    -> get/post "Hello, REST world"
--
-- Listens where --http says (default 127.0.0.1:8080; panini used web_port=8999).
local osara = require "osara"

local nats = osara.nats {}

-- Single HTTP endpoint
osara.route("GET", "/get", function()
  return "Hello, world"
end)

-- HTTP endpoints for a REST schema (aiohttp's web.View): one function per method
osara.resource("/path/to/rest/endpoints", {
  get = function() return "Hello, REST world" end,
  post = function() return "Hello, REST world" end,
})

-- ...and a NATS endpoint in the same service
nats:handle("some.request.subject", function()
  return { success = true, data = "request has been processed" }
end)
