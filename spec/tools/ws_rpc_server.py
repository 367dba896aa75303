#!/usr/bin/python3
"""An independent JSON-RPC 2.0 over WebSocket server for
spec/integration/rpc_spec.lua: Python's websockets, no osara code. It
serves the protocol of docs/rpc.md so the spec can show osara.rpc.client
calling a server that is not osara.

  ws_rpc_server.py PORT

Prints "listening PORT" once it accepts connections. Methods: concat(a, b),
sleep_echo(seconds, v) (answers in completion order), fail() (an error
object), rpc.targets.
"""
import asyncio
import json
import sys

import websockets

TARGETS = [
    {"target": "concat", "args": ["a", "b"], "doc": "joins two strings"},
    {"target": "fail", "args": [], "doc": "always fails"},
    {"target": "sleep_echo", "args": ["seconds", "v"], "doc": "v after some seconds"},
]


async def answer(ws, msg):
    method, params = msg.get("method"), msg.get("params") or []
    reply = {"jsonrpc": "2.0", "id": msg.get("id")}
    if method == "concat":
        reply["result"] = params[0] + params[1]
    elif method == "sleep_echo":
        await asyncio.sleep(params[0])
        reply["result"] = params[1]
    elif method == "fail":
        reply["error"] = {"code": 7, "message": "python says no"}
    elif method == "rpc.targets":
        reply["result"] = TARGETS
    else:
        reply["error"] = {"code": -32601, "message": "no such method: %s" % method}
    await ws.send(json.dumps(reply))


async def serve(ws, path=None):
    tasks = set()
    async for text in ws:
        task = asyncio.create_task(answer(ws, json.loads(text)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def main(port):
    async with websockets.serve(serve, "127.0.0.1", port):
        print("listening", port, flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
