-- kata's model/: one table helper per table (kata.db.Object), on the
-- database config.yaml's `database:` section names.
local osara = require "osara"

local M = {}

M.db = osara.sql()                    -- config.yaml: database
M.Users = M.db:table("users")

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"

function M.migrate()
  return osara.sql.migrate(M.db, here .. "schema")
end

return M
