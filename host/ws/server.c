/* server.c - WebSocket endpoints on the HTTP server: the handshake of a
 * request host/http hands over, and each text message dispatched to the
 * serving VM's osara.rpc in its own coroutine. */
#include "ws/ws.h"
#include "ws/ws_int.h"

#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "core/mem.h"
#include "core/sched.h"
#include "core/worker.h"

static _Thread_local osara_ws_endpoint_t *endpoints; /* this worker thread's */


static void on_call_done(osara_co_t *co, int ok, void *ud)
{
    osara_ws_conn_t *c = ud;
    lua_State *T = osara_co_thread(co);
    c->inflight--;
    osara_metric_add(ok && !lua_toboolean(T, 2) ? osara__ws_m_calls_ok : osara__ws_m_calls_error, 1);
    if (ok && !c->closing && lua_type(T, 1) == LUA_TSTRING) {
        size_t n;
        const char *reply = lua_tolstring(T, 1, &n);
        osara__ws_queue_text(c, reply, n);
    }
    osara__ws_update_reading(c);
    osara__ws_conn_unref(c);
}

/* Pushes osara.rpc._dispatch of T's VM: from package.loaded, or required
 * (a VM loaded after a reload that dropped every expose has not loaded it). */
static void push_dispatch(lua_State *T)
{
    lua_getfield(T, LUA_REGISTRYINDEX, "_LOADED");
    lua_getfield(T, -1, "osara.rpc"); /* [loaded, rpc] */
    if (!lua_istable(T, -1)) {
        lua_pop(T, 1);
        lua_getglobal(T, "require");
        lua_pushliteral(T, "osara.rpc");
        lua_call(T, 1, 1);
    }
    lua_getfield(T, -1, "_dispatch");
    lua_replace(T, -3);
    lua_pop(T, 1); /* [dispatch] */
}

/* A text message from a client: the serving VM's dispatcher answers it in a
 * coroutine of its own. No VM takes new work while the host stops: the
 * client is told to go away (1001) and may reconnect elsewhere. */
void osara__ws_server_message(osara_ws_conn_t *c, const uint8_t *msg, size_t n)
{
    osara_vm_t *vm = c->w->vm;
    osara_co_t *co;
    lua_State *T = vm ? osara_sched_acquire(vm, 0, &co) : NULL;
    if (T == NULL) {
        wslay_event_queue_close(c->ctx, WSLAY_CODE_GOING_AWAY, (const uint8_t *)"shutting down", 13);
        return;
    }
    push_dispatch(T);
    lua_pushlstring(T, (const char *)msg, n); /* T: [dispatch, text] */
    c->refs++;
    c->inflight++;
    osara_sched_run(co, 1, on_call_done, c, "rpc call");
    osara__ws_update_reading(c);
}


static osara_ws_endpoint_t *find_endpoint(struct osara_worker_s *w, const char *target)
{
    size_t plen = strcspn(target, "?#");
    for (osara_ws_endpoint_t *ep = endpoints; ep; ep = ep->next) {
        if (ep->w == w && strlen(ep->path) == plen && strncmp(ep->path, target, plen) == 0) {
            return ep;
        }
    }
    return NULL;
}

static int valid_handshake(const osara_ws_request_t *req)
{
    return req->method && strcmp(req->method, "GET") == 0 && req->upgrade &&
           strcasestr(req->upgrade, "websocket") && req->key && strlen(req->key) == 24 &&
           req->version && strcmp(req->version, "13") == 0;
}

/* The accepted socket's own handle: a duplicate of the HTTP connection's
 * descriptor, so host/http frees its connection as usual. */
static int adopt_socket(osara_ws_conn_t *c, uv_stream_t *stream)
{
    uv_os_fd_t fd;
    if (uv_fileno((uv_handle_t *)stream, &fd) != 0) {
        return -1;
    }
    int dupfd = dup(fd);
    if (dupfd < 0) {
        return -1;
    }
    if (uv_tcp_open(&c->tcp, dupfd) != 0) {
        close(dupfd);
        return -1;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    return 0;
}

int osara_ws_accept(struct osara_worker_s *w, uv_stream_t *stream, const osara_ws_request_t *req,
                    const char *rest, size_t n)
{
    osara_ws_endpoint_t *ep = req->target ? find_endpoint(w, req->target) : NULL;
    if (ep == NULL) {
        return 404;
    }
    if (ep->nconns >= ep->max_conns) {
        return 503; /* each connection costs memory: bounded like HTTP's */
    }
    char token[32];
    if (!valid_handshake(req) || osara__ws_accept_token(req->key, token) != 0) {
        return 400;
    }
    osara__ws_metrics_init();
    osara_ws_conn_t *c = osara__ws_conn_new(w, 0);
    if (adopt_socket(c, stream) != 0) {
        uv_close((uv_handle_t *)&c->tcp, osara__ws_on_tcp_closed);
        return 503;
    }
    osara_metric_gauge_add(osara__ws_m_server_conns, 1);
    c->ep = ep;
    ep->nconns++;
    c->max_inflight = ep->max_inflight;
    c->next = ep->conns;
    if (ep->conns) {
        ep->conns->prev = c;
    }
    ep->conns = c;
    char resp[256];
    int len = snprintf(resp, sizeof(resp),
                       "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                       "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n", token);
    osara__ws_wbuf_add(&c->out, resp, (size_t)len);
    osara__ws_write_out(c);
    if (osara__ws_start_framing(c, ep->max_message) != 0) {
        osara__ws_conn_close(c, NULL);
        return 0;
    }
    osara__ws_feed(c, rest, n);
    return 0;
}

/* Every ping_ms: a connection read from since the last sweep is left
 * alone; an idle one gets a ping; one that stayed silent after its ping
 * (a peer gone without a FIN) is closed. Connections the server stopped
 * reading (max_inflight, a slow reader) are not idle by their fault. */
static void on_ping_tick(uv_timer_t *t)
{
    osara_ws_endpoint_t *ep = t->data;
    uint64_t now = uv_now(t->loop);
    osara_ws_conn_t *next;
    for (osara_ws_conn_t *c = ep->conns; c; c = next) {
        next = c->next;
        if (!c->reading || now - c->last_seen < ep->ping_ms) {
            continue;
        }
        if (c->ping_sent) {
            osara__ws_conn_close(c, NULL);
            continue;
        }
        struct wslay_event_msg ping = {WSLAY_PING, NULL, 0};
        if (wslay_event_queue_msg(c->ctx, &ping) == 0) {
            c->ping_sent = 1;
            c->last_seen = now;
            osara__ws_flush(c);
        }
    }
}

static void endpoint_free(uv_handle_t *h)
{
    free(h->data);
}

/* The endpoint's shared-resource close (shutdown, or no script version
 * serves the path any longer): its clients are told to go away. */
static void endpoint_close(void *ptr)
{
    osara_ws_endpoint_t *ep = ptr;
    for (osara_ws_endpoint_t **p = &endpoints; *p; p = &(*p)->next) {
        if (*p == ep) {
            *p = ep->next;
            break;
        }
    }
    while (ep->conns) {
        osara_ws_conn_t *c = ep->conns;
        osara__ws_detach(c);
        osara__ws_queue_close(c, WSLAY_CODE_GOING_AWAY, "going away");
    }
    uv_close((uv_handle_t *)&ep->ping_timer, endpoint_free);
}

/* serve(path, {max_message=, max_inflight=, max_connections=,
 * ping_interval=}): makes the path an endpoint
 * (kept while a VM holding it lives); limits may change on reload. */
int osara__ws_l_serve(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    struct osara_worker_s *w = osara_vm_from_L(L)->w;
    if (path[0] != '/' || strlen(path) >= sizeof(((osara_ws_endpoint_t *)0)->path)) {
        return luaL_argerror(L, 1, "a path starting with '/'");
    }
    char key[300];
    snprintf(key, sizeof(key), "ws:%s", path);
    osara_ws_endpoint_t *ep = osara_worker_shared_get(w, key);
    if (ep == NULL) {
        ep = osara_xcalloc(1, sizeof(*ep));
        ep->w = w;
        snprintf(ep->path, sizeof(ep->path), "%s", path);
        uv_timer_init(&w->loop, &ep->ping_timer);
        uv_unref((uv_handle_t *)&ep->ping_timer); /* never keeps the loop alive */
        ep->ping_timer.data = ep;
        ep->next = endpoints;
        endpoints = ep;
        osara_worker_shared_put(w, key, ep, endpoint_close);
    }
    lua_getfield(L, 2, "max_message");
    lua_getfield(L, 2, "max_inflight");
    lua_getfield(L, 2, "max_connections");
    lua_getfield(L, 2, "ping_interval");
    ep->max_message = (size_t)luaL_optnumber(L, -4, 1048576);
    ep->max_inflight = (int)luaL_optinteger(L, -3, 256);
    ep->max_conns = (int)luaL_optinteger(L, -2, 1024);
    ep->ping_ms = (uint64_t)(luaL_optnumber(L, -1, 30) * 1000);
    lua_pop(L, 4);
    uv_timer_stop(&ep->ping_timer);
    if (ep->ping_ms > 0) {
        uv_timer_start(&ep->ping_timer, on_ping_tick, ep->ping_ms, ep->ping_ms);
    }
    return 0;
}
