/* ws_int.h - what the files of host/ws share; not an interface for other
 * areas (that is ws.h).
 *
 * conn.c: one connection's plumbing for both sides (wslay fed from libuv,
 * flushes, lifetime); server.c: endpoints and accepted connections;
 * client.c: connections opened from Lua; ws.c: the Lua module. */
#ifndef OSARA_WS_INT_H
#define OSARA_WS_INT_H

#include <lua.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>
#include <wslay/wslay.h>

#include "core/lvm.h"
#include "core/metrics.h"

#define OSARA_WS_CONN_MT "osara.ws_conn"
#define OSARA_WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#define OSARA_WS_MAX_HANDSHAKE 8192          /* bytes of a server's 101 response */
#define OSARA_WS_WRITE_HIGH_WATER (4u << 20) /* pending write bytes that pause reading */

struct osara_worker_s;
typedef struct osara_ws_endpoint_s osara_ws_endpoint_t;
typedef struct osara_ws_conn_s osara_ws_conn_t;

typedef struct {
    char *p;
    size_t len, cap;
} osara_ws_buf_t;

/* A path served on the HTTP server, a worker shared resource. */
struct osara_ws_endpoint_s {
    struct osara_worker_s *w;
    char path[256];
    size_t max_message;
    int max_inflight;
    int max_conns, nconns;
    uint64_t ping_ms;          /* idle time before a ping; 0: never */
    uv_timer_t ping_timer;     /* sweeps the connections every ping_ms */
    osara_ws_conn_t *conns;
    osara_ws_endpoint_t *next;
};

/* One WebSocket connection, server or client side. It lives while anything
 * refers to it (refs): its TCP handle until closed, each call in flight,
 * each write in flight, a pending resolve or connect, the client's Lua
 * handle. */
struct osara_ws_conn_s {
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
    osara_ws_buf_t out;  /* bytes wslay produced, written in one uv_write */
    /* server */
    osara_ws_endpoint_t *ep;
    int inflight, max_inflight;
    uint64_t last_seen;  /* loop time of the last bytes read (or ping sent) */
    int ping_sent;       /* nothing read since: the next idle sweep closes */
    osara_ws_conn_t *prev, *next;
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
    osara_ws_buf_t hs;   /* the server's handshake response so far */
    size_t max_message;
};

extern osara_metric_t *osara__ws_m_server_conns, *osara__ws_m_client_conns;
extern osara_metric_t *osara__ws_m_calls_ok, *osara__ws_m_calls_error;
void osara__ws_metrics_init(void);

/* ---- conn.c ---- */
void osara__ws_wbuf_add(osara_ws_buf_t *b, const void *p, size_t n);
/* base64(SHA-1(key + GUID)) into out (29 bytes with the NUL); 0 or -1. */
int osara__ws_accept_token(const char *key, char out[32]);
/* A connection with its TCP handle initialised (not yet connected), one
 * reference (the handle's). */
osara_ws_conn_t *osara__ws_conn_new(struct osara_worker_s *w, int client);
void osara__ws_conn_unref(osara_ws_conn_t *c);
/* uv_close callback of the connection's handle: drops its reference. */
void osara__ws_on_tcp_closed(uv_handle_t *h);
/* Closes the socket now; a client reports "close" with why (NULL: none). */
void osara__ws_conn_close(osara_ws_conn_t *c, const char *why);
/* Leaves its endpoint's list (closing, or the endpoint closes). */
void osara__ws_detach(osara_ws_conn_t *c);
/* Starts framing after the handshake: wslay's context, then reading. */
int osara__ws_start_framing(osara_ws_conn_t *c, size_t max_message);
/* Feeds n bytes read from the peer to wslay, then flushes. */
void osara__ws_feed(osara_ws_conn_t *c, const char *p, size_t n);
/* Lets wslay send what it queued (replies, pings, close frames), then
 * closes the socket once both directions are done. */
void osara__ws_flush(osara_ws_conn_t *c);
/* Writes what c->out holds (the handshake, frames) in one uv_write. */
void osara__ws_write_out(osara_ws_conn_t *c);
/* Reads while the connection has room (calls in flight, pending writes). */
void osara__ws_update_reading(osara_ws_conn_t *c);
/* Queues a text message and sends it (after the current read, if any). */
int osara__ws_queue_text(osara_ws_conn_t *c, const char *p, size_t n);
void osara__ws_queue_close(osara_ws_conn_t *c, uint16_t code, const char *reason);

/* ---- server.c ---- */
/* A text message from a client: dispatched to the serving VM. */
void osara__ws_server_message(osara_ws_conn_t *c, const uint8_t *msg, size_t n);
int osara__ws_l_serve(lua_State *L);

/* ---- client.c ---- */
/* Reports an event to the client's Lua function. */
void osara__ws_client_emit(osara_ws_conn_t *c, const char *kind, const char *data, size_t n);
/* Bytes read before the handshake completed. */
void osara__ws_client_handshake_read(osara_ws_conn_t *c, const char *p, size_t n);
int osara__ws_l_connect(lua_State *L);
/* Registers the connection handle's metatable (send, close, alive). */
void osara__ws_client_metatable(lua_State *L);

#endif
