"""Python peer of the sql_route benchmark: aiohttp with an asyncpg pool
(Debian's python3-aiohttp, python3-asyncpg), the same route reading the
same row by id from PostgreSQL on every request.
usage: sql_aiohttp.py PORT PG_URL POOL_SIZE"""
import sys

import asyncpg
from aiohttp import web


async def order(request):
    row = await request.app["pool"].fetchrow(
        "SELECT id, user_name, amount, status FROM orders WHERE id = $1",
        int(request.match_info["id"]))
    if row is None:
        return web.json_response({"error": "no such order"}, status=404)
    return web.json_response(dict(row))


async def start(app):
    size = int(sys.argv[3])
    app["pool"] = await asyncpg.create_pool(sys.argv[2], min_size=size, max_size=size)


app = web.Application()
app.on_startup.append(start)
app.router.add_get("/orders/{id:\\d+}", order)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
