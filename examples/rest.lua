-- rest.lua: a kata-style REST resource backed by a durable store.
--   curl -X POST -d '{"name":"pen","qty":2}' -H 'Content-Type: application/json' localhost:8080/items
--   curl localhost:8080/items/1
local osara = require "osara"

local Item = osara.schema { name = "string", qty = osara.integer { min = 1 } }
local items = osara.store("items", { codec = "json" })

osara.http { listen = "127.0.0.1:8080" }

osara.resource("/items", {
  get = function(req)
    local out = {}
    for _, item in items:pairs("item:") do out[#out + 1] = item end
    return { items = out }
  end,
  post = function(req)
    local body, errs = Item:validate(req:data() or {})
    if not body then return 400, { errors = errs } end
    req.value = body
    local id = (items:get("next_id") or 1)
    items:transaction(function(tx)
      tx:set("next_id", id + 1)
      tx:set(("item:%08d"):format(id), { id = id, name = req.value.name, qty = req.value.qty })
    end)
    return 201, { id = id }
  end,
})

osara.resource("/items/{id:int}", {
  get = function(req, id)
    local item = items:get(("item:%08d"):format(id))
    if not item then return 404, { error = "no such item" } end
    return item
  end,
  delete = function(req, id)
    items:delete(("item:%08d"):format(id))
    return 204, ""
  end,
})

osara.route("GET", "/items.html", function()
  local rows = {}
  for _, item in items:pairs("item:") do
    rows[#rows + 1] = ("<li>%s × %d</li>"):format(item.name, item.qty)
  end
  return "<ul>" .. table.concat(rows) .. "</ul>"
end, { format = "html" })
