"""Python peer of the http benchmark: aiohttp (Debian's python3-aiohttp) with
the same JSON route, run the way its docs show (web.run_app, one process).
usage: http_aiohttp.py PORT"""
import sys

from aiohttp import web


async def order(request):
    i = int(request.match_info["id"])
    return web.json_response({"id": i, "user": "user-%d" % (i % 1000), "amount": i % 997, "status": "paid"})


app = web.Application()
app.router.add_get("/orders/{id:\\d+}", order)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
