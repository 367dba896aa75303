#include "ws/ws.h"

#include <lauxlib.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <wslay/wslay.h>

#include "core/log.h"
#include "core/lvm.h"
#include "core/mem.h"
#include "core/metrics.h"
#include "core/registry.h"
#include "core/sched.h"
#include "core/worker.h"

#define CONN_MT "osara.ws_conn"
#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#define MAX_HANDSHAKE 8192          /* bytes of a server's 101 response */
#define WRITE_HIGH_WATER (4u << 20) /* pending write bytes that pause reading */

typedef struct ws_endpoint_s ws_endpoint_t;
typedef struct ws_conn_s ws_conn_t;

typedef struct {
    char *p;
    size_t len, cap;
} wbuf_t;

struct ws_endpoint_s {
    struct osara_worker_s *w;
    char path[256];
    size_t max_message;
    int max_inflight;
    ws_conn_t *conns;
    ws_endpoint_t *next;
};

/* One WebSocket connection, server or client side. It lives while anything
 * refers to it (refs): its TCP handle until closed, each call in flight,
 * each write in flight, a pending resolve, the client's Lua handle. */
struct ws_conn_s {
    uv_tcp_t tcp;
    struct osara_worker_s *w;
    wslay_event_context_ptr ctx;
    int client;
    int open;            /* handshake done: frames flow */
    int closing;         /* uv_close was called */
    int close_written;   /* close the socket once writes finish */
    int feeding;         /* inside wslay_event_recv: flush afterwards */
    int reading;
    int refs;
    int writes;          /* uv_write requests in flight */
    size_t write_bytes;  /* their bytes */
    const uint8_t *in;   /* bytes being fed to wslay_event_recv */
    size_t in_len;
    wbuf_t out;          /* bytes wslay produced, written in one uv_write */
    /* server */
    ws_endpoint_t *ep;
    int inflight, max_inflight;
    ws_conn_t *prev, *next;
    /* client */
    osara_vm_t *vm;
    osara_own_t *own;
    int cbref;           /* on_event(kind, data) in vm's registry */
    int has_ud;
    uv_getaddrinfo_t gai;
    int resolving;       /* gai is pending */
    uv_connect_t creq;
    char *request;       /* the opening handshake to send */
    char accept[32];     /* the Sec-WebSocket-Accept we expect */
    wbuf_t hs;           /* the server's handshake response so far */
    size_t max_message;
};

typedef struct {
    ws_conn_t *conn;
} conn_ud_t;

static _Thread_local ws_endpoint_t *endpoints; /* this worker thread's */
static osara_metric_t *m_server_conns, *m_client_conns, *m_calls_ok, *m_calls_error;

/* ---- small helpers ----------------------------------------------------------- */

static void wbuf_add(wbuf_t *b, const void *p, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 512;
        while (cap < b->len + n) {
            cap *= 2;
        }
        b->p = osara_xrealloc(b->p, cap);
        b->cap = cap;
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

/* base64(SHA-1(key + GUID)) into out (29 bytes with the NUL). */
static int accept_token(const char *key, char out[32])
{
    char src[128];
    int n = snprintf(src, sizeof(src), "%s%s", key, WS_GUID);
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (n <= 0 || (size_t)n >= sizeof(src) ||
        EVP_Digest(src, (size_t)n, md, &mdlen, EVP_sha1(), NULL) != 1) {
        return -1;
    }
    EVP_EncodeBlock((unsigned char *)out, md, (int)mdlen);
    return 0;
}

static void metrics_init(void)
{
    if (m_server_conns == NULL) {
        m_server_conns = osara_metrics_gauge("osara_ws_connections", "open WebSocket connections",
                                             "side=\"server\"");
        m_client_conns = osara_metrics_gauge("osara_ws_connections", "open WebSocket connections",
                                             "side=\"client\"");
        m_calls_ok = osara_metrics_counter("osara_rpc_calls_total", "RPC calls answered",
                                           "result=\"ok\"");
        m_calls_error = osara_metrics_counter("osara_rpc_calls_total", "RPC calls answered",
                                              "result=\"error\"");
    }
}

/* ---- connection lifetime --------------------------------------------------- */

static void client_emit(ws_conn_t *c, const char *kind, const char *data, size_t n);

static void conn_unref(ws_conn_t *c)
{
    if (--c->refs > 0) {
        return;
    }
    if (c->ctx) {
        wslay_event_context_free(c->ctx);
    }
    free(c->out.p);
    free(c->hs.p);
    free(c->request);
    free(c);
}

static void on_tcp_closed(uv_handle_t *h)
{
    conn_unref(h->data);
}

static void detach_from_endpoint(ws_conn_t *c)
{
    if (c->ep == NULL) {
        return;
    }
    if (c->prev) {
        c->prev->next = c->next;
    } else {
        c->ep->conns = c->next;
    }
    if (c->next) {
        c->next->prev = c->prev;
    }
    c->ep = NULL;
    c->prev = c->next = NULL;
}

/* Closes the socket now. A client reports "close" with `why` unless its Lua
 * side closed it (why == NULL). Calls in flight finish; their replies are
 * dropped. */
static void conn_close(ws_conn_t *c, const char *why)
{
    if (c->closing) {
        return;
    }
    c->closing = 1;
    detach_from_endpoint(c);
    if (c->open || !c->client) {
        osara_metric_gauge_add(c->client ? m_client_conns : m_server_conns, -1);
    }
    uv_close((uv_handle_t *)&c->tcp, on_tcp_closed);
    if (c->client && why) {
        client_emit(c, "close", why, strlen(why));
    }
}

/* ---- writing: wslay's output, one uv_write per flush ------------------------- */

typedef struct {
    uv_write_t req;
    ws_conn_t *conn;
    size_t len;
    char *data;
} ws_write_t;

static void ws_flush(ws_conn_t *c);
static void update_reading(ws_conn_t *c);

static void on_written(uv_write_t *req, int status)
{
    ws_write_t *wr = (ws_write_t *)req;
    ws_conn_t *c = wr->conn;
    c->writes--;
    c->write_bytes -= wr->len;
    free(wr->data);
    free(wr);
    if (status != 0) {
        conn_close(c, "write failed");
    } else if (c->close_written && c->writes == 0) {
        conn_close(c, "closed");
    } else if (!c->closing) {
        ws_flush(c); /* wslay may hold messages back while writes were pending */
        update_reading(c);
    }
    conn_unref(c);
}

/* Writes out what was produced so far (the handshake, frames). */
static void write_out(ws_conn_t *c)
{
    if (c->out.len == 0 || c->closing) {
        return;
    }
    ws_write_t *wr = osara_xcalloc(1, sizeof(*wr));
    wr->conn = c;
    wr->len = c->out.len;
    wr->data = c->out.p;
    c->out = (wbuf_t){0};
    uv_buf_t b = uv_buf_init(wr->data, (unsigned)wr->len);
    if (uv_write(&wr->req, (uv_stream_t *)&c->tcp, &b, 1, on_written) != 0) {
        free(wr->data);
        free(wr);
        conn_close(c, "write failed");
        return;
    }
    c->refs++;
    c->writes++;
    c->write_bytes += wr->len;
}

/* Lets wslay send what it queued (replies, pongs, close frames), then
 * closes the socket once both directions are done. */
static void ws_flush(ws_conn_t *c)
{
    if (c->closing || c->ctx == NULL || c->feeding) {
        return;
    }
    if (wslay_event_want_write(c->ctx) && wslay_event_send(c->ctx) != 0) {
        conn_close(c, "send failed");
        return;
    }
    write_out(c);
    if (!wslay_event_want_read(c->ctx) && !wslay_event_want_write(c->ctx)) {
        uint16_t code = wslay_event_get_status_code_received(c->ctx);
        if (!wslay_event_get_close_received(c->ctx)) {
            code = wslay_event_get_status_code_sent(c->ctx);
        }
        if (code != WSLAY_CODE_NORMAL_CLOSURE && code != WSLAY_CODE_GOING_AWAY) {
            osara_log(OSARA_LOG_DEBUG, "ws: connection closed with status %u", (unsigned)code);
        }
        c->close_written = 1;
        if (c->writes == 0) {
            char why[64];
            snprintf(why, sizeof(why), "closed (status %u)", (unsigned)code);
            conn_close(c, why);
        }
    }
}

static ssize_t on_wslay_send(wslay_event_context_ptr ctx, const uint8_t *data, size_t len,
                             int flags, void *ud)
{
    (void)flags;
    ws_conn_t *c = ud;
    if (c->write_bytes + c->out.len >= WRITE_HIGH_WATER) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK); /* resumed by on_written */
        return -1;
    }
    wbuf_add(&c->out, data, len);
    return (ssize_t)len;
}

/* ---- reading: libuv's bytes, fed to wslay ------------------------------------ */

static ssize_t on_wslay_recv(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags,
                             void *ud)
{
    (void)flags;
    ws_conn_t *c = ud;
    if (c->in_len == 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    size_t n = len < c->in_len ? len : c->in_len;
    memcpy(buf, c->in, n);
    c->in += n;
    c->in_len -= n;
    return (ssize_t)n;
}

static void ws_feed(ws_conn_t *c, const char *p, size_t n)
{
    if (n == 0 || c->closing) {
        return;
    }
    c->in = (const uint8_t *)p;
    c->in_len = n;
    c->feeding = 1;
    int rc = wslay_event_recv(c->ctx);
    c->feeding = 0;
    c->in = NULL;
    c->in_len = 0;
    if (rc != 0) {
        conn_close(c, "receive failed");
        return;
    }
    ws_flush(c);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b)
{
    (void)h;
    b->base = osara_xmalloc(suggested);
    b->len = suggested;
}

static void client_handshake_read(ws_conn_t *c, const char *p, size_t n);

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    ws_conn_t *c = s->data;
    if (nread < 0) {
        free(b->base);
        conn_close(c, nread == UV_EOF ? "closed by the peer" : uv_strerror((int)nread));
        return;
    }
    if (c->client && !c->open) {
        client_handshake_read(c, b->base, (size_t)nread);
    } else {
        ws_feed(c, b->base, (size_t)nread);
    }
    free(b->base);
}

/* Reads while the connection has room: a server connection stops reading
 * at max_inflight calls or when the peer does not read its replies. */
static void update_reading(ws_conn_t *c)
{
    if (c->closing) {
        return;
    }
    int want = c->write_bytes < WRITE_HIGH_WATER &&
               (c->max_inflight <= 0 || c->inflight < c->max_inflight);
    if (want && !c->reading) {
        c->reading = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0;
    } else if (!want && c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = 0;
    }
}

/* Queues a text message (a reply, a call) and sends it unless wslay is
 * reading, which flushes afterwards. */
static int ws_queue_text(ws_conn_t *c, const char *p, size_t n)
{
    if (c->closing || c->ctx == NULL) {
        return -1;
    }
    struct wslay_event_msg msg = {WSLAY_TEXT_FRAME, (const uint8_t *)p, n};
    if (wslay_event_queue_msg(c->ctx, &msg) != 0) {
        return -1;
    }
    ws_flush(c);
    return 0;
}

static void ws_queue_close(ws_conn_t *c, uint16_t code, const char *reason)
{
    if (c->closing || c->ctx == NULL) {
        return;
    }
    wslay_event_queue_close(c->ctx, code, (const uint8_t *)reason, strlen(reason));
    ws_flush(c);
}

static ws_conn_t *conn_new(struct osara_worker_s *w, int client)
{
    ws_conn_t *c = osara_xcalloc(1, sizeof(*c));
    c->w = w;
    c->client = client;
    c->cbref = LUA_NOREF;
    uv_tcp_init(&w->loop, &c->tcp);
    c->tcp.data = c;
    c->refs = 1; /* the handle */
    return c;
}

static int genmask(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, void *ud);
static void on_wslay_msg(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg,
                         void *ud);

/* Starts framing after the handshake: wslay's context, then reading. */
static int start_framing(ws_conn_t *c, size_t max_message)
{
    struct wslay_event_callbacks cb = {
        .recv_callback = on_wslay_recv, .send_callback = on_wslay_send,
        .genmask_callback = genmask, .on_msg_recv_callback = on_wslay_msg,
    };
    int rc = c->client ? wslay_event_context_client_init(&c->ctx, &cb, c)
                       : wslay_event_context_server_init(&c->ctx, &cb, c);
    if (rc != 0) {
        c->ctx = NULL;
        return -1;
    }
    wslay_event_config_set_max_recv_msg_length(c->ctx, max_message);
    c->open = 1;
    update_reading(c);
    return 0;
}

/* ---- server ---------------------------------------------------------------------- */

static void on_call_done(osara_co_t *co, int ok, void *ud)
{
    ws_conn_t *c = ud;
    lua_State *T = osara_co_thread(co);
    c->inflight--;
    osara_metric_add(ok && !lua_toboolean(T, 2) ? m_calls_ok : m_calls_error, 1);
    if (ok && !c->closing && lua_type(T, 1) == LUA_TSTRING) {
        size_t n;
        const char *reply = lua_tolstring(T, 1, &n);
        ws_queue_text(c, reply, n);
    }
    update_reading(c);
    conn_unref(c);
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
static void server_message(ws_conn_t *c, const uint8_t *msg, size_t n)
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
    update_reading(c);
}

static void on_wslay_msg(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg,
                         void *ud)
{
    ws_conn_t *c = ud;
    if (arg->opcode == WSLAY_TEXT_FRAME || arg->opcode == WSLAY_BINARY_FRAME) {
        if (c->client) {
            client_emit(c, "message", (const char *)arg->msg, arg->msg_length);
        } else {
            server_message(c, arg->msg, arg->msg_length);
        }
    }
    (void)ctx;
}

static ws_endpoint_t *find_endpoint(struct osara_worker_s *w, const char *target)
{
    size_t plen = strcspn(target, "?#");
    for (ws_endpoint_t *ep = endpoints; ep; ep = ep->next) {
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
static int adopt_socket(ws_conn_t *c, uv_stream_t *stream)
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
    ws_endpoint_t *ep = req->target ? find_endpoint(w, req->target) : NULL;
    if (ep == NULL) {
        return 404;
    }
    char token[32];
    if (!valid_handshake(req) || accept_token(req->key, token) != 0) {
        return 400;
    }
    metrics_init();
    ws_conn_t *c = conn_new(w, 0);
    if (adopt_socket(c, stream) != 0) {
        uv_close((uv_handle_t *)&c->tcp, on_tcp_closed);
        return 503;
    }
    osara_metric_gauge_add(m_server_conns, 1);
    c->ep = ep;
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
    wbuf_add(&c->out, resp, (size_t)len);
    write_out(c);
    if (start_framing(c, ep->max_message) != 0) {
        conn_close(c, NULL);
        return 0;
    }
    ws_feed(c, rest, n);
    return 0;
}

/* The endpoint's shared-resource close (shutdown, or no script version
 * serves the path any longer): its clients are told to go away. */
static void endpoint_close(void *ptr)
{
    ws_endpoint_t *ep = ptr;
    for (ws_endpoint_t **p = &endpoints; *p; p = &(*p)->next) {
        if (*p == ep) {
            *p = ep->next;
            break;
        }
    }
    while (ep->conns) {
        ws_conn_t *c = ep->conns;
        detach_from_endpoint(c);
        ws_queue_close(c, WSLAY_CODE_GOING_AWAY, "going away");
    }
    free(ep);
}

/* serve(path, {max_message=, max_inflight=}): makes the path an endpoint
 * (kept while a VM holding it lives); limits may change on reload. */
static int l_ws_serve(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    struct osara_worker_s *w = osara_vm_from_L(L)->w;
    if (path[0] != '/' || strlen(path) >= sizeof(((ws_endpoint_t *)0)->path)) {
        return luaL_argerror(L, 1, "a path starting with '/'");
    }
    char key[300];
    snprintf(key, sizeof(key), "ws:%s", path);
    ws_endpoint_t *ep = osara_worker_shared_get(w, key);
    if (ep == NULL) {
        ep = osara_xcalloc(1, sizeof(*ep));
        ep->w = w;
        snprintf(ep->path, sizeof(ep->path), "%s", path);
        ep->next = endpoints;
        endpoints = ep;
        osara_worker_shared_put(w, key, ep, endpoint_close);
    }
    lua_getfield(L, 2, "max_message");
    lua_getfield(L, 2, "max_inflight");
    ep->max_message = (size_t)luaL_optnumber(L, -2, 1048576);
    ep->max_inflight = (int)luaL_optinteger(L, -1, 256);
    lua_pop(L, 2);
    return 0;
}

/* ---- client ---------------------------------------------------------------------- */

/* Masks for client frames: unpredictable to the network path, not secret;
 * a per-thread xorshift seeded from the system's random source. */
static int genmask(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, void *ud)
{
    (void)ctx;
    (void)ud;
    static _Thread_local uint64_t state;
    if (state == 0 && (uv_random(NULL, NULL, &state, sizeof(state), 0, NULL) != 0 || state == 0)) {
        state = (uint64_t)(uintptr_t)&state ^ (uint64_t)uv_hrtime() ^ 0x9E3779B97F4A7C15ull;
    }
    for (size_t i = 0; i < len; i++) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        buf[i] = (uint8_t)state;
    }
    return 0;
}

/* Reports an event to the client's Lua function, in a coroutine of the VM
 * that opened it (forced: a retiring VM still gets its calls' replies). */
static void client_emit(ws_conn_t *c, const char *kind, const char *data, size_t n)
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
static void client_handshake_read(ws_conn_t *c, const char *p, size_t n)
{
    wbuf_add(&c->hs, p, n);
    char *end = memmem(c->hs.p, c->hs.len, "\r\n\r\n", 4);
    if (end == NULL) {
        if (c->hs.len > MAX_HANDSHAKE) {
            conn_close(c, "handshake: response too large");
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
    if (why == NULL && start_framing(c, c->max_message) != 0) {
        why = "handshake: out of memory";
    }
    if (why) {
        char msg[128];
        snprintf(msg, sizeof(msg), "%s (status %d)", why, status);
        conn_close(c, msg);
        return;
    }
    osara_metric_gauge_add(m_client_conns, 1);
    client_emit(c, "open", "", 0);
    wbuf_t hs = c->hs;
    c->hs = (wbuf_t){0};
    ws_feed(c, hs.p + head_len, hs.len - head_len);
    free(hs.p);
}

static void on_connected(uv_connect_t *req, int status)
{
    ws_conn_t *c = req->data;
    if (status == 0 && !c->closing) {
        wbuf_add(&c->out, c->request, strlen(c->request));
        write_out(c);
        c->reading = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0;
    } else if (!c->closing) {
        char why[128];
        snprintf(why, sizeof(why), "connect: %s", uv_strerror(status));
        conn_close(c, why);
    }
    conn_unref(c);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    ws_conn_t *c = req->data;
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
        conn_close(c, why);
    }
    uv_freeaddrinfo(res);
    conn_unref(c);
}

/* The opening handshake request with a fresh key; records the answer the
 * server must give. */
static int build_request(ws_conn_t *c, const char *host, int port, const char *path)
{
    unsigned char raw[16];
    char key[32];
    if (uv_random(NULL, NULL, raw, sizeof(raw), 0, NULL) != 0) {
        return -1;
    }
    EVP_EncodeBlock((unsigned char *)key, raw, sizeof(raw));
    if (accept_token(key, c->accept) != 0) {
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
    ws_conn_t *c = ptr;
    c->own = NULL;
    c->vm = NULL;
    c->cbref = LUA_NOREF; /* the registry goes with the VM */
    conn_close(c, NULL);
}

/* connect(host, port, path, on_event, {max_message=}) -> handle. Events:
 * on_event("open", ""), ("message", text), ("close", why); "close" comes
 * once, also when connecting fails. */
static int l_ws_connect(lua_State *L)
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
    metrics_init();
    ws_conn_t *c = conn_new(vm->w, 1);
    lua_getfield(L, 5, "max_message");
    c->max_message = (size_t)luaL_optnumber(L, -1, 1048576);
    lua_pop(L, 1);
    if (build_request(c, host, port, path) != 0) {
        uv_close((uv_handle_t *)&c->tcp, on_tcp_closed);
        return luaL_error(L, "ws: no random source for the handshake key");
    }
    conn_ud_t *ud = lua_newuserdata(L, sizeof(*ud)); /* [.., ud] */
    ud->conn = c;
    luaL_getmetatable(L, CONN_MT);
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
        conn_close(c, why);
    }
    return 1;
}

static ws_conn_t *check_conn(lua_State *L)
{
    conn_ud_t *ud = luaL_checkudata(L, 1, CONN_MT);
    return ud->conn;
}

/* send(text) -> true | nil, "closed" */
static int l_conn_send(lua_State *L)
{
    ws_conn_t *c = check_conn(L);
    size_t n;
    const char *p = luaL_checklstring(L, 2, &n);
    if (c == NULL || !c->open || ws_queue_text(c, p, n) != 0) {
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
    ws_conn_t *c = check_conn(L);
    int code = (int)luaL_optinteger(L, 2, WSLAY_CODE_NORMAL_CLOSURE);
    if (c == NULL || c->closing) {
        return 0;
    }
    if (c->cbref != LUA_NOREF) {
        luaL_unref(L, LUA_REGISTRYINDEX, c->cbref);
        c->cbref = LUA_NOREF;
    }
    if (c->open) {
        ws_queue_close(c, (uint16_t)code, "");
    } else {
        conn_close(c, NULL);
    }
    return 0;
}

/* alive() -> boolean: open and not closing */
static int l_conn_alive(lua_State *L)
{
    ws_conn_t *c = check_conn(L);
    lua_pushboolean(L, c && c->open && !c->closing && wslay_event_get_write_enabled(c->ctx));
    return 1;
}

static int l_conn_gc(lua_State *L)
{
    conn_ud_t *ud = luaL_checkudata(L, 1, CONN_MT);
    ws_conn_t *c = ud->conn;
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
        conn_close(c, NULL);
    }
    c->has_ud = 0;
    conn_unref(c);
    return 0;
}

/* Registry kind "rpc": exposed functions live in Lua (lua/osara/rpc.lua);
 * the kind makes `osara check` list them and reloads report them. */
static int rpc_start(osara_reg_entry_t *e)
{
    (void)e;
    return 0;
}

static const osara_reg_kind_t rpc_kind = {.name = "rpc", .start = rpc_start};

int osara_ws_open(lua_State *L)
{
    osara_registry_kind(&rpc_kind);
    static const luaL_Reg fns[] = {
        {"serve", l_ws_serve}, {"connect", l_ws_connect}, {NULL, NULL},
    };
    static const luaL_Reg methods[] = {
        {"send", l_conn_send}, {"close", l_conn_close}, {"alive", l_conn_alive}, {NULL, NULL},
    };
    luaL_newmetatable(L, CONN_MT);
    lua_pushcfunction(L, l_conn_gc);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L);
    luaL_register(L, NULL, methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
