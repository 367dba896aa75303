-- kata's containers: cache-aside over the caches config.yaml names.
local osara = require "osara"
local model = require "model"

local M = {}

-- kata.container.Simple: one user by id, cached in redis for an hour.
M.user = osara.cached {
  cache = "redis", expire = 3600,
  key = function(id) return "user:" .. id end,
  pull = function(id) return model.Users:get({ id = id })[1] end,
}

-- kata.container.Attribute: many users in one get_multi from memcached,
-- the misses in one SELECT ... WHERE id IN (...) (Users:get_in).
M.users = osara.cached {
  cache = "memcached", expire = 3600,
  key = function(id) return "user:" .. id end,
  attribute = { model.Users, "id" },
}

-- A Simple container in the memory cache: the number of users, 5 seconds.
M.user_count = osara.cached {
  cache = "memory", expire = 5, key = function() return "count" end,
  pull = function() return model.db:query("SELECT count(*) AS n FROM users")[1].n end,
}

-- A user changed: forget it in both containers.
function M.dirty(id)
  M.user:dirty(id)
  M.users:dirty { id }
end

return M
