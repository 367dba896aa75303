/* natsio_int.h - what the files of host/nats share; not an interface.
 *
 *   client.c     connection, options, reconnect events, close
 *   server.c     the embedded nats-server child process
 *   subs.c       core subscriptions and their delivery (registry kind "nats")
 *   request.c    publish, reply, request (one wildcard inbox per client)
 *   jetstream.c  streams, durable pull consumers, publish with ack
 *   lua.c        the `osara.natsio_c` module and the client userdata
 *
 * Everything runs on the worker's loop thread unless a comment says a
 * nats.c thread calls it. */
#ifndef OSARA_NATSIO_INT_H
#define OSARA_NATSIO_INT_H

#include <lua.h>
#include <nats/nats.h>
#include <sys/types.h>
#include <uv.h>

#include "core/metrics.h"
#include "core/registry.h"
#include "core/sched.h"
#include "core/worker.h"

#define CLIENT_MT "osara.nats.client"
#define REQ_SLOTS 4096

typedef struct nclient_s nclient_t;
struct njs_s;

typedef struct nsub_s {
    nclient_t *client;
    osara_reg_entry_t *entry;
    natsSubscription *sub;
    char *subject, *queue;
    int max_inflight, inflight;
    natsMsg **waiting;          /* over the bound: FIFO ring */
    int wcap, whead, wcount;
    int dead;
    /* Backpressure into nats.c: its delivery thread waits while `queued`
     * (posted to the loop, not yet handled) is at queued_max, so messages
     * pile up in nats.c's pending list, whose limits report a slow
     * consumer instead of growing without bound. */
    uv_mutex_t mu;
    uv_cond_t room;
    int queued, queued_max, blocked, released;
    char label[192];            /* "nats handler <subject> (<where>)" */
    osara_reg_entry_t *label_entry;
    struct nsub_s *next;
} nsub_t;

typedef struct {
    uint64_t token;
    osara_co_t *co;
    unsigned seq;
    uv_timer_t *timer;
    nclient_t *client;
} nreq_t;

struct nclient_s {
    osara_worker_t *w;
    natsConnection *nc;
    char *url;
    pid_t server_pid;
    char inbox[64];             /* "_INBOX.<nuid>." requests reply to inbox+token */
    natsSubscription *resp_sub;
    nreq_t reqs[REQ_SLOTS];
    uint64_t next_token;
    nsub_t *subs;
    jsCtx *js;
    struct njs_s *jsubs;
    volatile int closing;
    struct nclient_s *next_closed;
};

/* The client userdata (CLIENT_MT); c is NULL in `osara check`. */
typedef struct {
    nclient_t *c;
} client_ud_t;

/* Counters of every NATS client (the metrics registry is per process). */
typedef struct {
    osara_metric_t *received, *handled, *failed, *replies, *requests, *timeouts, *slow,
        *reconnects, *disconnects, *acked, *naked, *termed;
} osara__nats_metrics_t;

extern osara__nats_metrics_t osara__nats_m;

/* client.c */
void osara__nats_metrics_init(void);
/* Starts the embedded server when servers is "embedded", connects with the
 * options of the table at `conf` and subscribes the reply inbox. Returns
 * the client or NULL (osara_err_set). */
nclient_t *osara__nats_client_new(osara_worker_t *w, lua_State *L, int conf);
/* Closes and frees what the client holds (the shared resource's close). */
void osara__nats_client_close(void *ptr);

/* server.c: the nats-server child; start sets c->url and c->server_pid. */
int osara__nats_server_start(nclient_t *c, const char *data_dir);
void osara__nats_server_stop(nclient_t *c);

/* subs.c */
/* Pushes {subject=, raw=, reply=, headers=} for msg on T. */
void osara__nats_push_msg(lua_State *T, natsMsg *msg);
/* Lets nats.c threads blocked on a full subscription go (client close). */
void osara__nats_subs_release(nclient_t *c);
/* Destroys the client's subscriptions and the messages they hold. */
void osara__nats_subs_free(nclient_t *c);
void osara__nats_subs_open(void);

/* request.c */
natsStatus osara__nats_responses_start(nclient_t *c);
void osara__nats_requests_free(nclient_t *c);
/* Adds publish, reply and request to the method table at idx. */
void osara__nats_request_open(lua_State *L, int idx);

/* jetstream.c */
void osara__nats_js_stop_threads(nclient_t *c);
void osara__nats_js_free(nclient_t *c);
/* Adds stream and jspublish to the method table at idx. */
void osara__nats_js_open(lua_State *L, int idx);

/* lua.c: the client of the userdata at idx; raises in check mode. */
nclient_t *osara__nats_check_client(lua_State *L, int idx);

#endif
