/* client.c - WebSocket connections opened from Lua (osara.rpc.client):
 * resolve, connect, the opening handshake, and events reported to a Lua
 * function of the VM that opened them. */
#include "ws/ws_int.h"

#include <lauxlib.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/mem.h"
#include "core/sched.h"
#include "core/worker.h"

typedef struct {
    osara_ws_conn_t *conn;
} conn_ud_t;



/* Reports an event to the client's Lua function, in a coroutine of the VM
 * that opened it (forced: a retiring VM still gets its calls' replies). */
void osara__ws_client_emit(osara_ws_conn_t *c, const char *kind, const char *data, size_t n)
{
    if (c->vm == NULL || c->cbref == LUA_NOREF) {
        return;
    }
    lua_State *L = c->vm->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->cbref);
    lua_pushstring(L, kind);
    lua_pushlstring(L, data, n); /* L: [on_event, kind, data] */
    osara_sched_spawn(c->vm, 2, 1, NULL, NULL, "ws client event");
}

/* The value of header `name` in a raw HTTP head, copied into out. */
static int header_value(const char *head, const char *name, char *out, size_t cap)
{
    size_t nl = strlen(name);
    for (const char *line = strstr(head, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
        const char *h = line + 2;
        if (strncasecmp(h, name, nl) == 0 && h[nl] == ':') {
            h += nl + 1;
            h += strspn(h, " \t");
            size_t vl = strcspn(h, "\r\n");
            while (vl > 0 && (h[vl - 1] == ' ' || h[vl - 1] == '\t')) {
                vl--;
            }
            if (vl >= cap) {
                return -1;
            }
            memcpy(out, h, vl);
            out[vl] = '\0';
            return 0;
        }
    }
    return -1;
}

/* Collects the server's response head; on a valid 101 starts framing and
 * feeds what followed it. */
void osara__ws_client_handshake_read(osara_ws_conn_t *c, const char *p, size_t n)
{
    osara__ws_wbuf_add(&c->hs, p, n);
    char *end = memmem(c->hs.p, c->hs.len, "\r\n\r\n", 4);
    if (end == NULL) {
        if (c->hs.len > OSARA_WS_MAX_HANDSHAKE) {
            osara__ws_conn_close(c, "handshake: response too large");
        }
        return;
    }
    size_t head_len = (size_t)(end - c->hs.p) + 4;
    char *head = osara_xmalloc(head_len + 1);
    memcpy(head, c->hs.p, head_len);
    head[head_len] = '\0';
    char accept[64];
    int status = 0;
    sscanf(head, "HTTP/1.%*d %d", &status);
    const char *why = NULL;
    if (status != 101) {
        why = "handshake: the server did not switch protocols";
    } else if (header_value(head, "sec-websocket-accept", accept, sizeof(accept)) != 0 ||
               strcmp(accept, c->accept) != 0) {
        why = "handshake: wrong Sec-WebSocket-Accept";
    }
    free(head);
    if (why == NULL && osara__ws_start_framing(c, c->max_message) != 0) {
        why = "handshake: out of memory";
    }
    if (why) {
        char msg[128];
        snprintf(msg, sizeof(msg), "%s (status %d)", why, status);
        osara__ws_conn_close(c, msg);
        return;
    }
    osara_metric_gauge_add(osara__ws_m_client_conns, 1);
    osara__ws_client_emit(c, "open", "", 0);
    osara_ws_buf_t hs = c->hs;
    c->hs = (osara_ws_buf_t){0};
    osara__ws_feed(c, hs.p + head_len, hs.len - head_len);
    free(hs.p);
}

static void on_connected(uv_connect_t *req, int status)
{
    osara_ws_conn_t *c = req->data;
    if (status == 0 && !c->closing) {
        osara__ws_wbuf_add(&c->out, c->request, strlen(c->request));
        osara__ws_write_out(c);
        osara__ws_update_reading(c);
    } else if (!c->closing) {
        char why[128];
        snprintf(why, sizeof(why), "connect: %s", uv_strerror(status));
        osara__ws_conn_close(c, why);
    }
    osara__ws_conn_unref(c);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    osara_ws_conn_t *c = req->data;
    c->resolving = 0;
    int rc = status;
    if (rc == 0 && !c->closing) {
        c->creq.data = c;
        rc = uv_tcp_connect(&c->creq, &c->tcp, res->ai_addr, on_connected);
        if (rc == 0) {
            c->refs++;
        }
    }
    if (rc != 0 && !c->closing) {
        char why[128];
        snprintf(why, sizeof(why), "resolve/connect: %s", uv_strerror(rc));
        osara__ws_conn_close(c, why);
    }
    uv_freeaddrinfo(res);
    osara__ws_conn_unref(c);
}

/* The opening handshake request with a fresh key; records the answer the
 * server must give. */
static int build_request(osara_ws_conn_t *c, const char *host, int port, const char *path)
{
    unsigned char raw[16];
    char key[32];
    if (uv_random(NULL, NULL, raw, sizeof(raw), 0, NULL) != 0) {
        return -1;
    }
    EVP_EncodeBlock((unsigned char *)key, raw, sizeof(raw));
    if (osara__ws_accept_token(key, c->accept) != 0) {
        return -1;
    }
    size_t cap = strlen(host) + strlen(path) + 256;
    c->request = osara_xmalloc(cap);
    snprintf(c->request, cap,
             "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n",
             path, host, port, key);
    return 0;
}

/* The Lua handle owned by the VM is closed with it: no event afterwards. */
static void client_vm_close(void *ptr)
{
    osara_ws_conn_t *c = ptr;
    c->own = NULL;
    c->vm = NULL;
    c->cbref = LUA_NOREF; /* the registry goes with the VM */
    osara__ws_conn_close(c, NULL);
}

/* connect(host, port, path, on_event, {max_message=}) -> handle. Events:
 * on_event("open", ""), ("message", text), ("close", why); "close" comes
 * once, also when connecting fails. */
int osara__ws_l_connect(lua_State *L)
{
    const char *host = luaL_checkstring(L, 1);
    int port = (int)luaL_checkinteger(L, 2);
    const char *path = luaL_checkstring(L, 3);
    luaL_checktype(L, 4, LUA_TFUNCTION);
    luaL_checktype(L, 5, LUA_TTABLE);
    if (port <= 0 || port > 65535) {
        return luaL_argerror(L, 2, "a port between 1 and 65535");
    }
    osara_vm_t *vm = osara_vm_from_L(L);
    osara__ws_metrics_init();
    osara_ws_conn_t *c = osara__ws_conn_new(vm->w, 1);
    lua_getfield(L, 5, "max_message");
    c->max_message = (size_t)luaL_optnumber(L, -1, 1048576);
    lua_pop(L, 1);
    if (build_request(c, host, port, path) != 0) {
        uv_close((uv_handle_t *)&c->tcp, osara__ws_on_tcp_closed);
        return luaL_error(L, "ws: no random source for the handshake key");
    }
    conn_ud_t *ud = lua_newuserdata(L, sizeof(*ud)); /* [.., ud] */
    ud->conn = c;
    luaL_getmetatable(L, OSARA_WS_CONN_MT);
    lua_setmetatable(L, -2);
    c->has_ud = 1;
    c->refs++;
    c->vm = vm;
    lua_pushvalue(L, 4);
    c->cbref = luaL_ref(L, LUA_REGISTRYINDEX);
    c->own = osara_vm_own(vm, client_vm_close, c);
    char portstr[16];
    snprintf(portstr, sizeof(portstr), "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    c->gai.data = c;
    c->refs++;
    int rc = uv_getaddrinfo(&vm->w->loop, &c->gai, on_resolved, host, portstr, &hints);
    c->resolving = rc == 0;
    if (rc != 0) {
        c->refs--;
        char why[128];
        snprintf(why, sizeof(why), "resolve: %s", uv_strerror(rc));
        osara__ws_conn_close(c, why);
    }
    return 1;
}

static osara_ws_conn_t *check_conn(lua_State *L)
{
    conn_ud_t *ud = luaL_checkudata(L, 1, OSARA_WS_CONN_MT);
    return ud->conn;
}

/* send(text) -> true | nil, "closed" */
static int l_conn_send(lua_State *L)
{
    osara_ws_conn_t *c = check_conn(L);
    size_t n;
    const char *p = luaL_checklstring(L, 2, &n);
    if (c == NULL || !c->open || osara__ws_queue_text(c, p, n) != 0) {
        lua_pushnil(L);
        lua_pushliteral(L, "closed");
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* close([code]): a close frame, then the socket; no "close" event. */
static int l_conn_close(lua_State *L)
{
    osara_ws_conn_t *c = check_conn(L);
    int code = (int)luaL_optinteger(L, 2, WSLAY_CODE_NORMAL_CLOSURE);
    if (c == NULL || c->closing) {
        return 0;
    }
    if (c->cbref != LUA_NOREF) {
        luaL_unref(L, LUA_REGISTRYINDEX, c->cbref);
        c->cbref = LUA_NOREF;
    }
    if (c->open) {
        osara__ws_queue_close(c, (uint16_t)code, "");
    } else {
        osara__ws_conn_close(c, NULL);
    }
    return 0;
}

/* alive() -> boolean: open and not closing */
static int l_conn_alive(lua_State *L)
{
    osara_ws_conn_t *c = check_conn(L);
    lua_pushboolean(L, c && c->open && !c->closing && wslay_event_get_write_enabled(c->ctx));
    return 1;
}

static int l_conn_gc(lua_State *L)
{
    conn_ud_t *ud = luaL_checkudata(L, 1, OSARA_WS_CONN_MT);
    osara_ws_conn_t *c = ud->conn;
    if (c == NULL) {
        return 0;
    }
    ud->conn = NULL;
    if (c->own && c->vm) {
        osara_vm_disown(c->vm, c->own);
        c->own = NULL;
    }
    if (c->cbref != LUA_NOREF && c->vm) {
        luaL_unref(L, LUA_REGISTRYINDEX, c->cbref);
    }
    c->cbref = LUA_NOREF;
    c->vm = NULL;
    if (!c->closing) {
        if (c->resolving) {
            uv_cancel((uv_req_t *)&c->gai); /* on_resolved runs as cancelled */
        }
        osara__ws_conn_close(c, NULL);
    }
    c->has_ud = 0;
    osara__ws_conn_unref(c);
    return 0;
}

/* The connection handle's metatable. */
void osara__ws_client_metatable(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"send", l_conn_send}, {"close", l_conn_close}, {"alive", l_conn_alive}, {NULL, NULL},
    };
    luaL_newmetatable(L, OSARA_WS_CONN_MT);
    lua_pushcfunction(L, l_conn_gc);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L);
    luaL_register(L, NULL, methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
}
