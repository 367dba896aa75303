#include "http/http.h"

#include <errno.h>
#include <http_parser.h>
#include <limits.h>
#include <strings.h>
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "core/err.h"
#include "core/log.h"
#include "core/mem.h"
#include "core/lvm.h"
#include "core/metrics.h"
#include "core/registry.h"
#include "core/sched.h"
#include "core/worker.h"
#include "ws/ws.h"

typedef struct hserver_s hserver_t;
typedef struct hconn_s hconn_t;
typedef struct req_ud_s req_ud_t;

#define REQ_MT "osara.http_request"

typedef struct {
    char *p;
    size_t len, cap;
} buf_t;

typedef struct hreq_s {
    hconn_t *conn;
    uint64_t id;
    buf_t url, headers, body;   /* headers: "name\0value\0" pairs, names lowercased */
    char method[16];
    int in_value;               /* parsing: last callback was a header value */
    int keepalive;
    int complete;
    int dispatched, finished, streaming;
    int ended;                  /* a streamed response was finished */
    double t0;
    req_ud_t *ud;               /* the Lua handle, while both live */
    struct hreq_s *next;
} hreq_t;

/* The request handle Lua holds (req._token): cleared when the request is
 * freed, so a handle kept past its response raises instead of touching
 * freed memory. */
struct req_ud_s {
    hreq_t *r;
};

struct hconn_s {
    uv_tcp_t tcp;
    uv_timer_t timer;
    hserver_t *srv;
    http_parser parser;
    hreq_t *cur;                /* being parsed */
    hreq_t *head, *tail;        /* parsed, answered in order */
    hreq_t *upgrading;          /* a WebSocket request, handed to host/ws */
    int nqueued;                /* requests from head to tail */
    buf_t held;                 /* bytes read but not parsed while congested */
    size_t header_bytes;
    int closing;
    int reading;                /* uv_read_start is in effect */
    int parsing;                /* inside http_parser_execute */
    int ending;                 /* last answer sent: closes once written, reads no more */
    int writes;                 /* uv_write requests not completed */
    int refusing;               /* the status refusing the request being parsed, sent
                                   once the requests before it are answered */
    int handles;                /* tcp + timer open */
    int busy;                   /* requests held by Lua coroutines */
    hconn_t *prev, *next;       /* the server's connections */
};

struct hserver_s {
    osara_worker_t *w;
    uv_tcp_t tcp;
    char addr[64];
    http_parser_settings settings;
    size_t max_header, max_body;
    double request_timeout, idle_timeout;
    int max_conns, nconns;
    int closed;                 /* the listener is closed (shutdown, or a reload dropped it) */
    int refs;                   /* the listener + every connection not yet freed */
    hconn_t *conns;
    uint64_t next_id;
};

/* A client that pipelines requests without reading the answers must not
 * grow the server: past MAX_QUEUED parsed requests or MAX_UNSENT bytes of
 * answers the kernel would not take yet, the connection stops reading (and
 * answering) until the client catches up. */
#define MAX_QUEUED 32
#define MAX_UNSENT ((size_t)1 << 20)

static osara_metric_t *m_rejected, *m_conns, *m_reclaimed;
static http_parser_settings parser_settings;

/* ---- buffers ------------------------------------------------------------- */

static int buf_add(buf_t *b, const char *p, size_t n)
{
    if (n > ((size_t)1 << 40)) {
        return -1; /* a negative length cast to size_t */
    }
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        while (cap < b->len + n + 1) {
            cap *= 2;
        }
        b->p = osara_xrealloc(b->p, cap);
        b->cap = cap;
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

static void req_free(hreq_t *r)
{
    if (r->ud) {
        r->ud->r = NULL;
    }
    free(r->url.p);
    free(r->headers.p);
    free(r->body.p);
    free(r);
}

/* ---- connection lifetime ----------------------------------------------- */

/* Drops one reference; the last one frees the server. Connections hold one
 * each, so a listener closed by a reload (a changed port) or at shutdown
 * stays readable until its last connection is gone. */
static void server_unref(hserver_t *srv)
{
    if (--srv->refs == 0) {
        free(srv);
    }
}

static void conn_maybe_free(hconn_t *c)
{
    if (c->handles > 0 || c->busy > 0) {
        return;
    }
    hserver_t *srv = c->srv;
    if (c->prev) {
        c->prev->next = c->next;
    } else {
        srv->conns = c->next;
    }
    if (c->next) {
        c->next->prev = c->prev;
    }
    hreq_t *r = c->head;
    while (r) {
        hreq_t *next = r->next;
        req_free(r);
        r = next;
    }
    if (c->cur) {
        req_free(c->cur);
    }
    if (c->upgrading) {
        req_free(c->upgrading);
    }
    free(c->held.p);
    free(c);
    server_unref(srv);
}

static void on_handle_closed(uv_handle_t *h)
{
    hconn_t *c = h->data;
    c->handles--;
    conn_maybe_free(c);
}

static void conn_close(hconn_t *c)
{
    if (c->closing) {
        return;
    }
    c->closing = 1;
    c->srv->nconns--;
    osara_metric_gauge_add(m_conns, -1);
    uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
    uv_close((uv_handle_t *)&c->timer, on_handle_closed);
}

static void on_timeout(uv_timer_t *t);

static void arm_timer(hconn_t *c, double secs)
{
    if (!c->closing && secs > 0) {
        uv_update_time(c->tcp.loop);
        uv_timer_start(&c->timer, on_timeout, (uint64_t)(secs * 1000), 0);
    }
}

/* ---- writing ------------------------------------------------------------ */

typedef struct {
    uv_write_t req;
    hconn_t *conn;
    int close_after;
    char data[];
} wreq_t;

static void dispatch_next(hconn_t *c);
static void conn_resume(hconn_t *c);

static void on_written(uv_write_t *req, int status)
{
    wreq_t *w = (wreq_t *)req;
    hconn_t *c = w->conn;
    c->busy--;
    c->writes--;
    if (status != 0 || w->close_after || (c->ending && c->writes == 0)) {
        conn_close(c);
    }
    free(w);
    if (!c->closing) {
        dispatch_next(c); /* the client read: answers may go on */
        conn_resume(c);
    }
    conn_maybe_free(c);
}

static int conn_write(hconn_t *c, const char *p, size_t n, int close_after)
{
    if (c->closing) {
        return -1;
    }
    wreq_t *w = osara_xmalloc(sizeof(*w) + n);
    memcpy(w->data, p, n);
    w->conn = c;
    w->close_after = close_after;
    uv_buf_t b = uv_buf_init(w->data, (unsigned)n);
    c->busy++;
    c->writes++;
    if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_written) != 0) {
        c->busy--;
        c->writes--;
        free(w);
        conn_close(c);
        return -1;
    }
    return 0;
}

static const char *reason(int status)
{
    switch (status) {
    case 200: return "OK";
    case 201: return "Created";
    case 204: return "No Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 304: return "Not Modified";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 413: return "Payload Too Large";
    case 415: return "Unsupported Media Type";
    case 422: return "Unprocessable Entity";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    default: return "Status";
    }
}

/* A response built in C for protocol errors; closes the connection and frees
 * the request being parsed (up to max_body bytes). */
static void reject(hconn_t *c, int status, const char *why)
{
    char resp[512];
    char body[256];
    int blen = snprintf(body, sizeof(body), "{\"error\":\"%s\"}", why);
    int n = snprintf(resp, sizeof(resp),
                     "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                     "Content-Length: %d\r\nConnection: close\r\n\r\n%s",
                     status, reason(status), blen, body);
    char labels[64];
    snprintf(labels, sizeof(labels), "status=\"%d\"", status);
    osara_metric_add(osara_metrics_counter("osara_http_rejected_total",
                                           "requests refused by a limit or as malformed", labels), 1);
    (void)m_rejected;
    c->ending = 1;
    if (c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = 0;
    }
    conn_write(c, resp, (size_t)n, 1);
    if (c->cur) {
        req_free(c->cur);
        c->cur = NULL;
    }
}

/* ---- flow control ---------------------------------------------------------- */

static size_t unsent(hconn_t *c)
{
    return c->tcp.write_queue_size;
}

static int congested(hconn_t *c)
{
    return c->nqueued >= MAX_QUEUED || unsent(c) >= MAX_UNSENT;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b);
static void conn_parse(hconn_t *c, const char *p, size_t n);

static void conn_read_stop(hconn_t *c)
{
    if (c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = 0;
    }
}

/* Reads again once a congested connection caught up: the bytes held back
 * are parsed first (they may congest it again), then reading restarts.
 * Callers may be inside the parser (a route answering synchronously): the
 * outer parse goes on by itself then. */
static void conn_resume(hconn_t *c)
{
    if (c->closing || c->ending || c->refusing || c->parsing || congested(c)) {
        return;
    }
    if (HTTP_PARSER_ERRNO(&c->parser) == HPE_PAUSED) {
        http_parser_pause(&c->parser, 0);
        buf_t held = c->held;
        c->held = (buf_t){0};
        if (held.len > 0) {
            conn_parse(c, held.p, held.len);
        }
        free(held.p);
        if (c->closing || HTTP_PARSER_ERRNO(&c->parser) == HPE_PAUSED) {
            return;
        }
    }
    if (!c->reading && uv_read_start((uv_stream_t *)&c->tcp, osara_uv_alloc, on_read) == 0) {
        c->reading = 1;
    }
}

/* Refuses the request being parsed (and closes): at once, or after the
 * pipelined requests before it are answered, so answers stay in order. */
static void refuse(hconn_t *c, int status)
{
    if (c->head && !c->ending) {
        c->refusing = status; /* req_done sends it */
        conn_read_stop(c);
        return;
    }
    reject(c, status, status == 431   ? "request headers too large"
                      : status == 413 ? "request body too large"
                      : status == 408 ? "request timeout"
                                      : "malformed request");
}

/* Closes the connection once its answers are written (closing at once
 * would drop the ones the client has not read yet). */
static void conn_end(hconn_t *c)
{
    c->ending = 1;
    conn_read_stop(c);
    if (c->writes == 0) {
        conn_close(c);
    } else {
        arm_timer(c, c->srv->idle_timeout); /* a client that never reads them */
    }
}

/* ---- dispatch to Lua ------------------------------------------------------ */

static void req_done(hconn_t *c, hreq_t *r)
{
    /* r is the head: drop it and go on with the next pipelined request. */
    c->head = r->next;
    if (c->head == NULL) {
        c->tail = NULL;
    }
    c->nqueued--;
    int keep = r->keepalive && !c->srv->closed;
    req_free(r);
    if (!keep) {
        conn_end(c);
        return;
    }
    if (c->head == NULL && c->refusing) {
        refuse(c, c->refusing);
        return;
    }
    if (c->head) {
        dispatch_next(c);
    } else {
        arm_timer(c, c->srv->idle_timeout);
    }
    conn_resume(c);
}

/* Writes status line, headers (table at idx on L) and body. */
static void write_response(hconn_t *c, hreq_t *r, lua_State *L, int status, int hidx,
                           const char *body, size_t blen, int chunked)
{
    if (c->srv->closed) {
        r->keepalive = 0; /* the listener is gone: this is the last answer */
    }
    buf_t out = {0};
    char line[256];
    int n = snprintf(line, sizeof(line), "HTTP/1.1 %d %s\r\n", status, reason(status));
    buf_add(&out, line, (size_t)n);
    int has_type = 0;
    if (lua_istable(L, hidx)) {
        lua_pushnil(L);
        while (lua_next(L, hidx) != 0) {
            const char *k = lua_tostring(L, -2), *v = lua_tostring(L, -1);
            if (k && v && !strpbrk(k, "\r\n") && !strpbrk(v, "\r\n")) {
                if (strcasecmp(k, "content-type") == 0) {
                    has_type = 1;
                }
                buf_add(&out, k, strlen(k));
                buf_add(&out, ": ", 2);
                buf_add(&out, v, strlen(v));
                buf_add(&out, "\r\n", 2);
            }
            lua_pop(L, 1);
        }
    }
    if (!has_type) {
        buf_add(&out, "Content-Type: text/plain\r\n", 26);
    }
    if (chunked) {
        buf_add(&out, "Transfer-Encoding: chunked\r\n", 28);
    } else {
        n = snprintf(line, sizeof(line), "Content-Length: %zu\r\n", blen);
        buf_add(&out, line, (size_t)n);
    }
    if (!r->keepalive) {
        buf_add(&out, "Connection: close\r\n", 19);
    }
    buf_add(&out, "\r\n", 2);
    if (!chunked && strcmp(r->method, "HEAD") != 0) {
        buf_add(&out, body, blen);
    }
    conn_write(c, out.p, out.len, 0);
    free(out.p);
}

static void on_lua_done(osara_co_t *co, int ok, void *ud)
{
    hreq_t *r = ud;
    hconn_t *c = r->conn;
    c->busy--;
    lua_State *T = osara_co_thread(co);
    if (!r->streaming && !c->closing) {
        if (ok && lua_gettop(T) >= 3 && lua_isnumber(T, 1)) {
            size_t blen;
            const char *body = lua_tolstring(T, 3, &blen);
            write_response(c, r, T, (int)lua_tointeger(T, 1), 2, body ? body : "", body ? blen : 0, 0);
        } else {
            /* The Lua dispatcher catches handler errors; this is a failure of
             * the dispatcher itself (or a cancellation). */
            static const char msg[] = "{\"error\":\"internal error\"}";
            r->keepalive = 0;
            write_response(c, r, T, 500, 0, msg, sizeof(msg) - 1, 0);
        }
    }
    r->finished = 1;
    if (c->closing) {
        conn_maybe_free(c);
        return;
    }
    req_done(c, r);
}

static void push_request(lua_State *T, hreq_t *r)
{
    lua_createtable(T, 0, 8);
    lua_pushstring(T, r->method);
    lua_setfield(T, -2, "method");
    lua_pushlstring(T, r->url.p ? r->url.p : "/", r->url.p ? r->url.len : 1);
    lua_setfield(T, -2, "target");
    lua_createtable(T, 0, 8);
    for (size_t i = 0; i < r->headers.len;) {
        const char *k = r->headers.p + i;
        size_t kl = strlen(k);
        const char *v = k + kl + 1;
        size_t vl = strlen(v);
        lua_pushlstring(T, k, kl);
        lua_pushlstring(T, v, vl);
        lua_rawset(T, -3);
        i += kl + vl + 2;
    }
    lua_setfield(T, -2, "headers");
    lua_pushlstring(T, r->body.p ? r->body.p : "", r->body.len);
    lua_setfield(T, -2, "body");
    lua_pushnumber(T, (double)r->id);
    lua_setfield(T, -2, "id");
    req_ud_t *ud = lua_newuserdata(T, sizeof(*ud));
    ud->r = r;
    r->ud = ud;
    luaL_getmetatable(T, REQ_MT);
    lua_setmetatable(T, -2);
    lua_setfield(T, -2, "_token");
    lua_pushnumber(T, r->t0);
    lua_setfield(T, -2, "t0");
}

static void dispatch_next(hconn_t *c)
{
    hreq_t *r = c->head;
    if (r == NULL || !r->complete || r->dispatched || c->closing || c->ending || c->srv->w == NULL) {
        return;
    }
    if (unsent(c) >= MAX_UNSENT) {
        /* the client is not reading its answers: wait (on_written) */
        arm_timer(c, c->srv->idle_timeout);
        return;
    }
    uv_timer_stop(&c->timer);
    osara_worker_t *w = c->srv->w;
    osara_co_t *co;
    lua_State *T = w->vm ? osara_sched_acquire(w->vm, 0, &co) : NULL;
    if (T == NULL) {
        reject(c, 503, "shutting down");
        return;
    }
    r->dispatched = 1;
    c->busy++;
    lua_getglobal(T, "require");
    lua_pushliteral(T, "osara.http");
    lua_call(T, 1, 1);
    lua_getfield(T, -1, "_dispatch");
    lua_remove(T, -2);
    push_request(T, r); /* T: [dispatch, req] */
    char what[256];
    snprintf(what, sizeof(what), "http %s %.100s", r->method, r->url.p ? r->url.p : "/");
    osara_sched_run(co, 1, on_lua_done, r, what);
}

/* ---- parsing -------------------------------------------------------------- */

/* The request being parsed, created at its first byte. */
static hreq_t *cur(http_parser *p)
{
    hconn_t *c = p->data;
    if (c->cur == NULL) {
        c->cur = osara_xcalloc(1, sizeof(hreq_t));
        c->cur->conn = c;
        c->cur->id = ++c->srv->next_id;
        c->cur->t0 = osara_monotonic();
        c->header_bytes = 0;
        arm_timer(c, c->srv->request_timeout);
    }
    return c->cur;
}

static int on_message_begin(http_parser *p)
{
    cur(p);
    return 0;
}

static int on_url(http_parser *p, const char *at, size_t n)
{
    hconn_t *c = p->data;
    c->header_bytes += n;
    if (c->header_bytes > c->srv->max_header) {
        return 1;
    }
    return buf_add(&cur(p)->url, at, n);
}

static int on_header_field(http_parser *p, const char *at, size_t n)
{
    hconn_t *c = p->data;
    hreq_t *r = cur(p);
    c->header_bytes += n;
    if (c->header_bytes > c->srv->max_header) {
        return 1;
    }
    if (r->in_value) {
        r->in_value = 0;
        if (buf_add(&r->headers, "", 1) != 0) { /* terminate the previous value */
            return -1;
        }
    }
    char low[256];
    size_t k = 0;
    for (; k < n && k < sizeof(low); k++) {
        low[k] = (char)((at[k] >= 'A' && at[k] <= 'Z') ? at[k] + 32 : at[k]);
    }
    return buf_add(&r->headers, low, k);
}

static int on_header_value(http_parser *p, const char *at, size_t n)
{
    hconn_t *c = p->data;
    hreq_t *r = cur(p);
    c->header_bytes += n;
    if (c->header_bytes > c->srv->max_header) {
        return 1;
    }
    if (!r->in_value) {
        r->in_value = 1;
        if (buf_add(&r->headers, "", 1) != 0) { /* terminate the name */
            return -1;
        }
    }
    return buf_add(&r->headers, at, n);
}

static int has_header(hreq_t *r, const char *name, const char *value)
{
    for (size_t i = 0; i < r->headers.len;) {
        const char *k = r->headers.p + i;
        const char *v = k + strlen(k) + 1;
        if (strcmp(k, name) == 0 && strcasecmp(v, value) == 0) {
            return 1;
        }
        i += strlen(k) + strlen(v) + 2;
    }
    return 0;
}

/* The value of header `name` (lowercase), or NULL. */
static const char *header(hreq_t *r, const char *name)
{
    for (size_t i = 0; i < r->headers.len;) {
        const char *k = r->headers.p + i;
        const char *v = k + strlen(k) + 1;
        if (strcmp(k, name) == 0) {
            return v;
        }
        i += strlen(k) + strlen(v) + 2;
    }
    return NULL;
}

static int on_headers_complete(http_parser *p)
{
    hreq_t *r = cur(p);
    if (r->in_value) {
        r->in_value = 0;
        if (buf_add(&r->headers, "", 1) != 0) {
            return -1;
        }
    }
    snprintf(r->method, sizeof(r->method), "%s", http_method_str(p->method));
    r->keepalive = http_should_keep_alive(p);
    hconn_t *c = p->data;
    if (p->content_length != ULLONG_MAX && p->content_length > c->srv->max_body) {
        return 3; /* an error for http-parser (1 and 2 mean "skip body") */
    }
    if (has_header(r, "expect", "100-continue") && c->srv->w != NULL) {
        conn_write(c, "HTTP/1.1 100 Continue\r\n\r\n", 25, 0);
    }
    return 0;
}

static int on_body(http_parser *p, const char *at, size_t n)
{
    hconn_t *c = p->data;
    hreq_t *r = cur(p);
    if (r->body.len + n > c->srv->max_body) {
        return 2;
    }
    return buf_add(&r->body, at, n);
}

static int on_message_complete(http_parser *p)
{
    hconn_t *c = p->data;
    hreq_t *r = cur(p);
    r->keepalive = http_should_keep_alive(p);
    r->complete = 1;
    c->cur = NULL;
    if (p->upgrade && has_header(r, "upgrade", "websocket")) {
        c->upgrading = r; /* on_read hands it over with the bytes after it */
        return 0;
    }
    if (c->tail) {
        c->tail->next = r;
    } else {
        c->head = r;
    }
    c->tail = r;
    c->nqueued++;
    dispatch_next(c);
    if (congested(c) && !c->closing) {
        http_parser_pause(p, 1); /* conn_parse holds the rest back */
    }
    return 0;
}

/* A request for a WebSocket goes to host/ws with the bytes that followed
 * it; this connection then closes without writing (ws owns a duplicate of
 * its socket) or answers why not. */
static void hand_over(hconn_t *c, const char *rest, size_t n)
{
    hreq_t *r = c->upgrading;
    c->upgrading = NULL;
    osara_ws_request_t req = {r->method, r->url.p, header(r, "upgrade"),
                              header(r, "sec-websocket-key"), header(r, "sec-websocket-version")};
    int status = c->head ? 400 : osara_ws_accept(c->srv->w, (uv_stream_t *)&c->tcp, &req, rest, n);
    req_free(r);
    if (status == 0) {
        conn_close(c);
    } else {
        reject(c, status, status == 404   ? "no websocket endpoint here"
                          : status == 503 ? "too many websocket connections"
                                          : "bad websocket handshake");
    }
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    hconn_t *c = s->data;
    if (nread < 0) {
        free(b->base);
        conn_close(c); /* the client went away (or an error) */
        return;
    }
    if (nread == 0 || c->closing) {
        free(b->base);
        return;
    }
    conn_parse(c, b->base, (size_t)nread);
    free(b->base);
}

/* The answer to bytes the parser refused: 431, 413 or 400. */
static int refusal(hconn_t *c, enum http_errno err)
{
    if (c->header_bytes > c->srv->max_header) {
        return 431;
    }
    if (err == HPE_CB_headers_complete || err == HPE_CB_body) {
        return 413;
    }
    return 400;
}

/* Parses bytes read. When a request congests the connection the parser
 * pauses: the rest of the bytes wait in c->held and reading stops until
 * conn_resume. */
static void conn_parse(hconn_t *c, const char *p, size_t n)
{
    c->parsing = 1;
    size_t done = http_parser_execute(&c->parser, &c->srv->settings, p, n);
    c->parsing = 0;
    enum http_errno err = HTTP_PARSER_ERRNO(&c->parser);
    if (c->upgrading && err == HPE_OK) {
        hand_over(c, p + done, n - done);
        return;
    }
    if (err == HPE_PAUSED) {
        buf_add(&c->held, p + done, n - done);
        conn_read_stop(c);
        return;
    }
    if (err == HPE_OK && done == n) {
        return;
    }
    refuse(c, refusal(c, err));
}

static void on_timeout(uv_timer_t *t)
{
    hconn_t *c = t->data;
    if (c->refusing) {
        return; /* closes once the requests before are answered */
    } else if (c->cur) {
        refuse(c, 408); /* slow or stalled client */
    } else if (c->head == NULL || !c->head->dispatched) {
        /* idle, silent since it connected, or not reading its answers */
        conn_close(c);
    }
}

/* Makes room for a new connection when every slot is taken: closes the
 * oldest connection that waits for a request (idle keep-alive, or silent
 * since it connected) and is not writing. Returns 0 when there is none. */
static int reclaim_slot(hserver_t *srv, hconn_t *newest)
{
    hconn_t *oldest = NULL;
    for (hconn_t *c = srv->conns; c; c = c->next) { /* newest first */
        if (c != newest && !c->closing && c->cur == NULL && c->head == NULL && c->busy == 0) {
            oldest = c;
        }
    }
    if (oldest == NULL) {
        return 0;
    }
    conn_close(oldest);
    osara_metric_add(m_reclaimed, 1);
    return 1;
}

static void on_connection(uv_stream_t *server, int status)
{
    hserver_t *srv = server->data;
    if (status < 0) {
        return;
    }
    hconn_t *c = osara_xcalloc(1, sizeof(*c));
    c->srv = srv;
    srv->refs++;
    c->next = srv->conns;
    if (srv->conns) {
        srv->conns->prev = c;
    }
    srv->conns = c;
    uv_tcp_init(&srv->w->loop, &c->tcp);
    uv_timer_init(&srv->w->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->handles = 2;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        c->closing = 1;
        uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
        uv_close((uv_handle_t *)&c->timer, on_handle_closed);
        return;
    }
    srv->nconns++;
    osara_metric_gauge_add(m_conns, 1);
    uv_tcp_nodelay(&c->tcp, 1);
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    if (srv->nconns > srv->max_conns && !reclaim_slot(srv, c)) {
        reject(c, 503, "too many connections");
        return;
    }
    /* A new connection owes a request: it gets the request timeout, so
     * connections that never send a byte cannot hold slots for long. */
    arm_timer(c, srv->request_timeout);
    if (uv_read_start((uv_stream_t *)&c->tcp, osara_uv_alloc, on_read) != 0) {
        conn_close(c);
        return;
    }
    c->reading = 1;
}

/* ---- server ---------------------------------------------------------------- */

static void server_closed(uv_handle_t *h)
{
    server_unref(h->data);
}

/* Closes the listener (a reload stopped naming this address, or shutdown).
 * Idle connections close now; one answering a request closes after its
 * response (sent with Connection: close), so a request of the old script
 * version finishes on its connection. */
static void server_close(void *ptr)
{
    hserver_t *srv = ptr;
    srv->closed = 1;
    uv_close((uv_handle_t *)&srv->tcp, server_closed);
    for (hconn_t *c = srv->conns; c; c = c->next) {
        if (c->head == NULL && c->busy == 0) {
            conn_close(c);
        }
    }
}

/* "host:port" (host may be empty: 127.0.0.1) -> 0, or -1 with the reason
 * recorded. The port is checked, not wrapped: 99999 is an error. */
static int parse_addr(const char *s, struct sockaddr_in *a)
{
    char host[64];
    const char *colon = strrchr(s, ':');
    if (colon == NULL || colon - s >= (int)sizeof(host)) {
        osara_err_set(OSARA_EINVAL, "invalid listen address '%s' (host:port)", s);
        return -1;
    }
    const char *port = colon + 1;
    size_t digits = strspn(port, "0123456789");
    if (digits == 0 || digits > 5 || port[digits] != '\0' || atoi(port) > 65535) {
        osara_err_set(OSARA_EINVAL, "invalid port '%s' in listen address '%s' (0 to 65535)", port, s);
        return -1;
    }
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = '\0';
    if (uv_ip4_addr(host[0] ? host : "127.0.0.1", atoi(port), a) != 0) {
        osara_err_set(OSARA_EINVAL, "invalid host '%s' in listen address '%s' (an IPv4 address)",
                      host, s);
        return -1;
    }
    return 0;
}

/* listen(addr, {max_header=, max_body=, request_timeout=, idle_timeout=,
 * max_connections=}) -> "host:port" actually bound, created (false: the
 * socket an earlier version opened, reused) | raises */
static int l_http_listen(lua_State *L)
{
    const char *addr = luaL_checkstring(L, 1);
    osara_worker_t *w = osara_vm_from_L(L)->w;
    if (m_conns == NULL) {
        m_conns = osara_metrics_gauge("osara_http_connections", "open HTTP connections", NULL);
        m_reclaimed = osara_metrics_counter("osara_http_reclaimed_total",
                                            "connections waiting for a request closed to make room",
                                            NULL);
    }
    char key[128];
    snprintf(key, sizeof(key), "http:%s", addr);
    hserver_t *srv = w->opts.mode == OSARA_MODE_CHECK ? NULL : osara_worker_shared_get(w, key);
    int created = srv == NULL && w->opts.mode != OSARA_MODE_CHECK;
    if (created) {
        struct sockaddr_in a;
        if (parse_addr(addr, &a) != 0) {
            return luaL_error(L, "http: %s", osara_err_msg());
        }
        srv = osara_xcalloc(1, sizeof(*srv));
        srv->w = w;
        srv->refs = 1; /* the listener */
        srv->settings = parser_settings;
        uv_tcp_init(&w->loop, &srv->tcp);
        srv->tcp.data = srv;
        int rc = uv_tcp_bind(&srv->tcp, (struct sockaddr *)&a, 0);
        if (rc == 0) {
            rc = uv_listen((uv_stream_t *)&srv->tcp, 511, on_connection);
        }
        if (rc != 0) {
            uv_close((uv_handle_t *)&srv->tcp, server_closed);
            return luaL_error(L, "http: cannot listen on %s: %s", addr, uv_strerror(rc));
        }
        struct sockaddr_in bound;
        int len = sizeof(bound);
        rc = uv_tcp_getsockname(&srv->tcp, (struct sockaddr *)&bound, &len);
        if (rc != 0) {
            uv_close((uv_handle_t *)&srv->tcp, server_closed);
            return luaL_error(L, "http: cannot read the address bound for %s: %s", addr,
                              uv_strerror(rc));
        }
        char ip[32];
        uv_ip4_name(&bound, ip, sizeof(ip));
        snprintf(srv->addr, sizeof(srv->addr), "%s:%d", ip, ntohs(bound.sin_port));
        osara_worker_shared_put(w, key, srv, server_close);
    }
    if (srv == NULL) {
        lua_pushstring(L, addr);
        return 1;
    }
    /* Limits may change on reload without closing the socket. */
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_getfield(L, 2, "max_header");
    lua_getfield(L, 2, "max_body");
    lua_getfield(L, 2, "request_timeout");
    lua_getfield(L, 2, "idle_timeout");
    lua_getfield(L, 2, "max_connections");
    srv->max_header = (size_t)luaL_optnumber(L, -5, 16384);
    srv->max_body = (size_t)luaL_optnumber(L, -4, 1048576);
    srv->request_timeout = luaL_optnumber(L, -3, 10);
    srv->idle_timeout = luaL_optnumber(L, -2, 60);
    srv->max_conns = (int)luaL_optinteger(L, -1, 1024);
    lua_pop(L, 5);
    lua_pushstring(L, srv->addr);
    lua_pushboolean(L, created); /* a reload's listen reuses the socket */
    return 2;
}

/* Moves the requests parsed by a detached connection into the list at
 * the top of L (as the router receives them); returns the new count. */
static int take_parsed(lua_State *L, hconn_t *c, int count)
{
    while (c->head) {
        hreq_t *r = c->head;
        c->head = r->next;
        push_request(L, r); /* [list, req] */
        lua_pushboolean(L, r->keepalive);
        lua_setfield(L, -2, "keepalive");
        lua_rawseti(L, -2, ++count);
        req_free(r);
    }
    c->tail = NULL;
    c->nqueued = 0;
    return count;
}

/* parse(bytes [, {max_header=, max_body=}]) -> requests, status|nil, upgrade
 * Runs the server's parser and limits over bytes without a socket (the
 * http fuzz target, spec/fuzz): requests as the router receives them (plus
 * keepalive), the status the server would refuse the rest with (400, 413,
 * 431) or nil, and whether a WebSocket upgrade request ended them. */
static int l_http_parse(lua_State *L)
{
    size_t n, off = 0;
    const char *p = luaL_checklstring(L, 1, &n);
    hserver_t srv = {.settings = parser_settings, .max_header = 16384, .max_body = 1048576};
    if (lua_istable(L, 2)) {
        lua_getfield(L, 2, "max_header");
        lua_getfield(L, 2, "max_body");
        srv.max_header = (size_t)luaL_optnumber(L, -2, 16384);
        srv.max_body = (size_t)luaL_optnumber(L, -1, 1048576);
        lua_pop(L, 2);
    }
    hconn_t c = {.srv = &srv}; /* detached: srv.w is NULL, nothing is sent */
    http_parser_init(&c.parser, HTTP_REQUEST);
    c.parser.data = &c;
    lua_newtable(L); /* [requests] */
    int count = 0, status = 0;
    for (;;) {
        off += http_parser_execute(&c.parser, &srv.settings, p + off, n - off);
        count = take_parsed(L, &c, count);
        enum http_errno err = HTTP_PARSER_ERRNO(&c.parser);
        if (err == HPE_PAUSED) { /* MAX_QUEUED requests at once */
            http_parser_pause(&c.parser, 0);
            if (off < n) {
                continue;
            }
        } else if (!c.upgrading && (err != HPE_OK || off < n)) {
            status = refusal(&c, err);
        }
        break;
    }
    int upgrade = c.upgrading != NULL;
    if (c.cur) {
        req_free(c.cur);
    }
    if (c.upgrading) {
        req_free(c.upgrading);
    }
    if (status) {
        lua_pushinteger(L, status);
    } else {
        lua_pushnil(L);
    }
    lua_pushboolean(L, upgrade);
    return 3;
}

/* The request behind the handle at index 1; raises once it was answered
 * and freed (a handle kept past its response). */
static hreq_t *check_req(lua_State *L)
{
    req_ud_t *ud = luaL_checkudata(L, 1, REQ_MT);
    if (ud->r == NULL) {
        luaL_error(L, "http: request already answered (a request is usable only until its "
                      "response is sent)");
    }
    return ud->r;
}

static int l_req_gc(lua_State *L)
{
    req_ud_t *ud = luaL_checkudata(L, 1, REQ_MT);
    if (ud->r) {
        ud->r->ud = NULL;
    }
    return 0;
}

/* The request behind the handle at index 1 whose streamed response may
 * still be written; raises otherwise. */
static hreq_t *check_open_stream(lua_State *L)
{
    hreq_t *r = check_req(L);
    if (r->ended) {
        luaL_error(L, "http: response already finished");
    }
    return r;
}

/* start(token, status, headers): begins a streamed (chunked) response */
static int l_http_start(lua_State *L)
{
    hreq_t *r = check_open_stream(L);
    if (r->streaming) {
        return luaL_error(L, "http: response already started");
    }
    int status = (int)luaL_checkinteger(L, 2);
    r->streaming = 1;
    write_response(r->conn, r, L, status, 3, "", 0, 1);
    lua_pushboolean(L, !r->conn->closing);
    return 1;
}

/* write(token, data) -> true | false when the client went away */
static int l_http_write(lua_State *L)
{
    hreq_t *r = check_open_stream(L);
    if (!r->streaming) {
        return luaL_error(L, "http: write before start");
    }
    size_t n;
    const char *p = luaL_checklstring(L, 2, &n);
    if (r->conn->closing) {
        lua_pushboolean(L, 0);
        return 1;
    }
    if (unsent(r->conn) >= MAX_UNSENT) {
        conn_close(r->conn); /* a client that does not read its stream */
        lua_pushboolean(L, 0);
        return 1;
    }
    if (n > 0) {
        char head[32];
        int hl = snprintf(head, sizeof(head), "%zx\r\n", n);
        buf_t b = {0};
        buf_add(&b, head, (size_t)hl);
        buf_add(&b, p, n);
        buf_add(&b, "\r\n", 2);
        conn_write(r->conn, b.p, b.len, 0);
        free(b.p);
    }
    lua_pushboolean(L, !r->conn->closing);
    return 1;
}

/* finish(token): ends a streamed response */
static int l_http_finish(lua_State *L)
{
    hreq_t *r = check_open_stream(L);
    r->ended = 1;
    if (!r->conn->closing) {
        conn_write(r->conn, "0\r\n\r\n", 5, 0);
    }
    return 0;
}

/* alive(token) -> boolean: the client is still connected */
static int l_http_alive(lua_State *L)
{
    hreq_t *r = check_req(L);
    lua_pushboolean(L, !r->conn->closing);
    return 1;
}

/* ---- registry kind "route": routes live in Lua; the kind makes reloads
 * report and diff them like every other registration. -------------------- */

static int route_start(osara_reg_entry_t *e)
{
    (void)e;
    return 0;
}

static const osara_reg_kind_t route_kind = {.name = "route", .start = route_start};

int osara_http_open(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"listen", l_http_listen}, {"start", l_http_start}, {"write", l_http_write},
        {"finish", l_http_finish}, {"alive", l_http_alive}, {"parse", l_http_parse},
        {NULL, NULL},
    };
    osara_registry_kind(&route_kind);
    parser_settings = (http_parser_settings){
        .on_message_begin = on_message_begin, .on_url = on_url,
        .on_header_field = on_header_field, .on_header_value = on_header_value,
        .on_headers_complete = on_headers_complete, .on_body = on_body,
        .on_message_complete = on_message_complete,
    };
    osara_lua_newclass(L, REQ_MT, NULL, l_req_gc, NULL);
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
