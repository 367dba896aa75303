/* ws.h - WebSocket connections (RFC 6455) on the worker's loop.
 *
 * Framing is wslay's event API (Debian's libwslay-dev) fed from libuv reads
 * and writes; this area does the opening handshake on both sides and the
 * plumbing around it, never frame parsing.
 *
 * Server: an endpoint is a path on the HTTP server ("/rpc"), a worker
 * shared resource (it survives reloads, closes with the last VM naming it).
 * host/http hands over a request asking to upgrade (osara_ws_accept); every
 * text message of the connection then runs the serving VM's
 * `require("osara.rpc")._dispatch(text)` in its own pooled coroutine, so
 * many calls are in flight at once and replies go out in completion order.
 * The connection belongs to the worker, not to a VM: a reload changes which
 * VM takes the next message while calls in flight finish on theirs.
 *
 * Client: `ws_c.connect` opens a connection owned by the calling VM and
 * reports "open", "message" and "close" events to a Lua function, each in
 * its own coroutine. lua/osara/rpc.lua builds the RPC protocol on both. */
#ifndef OSARA_WS_H
#define OSARA_WS_H

#include <lua.h>
#include <stddef.h>
#include <uv.h>

struct osara_worker_s;

/* What host/http parsed of a request carrying `Upgrade: websocket`; the
 * strings belong to the caller and are NULL when the header is absent. */
typedef struct {
    const char *method;
    const char *target;  /* path and query */
    const char *upgrade; /* Upgrade */
    const char *key;     /* Sec-WebSocket-Key */
    const char *version; /* Sec-WebSocket-Version */
} osara_ws_request_t;

/* Takes over the HTTP connection `stream` (a uv_tcp_t) for the endpoint at
 * req->target: answers 101 and serves WebSocket frames on a duplicate of its
 * socket; `rest` (n bytes, copied) is what the client sent after the
 * request. Returns 0 when taken over (the caller then closes its handle
 * without writing), or the HTTP status to answer instead: 404 when no
 * endpoint serves the path, 400 for an invalid handshake, 503 when the
 * socket cannot be taken over. Loop thread of worker w. */
int osara_ws_accept(struct osara_worker_s *w, uv_stream_t *stream,
                    const osara_ws_request_t *req, const char *rest, size_t n);

/* Lua binding `osara.ws_c`: serve(path, opts), connect(host, port, path,
 * on_event, opts) and the connection handle (send, close, alive). */
int osara_ws_open(lua_State *L);

#endif
