/* nats_peer.c - NATS benchmark peers without osara, on the same nats-server.
 *
 *   nats_peer pub URL N          publish N ~100-byte JSON orders to bench.nats
 *   nats_peer c_lua URL N LUA    subscribe to bench.nats; call the Lua handler
 *                                (lua_pcall, no osara) per message
 *   nats_peer raw URL N          the same in C: decode each with cJSON, count
 *   nats_peer respond URL        answer requests on bench.req with their bytes
 *   nats_peer req_seq URL N      N requests to bench.req, one at a time
 *   nats_peer req_64 URL N       N requests to bench.req, 64 in flight
 *
 * Subscribers print "ready" once the server has their subscription, then
 * "rate=<msgs/s> n=<N> secs=<elapsed>" measured from the first message to
 * the N-th. Every connection uses natsOptions_SetSendAsap (nats.c's fastest
 * setting for round trips, PERF-LIMITS.md) and unlimited pending limits, so
 * nothing is dropped while a slower subscriber catches up. */
#include <cjson/cJSON.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <nats/nats.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SUBJECT "bench.nats"
#define REQ_SUBJECT "bench.req"
#define IN_FLIGHT 64

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void check(natsStatus s, const char *what)
{
    if (s != NATS_OK) {
        fprintf(stderr, "nats_peer: %s: %s\n", what, natsStatus_GetText(s));
        exit(1);
    }
}

static natsConnection *connect_to(const char *url)
{
    natsOptions *opts;
    natsConnection *nc;
    check(natsOptions_Create(&opts), "options");
    check(natsOptions_SetURL(opts, url), "url");
    check(natsOptions_SetSendAsap(opts, true), "send asap");
    check(natsConnection_Connect(&nc, opts), "connect");
    natsOptions_Destroy(opts);
    return nc;
}

static int order(char *buf, size_t cap, long i)
{
    return snprintf(buf, cap, "{\"id\":%ld,\"user\":\"user-%04ld\",\"amount\":%ld,\"note\":\"benchmark order payload\"}",
                    i, i % 1000, i % 997);
}

static void report(long n, double t0)
{
    double secs = now() - t0;
    printf("rate=%.0f n=%ld secs=%.3f\n", (double)n / secs, n, secs);
}

static int pub(const char *url, long n)
{
    natsConnection *nc = connect_to(url);
    char buf[160];
    for (long i = 1; i <= n; i++) {
        check(natsConnection_Publish(nc, SUBJECT, buf, order(buf, sizeof(buf), i)), "publish");
    }
    check(natsConnection_FlushTimeout(nc, 60000), "flush");
    natsConnection_Destroy(nc);
    printf("published n=%ld\n", n);
    return 0;
}

/* Synchronous subscription on this thread: no hand-off, the fastest a
 * single-threaded consumer of nats.c can be. */
static int consume(const char *url, long n, const char *script)
{
    lua_State *L = NULL;
    if (script) {
        L = luaL_newstate();
        luaL_openlibs(L);
        if (luaL_dofile(L, script) != 0) {
            fprintf(stderr, "nats_peer: %s\n", lua_tostring(L, -1));
            return 1;
        }
        lua_setglobal(L, "handler");
    }
    natsConnection *nc = connect_to(url);
    natsSubscription *sub;
    check(natsConnection_SubscribeSync(&sub, nc, SUBJECT), "subscribe");
    check(natsSubscription_SetPendingLimits(sub, -1, -1), "pending limits");
    check(natsConnection_Flush(nc), "flush");
    printf("ready\n");
    fflush(stdout);
    double t0 = 0;
    for (long got = 0; got < n; got++) {
        natsMsg *m;
        check(natsSubscription_NextMsg(&m, sub, 60000), "next message");
        if (got == 0) {
            t0 = now();
        }
        if (L) {
            lua_getglobal(L, "handler");
            lua_pushlstring(L, natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m));
            if (lua_pcall(L, 1, 0, 0) != 0) {
                fprintf(stderr, "nats_peer: handler: %s\n", lua_tostring(L, -1));
                return 1;
            }
        } else {
            cJSON *v = cJSON_ParseWithLength(natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m));
            if (v == NULL) {
                fprintf(stderr, "nats_peer: bad JSON\n");
                return 1;
            }
            cJSON_Delete(v);
        }
        natsMsg_Destroy(m);
    }
    report(n, t0);
    natsSubscription_Destroy(sub);
    natsConnection_Destroy(nc);
    if (L) {
        lua_close(L);
    }
    return 0;
}

static volatile sig_atomic_t stopping;

static void on_term(int sig)
{
    (void)sig;
    stopping = 1;
}

static void on_request(natsConnection *nc, natsSubscription *sub, natsMsg *m, void *closure)
{
    (void)sub;
    (void)closure;
    natsConnection_Publish(nc, natsMsg_GetReply(m), natsMsg_GetData(m), natsMsg_GetDataLength(m));
    natsMsg_Destroy(m);
}

static int respond(const char *url)
{
    signal(SIGTERM, on_term);
    natsConnection *nc = connect_to(url);
    natsSubscription *sub;
    check(natsConnection_Subscribe(&sub, nc, REQ_SUBJECT, on_request, NULL), "subscribe");
    check(natsSubscription_SetPendingLimits(sub, -1, -1), "pending limits");
    check(natsConnection_Flush(nc), "flush");
    printf("ready\n");
    fflush(stdout);
    while (!stopping) {
        nats_Sleep(50);
    }
    natsSubscription_Destroy(sub);
    natsConnection_Destroy(nc);
    return 0;
}

static int request_seq(const char *url, long n)
{
    natsConnection *nc = connect_to(url);
    char buf[160];
    double t0 = now();
    for (long i = 1; i <= n; i++) {
        natsMsg *reply;
        check(natsConnection_Request(&reply, nc, REQ_SUBJECT, buf, order(buf, sizeof(buf), i), 5000), "request");
        natsMsg_Destroy(reply);
    }
    report(n, t0);
    natsConnection_Destroy(nc);
    return 0;
}

/* 64 in flight: publish with a reply inbox, send the next on each reply. */
typedef struct {
    natsConnection *nc;
    char inbox[64];
    long n, sent, got;
    pthread_mutex_t mu;
    pthread_cond_t done;
} window_t;

static void send_next(window_t *w)
{
    char buf[160];
    w->sent++;
    natsConnection_PublishRequest(w->nc, REQ_SUBJECT, w->inbox, buf, order(buf, sizeof(buf), w->sent));
}

static void on_reply(natsConnection *nc, natsSubscription *sub, natsMsg *m, void *closure)
{
    (void)nc;
    (void)sub;
    window_t *w = closure;
    natsMsg_Destroy(m);
    pthread_mutex_lock(&w->mu);
    w->got++;
    if (w->sent < w->n) {
        send_next(w);
    }
    if (w->got == w->n) {
        pthread_cond_signal(&w->done);
    }
    pthread_mutex_unlock(&w->mu);
}

static int request_window(const char *url, long n)
{
    window_t w = {.n = n};
    w.nc = connect_to(url);
    natsInbox *inbox;
    check(natsInbox_Create(&inbox), "inbox");
    snprintf(w.inbox, sizeof(w.inbox), "%s", (const char *)inbox);
    natsInbox_Destroy(inbox);
    pthread_mutex_init(&w.mu, NULL);
    pthread_cond_init(&w.done, NULL);
    natsSubscription *sub;
    check(natsConnection_Subscribe(&sub, w.nc, w.inbox, on_reply, &w), "subscribe");
    check(natsSubscription_SetPendingLimits(sub, -1, -1), "pending limits");
    check(natsConnection_Flush(w.nc), "flush");
    double t0 = now();
    pthread_mutex_lock(&w.mu);
    for (int i = 0; i < IN_FLIGHT && w.sent < n; i++) {
        send_next(&w); /* on_reply waits for the lock, then keeps 64 in flight */
    }
    while (w.got < n) {
        struct timespec deadline;
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_sec += 60;
        if (pthread_cond_timedwait(&w.done, &w.mu, &deadline) != 0) {
            fprintf(stderr, "nats_peer: timed out with %ld of %ld replies\n", w.got, n);
            return 1;
        }
    }
    pthread_mutex_unlock(&w.mu);
    report(n, t0);
    natsSubscription_Destroy(sub);
    natsConnection_Destroy(w.nc);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: nats_peer pub|c_lua|raw|respond|req_seq|req_64 URL [N] [LUA]\n");
        return 2;
    }
    const char *mode = argv[1], *url = argv[2];
    long n = argc > 3 ? atol(argv[3]) : 0;
    int rc;
    if (strcmp(mode, "pub") == 0) {
        rc = pub(url, n);
    } else if (strcmp(mode, "c_lua") == 0 && argc > 4) {
        rc = consume(url, n, argv[4]);
    } else if (strcmp(mode, "raw") == 0) {
        rc = consume(url, n, NULL);
    } else if (strcmp(mode, "respond") == 0) {
        rc = respond(url);
    } else if (strcmp(mode, "req_seq") == 0) {
        rc = request_seq(url, n);
    } else if (strcmp(mode, "req_64") == 0) {
        rc = request_window(url, n);
    } else {
        fprintf(stderr, "nats_peer: unknown mode %s\n", mode);
        return 2;
    }
    nats_Close();
    return rc;
}
