#!/usr/bin/python3
"""An independent WebSocket RPC client for spec/integration/rpc_spec.lua.

Python's websockets (Debian's python3-websockets), plus a raw socket for
frames that library refuses to send. No osara code. Usage:

  ws_rpc_client.py URL SCENARIO [ARGS...]

Each scenario prints one JSON line with what it saw and exits 0 when the
exchange itself completed (the spec asserts on the printed values).
"""
import asyncio
import base64
import json
import os
import socket
import sys
import time

import websockets


def request(i, method, params=None):
    msg = {"jsonrpc": "2.0", "id": i, "method": method}
    if params is not None:
        msg["params"] = params
    return json.dumps(msg)


async def concurrent(url, n):
    """n calls of slow(delay, i) in flight at once on one connection, the
    earlier ones slower: replies come back in completion order."""
    async with websockets.connect(url, max_size=None) as ws:
        start = time.monotonic()
        for i in range(1, n + 1):
            delay = (n - i) * 0.002
            await ws.send(request(i, "slow", [delay, i]))
        order, results = [], {}
        for _ in range(n):
            reply = json.loads(await ws.recv())
            order.append(reply["id"])
            results[reply["id"]] = reply.get("result")
        return {
            "replies": len(order),
            "correct": all(results.get(i) == i for i in range(1, n + 1)),
            "in_send_order": order == sorted(order),
            "seconds": round(time.monotonic() - start, 3),
        }


async def calls(url, pairs):
    """One call per [method, params] (params optional) in sequence; the
    replies."""
    out = []
    async with websockets.connect(url) as ws:
        for i, pair in enumerate(pairs, 1):
            await ws.send(request(i, pair[0], pair[1] if len(pair) > 1 else None))
            out.append(json.loads(await ws.recv()))
    return out


async def hold(url, pairs, seconds):
    """Sends the calls at once, then reads replies until the server closes
    the connection (or `seconds` pass): the replies and the close code."""
    replies, code = [], None
    async with websockets.connect(url) as ws:
        print(json.dumps({"connected": True}), flush=True)
        for i, pair in enumerate(pairs, 1):
            await ws.send(request(i, pair[0], pair[1] if len(pair) > 1 else None))
        try:
            while True:
                replies.append(json.loads(await asyncio.wait_for(ws.recv(), seconds)))
        except websockets.ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd else None
        except asyncio.TimeoutError:
            pass
    return {"replies": replies, "close_code": code}


async def raw_text(url, text):
    """Sends text as is (not JSON, say) and returns the reply."""
    async with websockets.connect(url) as ws:
        await ws.send(text)
        return json.loads(await ws.recv())


async def oversized(url, size):
    """A message of `size` bytes: the server closes with 1009."""
    async with websockets.connect(url, max_size=None) as ws:
        try:
            await ws.send(request(1, "echo", ["x" * size]))
            reply = await asyncio.wait_for(ws.recv(), 10)
            return {"closed": False, "reply": reply[:100]}
        except websockets.ConnectionClosed as e:
            return {"closed": True, "code": e.rcvd.code if e.rcvd else None}


async def disconnect_mid_call(url, seconds):
    """Starts a call that takes `seconds`, then drops the TCP connection
    without a close frame."""
    ws = await websockets.connect(url)
    await ws.send(request(1, "slow", [seconds, "late"]))
    await asyncio.sleep(0.05)
    ws.transport.abort()
    return {"sent": True}


def raw_open(url):
    """Opens the WebSocket by hand: the socket and the bytes after the
    server's 101 response (None if refused)."""
    hostport, path = url[len("ws://"):].split("/", 1)
    host, port = hostport.split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            return s, None, 0
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    return s, rest, int(head.split(b" ")[1])


def silent(url, seconds):
    """Opens the WebSocket and never answers: the opcodes the server sent
    and whether it closed the socket within `seconds`."""
    s, rest, status = raw_open(url)
    s.settimeout(seconds)
    opcodes, closed, start = [], False, time.monotonic()
    data = rest or b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                closed = True
                break
            data += chunk
    except (ConnectionResetError, socket.timeout):
        closed = not isinstance(sys.exc_info()[1], socket.timeout)
    while len(data) >= 2:
        opcodes.append(data[0] & 0x0F)
        data = data[2 + (data[1] & 0x7F):]
    return {"status": status, "opcodes": opcodes, "closed": closed,
            "seconds": round(time.monotonic() - start, 2)}


def raw_frame(url, frame_hex):
    """Opens the WebSocket by hand and sends one frame given in hex (an
    unmasked or otherwise malformed frame); returns the close code the
    server answers with, if any."""
    s, rest, status = raw_open(url)
    if rest is None:
        return {"handshake": False}
    s.sendall(bytes.fromhex(frame_hex))
    while True:
        try:
            chunk = s.recv(4096)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        rest += chunk
    code = None
    if len(rest) >= 4 and rest[0] == 0x88:
        code = int.from_bytes(rest[2:4], "big")
    return {"status": status, "close_code": code, "closed": True}


def main():
    url, scenario, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    if scenario == "concurrent":
        out = asyncio.run(concurrent(url, int(args[0])))
    elif scenario == "calls":
        out = asyncio.run(calls(url, json.loads(args[0])))
    elif scenario == "hold":
        out = asyncio.run(hold(url, json.loads(args[0]), float(args[1])))
    elif scenario == "raw_text":
        out = asyncio.run(raw_text(url, args[0]))
    elif scenario == "oversized":
        out = asyncio.run(oversized(url, int(args[0])))
    elif scenario == "disconnect":
        out = asyncio.run(disconnect_mid_call(url, float(args[0])))
    elif scenario == "silent":
        out = silent(url, float(args[0]))
    elif scenario == "raw_frame":
        out = raw_frame(url, args[0])
    else:
        sys.exit("unknown scenario " + scenario)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
