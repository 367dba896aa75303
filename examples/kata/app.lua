-- kata's myproject/__init__.py, in osara: the config (config.yaml beside
-- this file), the database and its migrations, then the routes.
--   osara run examples/kata/app.lua     (PostgreSQL, redis and memcached as config.yaml says)
local osara = require "osara"
local model = require "model"

-- kata.schema.apply(schema): applied once the host serves; the log says when.
osara.spawn(function()
  local applied = assert(model.migrate())
  osara.log.info("kata: schema ready (%d migration(s) applied)", #applied)
end)

require "routes"
