/* conn.c - one WebSocket connection's plumbing, for both sides: wslay's
 * event API fed from libuv reads, what it produces written in one uv_write
 * per flush, reading paused under load, and the connection's lifetime. */
#include "ws/ws_int.h"

#include <lauxlib.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "core/mem.h"
#include "core/worker.h"

osara_metric_t *osara__ws_m_server_conns, *osara__ws_m_client_conns;
osara_metric_t *osara__ws_m_calls_ok, *osara__ws_m_calls_error;

void osara__ws_wbuf_add(osara_ws_buf_t *b, const void *p, size_t n)
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
int osara__ws_accept_token(const char *key, char out[32])
{
    char src[128];
    int n = snprintf(src, sizeof(src), "%s%s", key, OSARA_WS_GUID);
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (n <= 0 || (size_t)n >= sizeof(src) ||
        EVP_Digest(src, (size_t)n, md, &mdlen, EVP_sha1(), NULL) != 1) {
        return -1;
    }
    EVP_EncodeBlock((unsigned char *)out, md, (int)mdlen);
    return 0;
}

void osara__ws_metrics_init(void)
{
    if (osara__ws_m_server_conns == NULL) {
        osara__ws_m_server_conns = osara_metrics_gauge("osara_ws_connections", "open WebSocket connections",
                                             "side=\"server\"");
        osara__ws_m_client_conns = osara_metrics_gauge("osara_ws_connections", "open WebSocket connections",
                                             "side=\"client\"");
        osara__ws_m_calls_ok = osara_metrics_counter("osara_rpc_calls_total", "RPC calls answered",
                                           "result=\"ok\"");
        osara__ws_m_calls_error = osara_metrics_counter("osara_rpc_calls_total", "RPC calls answered",
                                              "result=\"error\"");
    }
}

/* ---- connection lifetime --------------------------------------------------- */

void osara__ws_conn_unref(osara_ws_conn_t *c)
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

void osara__ws_on_tcp_closed(uv_handle_t *h)
{
    osara__ws_conn_unref(h->data);
}

void osara__ws_detach(osara_ws_conn_t *c)
{
    if (c->ep == NULL) {
        return;
    }
    c->ep->nconns--;
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
void osara__ws_conn_close(osara_ws_conn_t *c, const char *why)
{
    if (c->closing) {
        return;
    }
    c->closing = 1;
    osara__ws_detach(c);
    if (c->open || !c->client) {
        osara_metric_gauge_add(c->client ? osara__ws_m_client_conns : osara__ws_m_server_conns, -1);
    }
    uv_close((uv_handle_t *)&c->tcp, osara__ws_on_tcp_closed);
    if (c->client && why) {
        osara__ws_client_emit(c, "close", why, strlen(why));
    }
}

/* ---- writing: wslay's output, one uv_write per flush ------------------------- */

typedef struct {
    uv_write_t req;
    osara_ws_conn_t *conn;
    size_t len;
    char *data;
} ws_write_t;

static void on_written(uv_write_t *req, int status)
{
    ws_write_t *wr = (ws_write_t *)req;
    osara_ws_conn_t *c = wr->conn;
    c->writes--;
    c->write_bytes -= wr->len;
    free(wr->data);
    free(wr);
    if (status != 0) {
        osara__ws_conn_close(c, "write failed");
    } else if (c->close_written && c->writes == 0) {
        osara__ws_conn_close(c, "closed");
    } else if (!c->closing) {
        osara__ws_flush(c); /* wslay may hold messages back while writes were pending */
        osara__ws_update_reading(c);
    }
    osara__ws_conn_unref(c);
}

/* Writes out what was produced so far (the handshake, frames). */
void osara__ws_write_out(osara_ws_conn_t *c)
{
    if (c->out.len == 0 || c->closing) {
        return;
    }
    ws_write_t *wr = osara_xcalloc(1, sizeof(*wr));
    wr->conn = c;
    wr->len = c->out.len;
    wr->data = c->out.p;
    c->out = (osara_ws_buf_t){0};
    uv_buf_t b = uv_buf_init(wr->data, (unsigned)wr->len);
    if (uv_write(&wr->req, (uv_stream_t *)&c->tcp, &b, 1, on_written) != 0) {
        free(wr->data);
        free(wr);
        osara__ws_conn_close(c, "write failed");
        return;
    }
    c->refs++;
    c->writes++;
    c->write_bytes += wr->len;
}

/* Lets wslay send what it queued (replies, pongs, close frames), then
 * closes the socket once both directions are done. */
void osara__ws_flush(osara_ws_conn_t *c)
{
    if (c->closing || c->ctx == NULL || c->feeding) {
        return;
    }
    if (wslay_event_want_write(c->ctx) && wslay_event_send(c->ctx) != 0) {
        osara__ws_conn_close(c, "send failed");
        return;
    }
    osara__ws_write_out(c);
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
            osara__ws_conn_close(c, why);
        }
    }
}

static ssize_t on_wslay_send(wslay_event_context_ptr ctx, const uint8_t *data, size_t len,
                             int flags, void *ud)
{
    (void)flags;
    osara_ws_conn_t *c = ud;
    if (c->write_bytes + c->out.len >= OSARA_WS_WRITE_HIGH_WATER) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK); /* resumed by on_written */
        return -1;
    }
    osara__ws_wbuf_add(&c->out, data, len);
    return (ssize_t)len;
}

/* ---- reading: libuv's bytes, fed to wslay ------------------------------------ */

static ssize_t on_wslay_recv(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags,
                             void *ud)
{
    (void)flags;
    osara_ws_conn_t *c = ud;
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

void osara__ws_feed(osara_ws_conn_t *c, const char *p, size_t n)
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
        osara__ws_conn_close(c, "receive failed");
        return;
    }
    osara__ws_flush(c);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b)
{
    (void)h;
    b->base = osara_xmalloc(suggested);
    b->len = suggested;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    osara_ws_conn_t *c = s->data;
    if (nread < 0) {
        free(b->base);
        osara__ws_conn_close(c, nread == UV_EOF ? "closed by the peer" : uv_strerror((int)nread));
        return;
    }
    c->last_seen = uv_now(c->tcp.loop); /* a pong, or anything: the peer is there */
    c->ping_sent = 0;
    if (c->client && !c->open) {
        osara__ws_client_handshake_read(c, b->base, (size_t)nread);
    } else {
        osara__ws_feed(c, b->base, (size_t)nread);
    }
    free(b->base);
}

/* Reads while the connection has room: a server connection stops reading
 * at max_inflight calls or when the peer does not read its replies. */
void osara__ws_update_reading(osara_ws_conn_t *c)
{
    if (c->closing) {
        return;
    }
    int want = c->write_bytes < OSARA_WS_WRITE_HIGH_WATER &&
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
int osara__ws_queue_text(osara_ws_conn_t *c, const char *p, size_t n)
{
    if (c->closing || c->ctx == NULL) {
        return -1;
    }
    struct wslay_event_msg msg = {WSLAY_TEXT_FRAME, (const uint8_t *)p, n};
    if (wslay_event_queue_msg(c->ctx, &msg) != 0) {
        return -1;
    }
    osara__ws_flush(c);
    return 0;
}

void osara__ws_queue_close(osara_ws_conn_t *c, uint16_t code, const char *reason)
{
    if (c->closing || c->ctx == NULL) {
        return;
    }
    wslay_event_queue_close(c->ctx, code, (const uint8_t *)reason, strlen(reason));
    osara__ws_flush(c);
}

osara_ws_conn_t *osara__ws_conn_new(struct osara_worker_s *w, int client)
{
    osara_ws_conn_t *c = osara_xcalloc(1, sizeof(*c));
    c->w = w;
    c->client = client;
    c->cbref = LUA_NOREF;
    c->last_seen = uv_now(&w->loop);
    uv_tcp_init(&w->loop, &c->tcp);
    c->tcp.data = c;
    c->refs = 1; /* the handle */
    return c;
}

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

static void on_wslay_msg(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg,
                         void *ud)
{
    osara_ws_conn_t *c = ud;
    if (arg->opcode == WSLAY_TEXT_FRAME || arg->opcode == WSLAY_BINARY_FRAME) {
        if (c->client) {
            osara__ws_client_emit(c, "message", (const char *)arg->msg, arg->msg_length);
        } else {
            osara__ws_server_message(c, arg->msg, arg->msg_length);
        }
    }
    (void)ctx;
}

/* Starts framing after the handshake: wslay's context, then reading. */
int osara__ws_start_framing(osara_ws_conn_t *c, size_t max_message)
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
    osara__ws_update_reading(c);
    return 0;
}
