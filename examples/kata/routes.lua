-- kata's routes.py: kata.router.add_route(path, Resource, format=...).
local osara = require "osara"
local foo = require "resource.foo"
local users = require "resource.users"

osara.resource("/foo/bar/{baz}", foo.Bar)                               -- json (the default)
osara.resource("/msgpack/foo/bar/{baz}", foo.Bar, { format = "msgpack" })
osara.resource("/users", users.Users)
osara.resource("/users/{id:int}", users.User)
osara.resource("/msgpack/users/{id:int}", users.User, { format = "msgpack" })
osara.route("GET", "/html/users/{id:int}", users.page, { format = "html" })
