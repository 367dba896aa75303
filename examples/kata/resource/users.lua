-- Users through the containers: one by id (redis), many by ids (memcached).
local osara = require "osara"
local model = require "model"
local container = require "container"

local M = {}

local function ids_of(query)
  local ids = {}
  for id in tostring(query or ""):gmatch("%d+") do ids[#ids + 1] = tonumber(id) end
  return ids
end

M.Users = {
  -- GET /users?ids=3,1,2 -> the users in that order (null where none)
  get = function(req)
    local ids = ids_of(req.query.ids)
    local found = container.users:get(ids)
    local out = {}
    for i = 1, #ids do out[i] = found[i] or osara.null end
    return { users = out, total = container.user_count:get() }
  end,
  -- POST /users [{"name": ...}, ...]
  post = function(req)
    local rows = req:data()
    if type(rows) ~= "table" or #rows == 0 then return 400, { error = "a list of users" } end
    return 201, { users = model.Users:create(rows) }
  end,
}

M.User = {
  get = function(req, id)
    local user = container.user:get(id)
    if not user then return 404, { error = "no such user" } end
    return user
  end,
  put = function(req, id)
    local body = req:data() or {}
    local n = model.Users:update({ name = body.name, score = body.score }, { where = { id = id } })
    if n == 0 then return 404, { error = "no such user" } end
    container.dirty(id)
    return container.user:get(id)
  end,
}

-- The same user as a page (kata's format='html').
function M.page(req, id)
  local u = container.user:get(id)
  if not u then return 404, "<p>no such user</p>" end
  return ("<h1>%s</h1><p>score %d</p>"):format(u.name:gsub("[<>&]", ""), u.score)
end

return M
