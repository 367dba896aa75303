"""Python peer of the cache_route benchmark: aiohttp with redis-py's asyncio
client (Debian's python3-aiohttp, python3-redis), the same route reading
the same JSON from redis on every request.
usage: cache_aiohttp.py PORT REDIS_PORT"""
import json
import sys

import redis.asyncio as aioredis
from aiohttp import web

store = aioredis.Redis(host="127.0.0.1", port=int(sys.argv[2]))


async def order(request):
    raw = await store.get("bench:order:" + request.match_info["id"])
    if raw is None:
        return web.json_response({"error": "no such order"}, status=404)
    return web.json_response(json.loads(raw))


app = web.Application()
app.router.add_get("/orders/{id:\\d+}", order)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
