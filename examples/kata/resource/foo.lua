-- kata's resource/foo.py: the Bar resource of kata's README.
local M = {}

M.Bar = {
  get = function(req, baz)
    return { baz = baz, something = "else" }
  end,
  post = function(req, baz)
    return 201, { baz = baz, body = req:data() }    -- JSON or msgpack, by Content-Type
  end,
}

return M
