/* http.h - an HTTP/1.1 server on the worker's loop.
 *
 * Parsing is nodejs's http-parser (Debian's libhttp-parser-dev). The
 * listening socket is a worker shared resource, so reloads never close it
 * and keep-alive connections survive; each complete request is dispatched
 * to the serving VM's Lua router (lua/osara/http.lua) in its own pooled
 * coroutine, so in-flight requests finish on the code they started on.
 * Pipelined requests are answered in order; a connection with 32 requests
 * unanswered or 1 MiB of answers unread is not read until its client
 * catches up. Limits (header size, body size, request and idle timeouts,
 * connections) answer 431, 413, 408, 503 and close the connection;
 * malformed input answers 400. A full server makes room by closing the
 * oldest connection waiting for a request. */
#ifndef OSARA_HTTP_H
#define OSARA_HTTP_H

#include <lua.h>

/* Lua binding `osara.http_c`: listen, start, write, finish, alive and the
 * "route" registry kind. */
int osara_http_open(lua_State *L);

#endif
