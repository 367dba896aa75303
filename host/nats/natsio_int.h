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
#include <stdatomic.h>
#include <uv.h>

#include "core/metrics.h"
#include "core/registry.h"
#include "core/sched.h"
#include "core/worker.h"
#include "transport/transport.h"

#define CLIENT_MT "osara.nats.client"
#define REQ_SLOTS 4096

typedef struct nclient_s nclient_t;
struct njs_s;

/* A core subscription. Its lifetime is counted in `refs` (under mu): one
 * for the registry entry serving it (dropped at stop or client close), one
 * for nats.c (dropped by the on-complete callback, after which nats.c
 * never calls on_msg again) and one per message posted to the loop and not
 * yet settled. The last one frees it, so neither a retiring script
 * version's handler nor a late nats.c callback touches freed memory. */
typedef struct nsub_s {
    nclient_t *client;          /* NULL once the client closed */
    natsSubscription *sub;
    char *subject, *queue;
    osara_lane_t lane;          /* unordered: max_inflight handlers at once */
    osara_inbox_t *inbox;       /* the worker's */
    uv_mutex_t mu;              /* with nats.c's delivery thread: */
    uv_cond_t room;
    int queued, queued_max;     /* posted and not yet settled; its bound */
    int blocked, released;      /* on_msg waits for room / must not wait */
    int refs;
    int stopped;                /* loop only: deliver nothing more */
    int deferred;               /* loop only: a pump waits in the inbox */
    /* A reload restarted the handler on another client: the predecessors
     * (a chain, when reloads come faster than a confirmation) stay
     * subscribed, their messages going to this handler, until this
     * subscription is confirmed; then they drain. Held until finished. */
    struct nsub_s *prev;
    int handed;                 /* this is such a predecessor */
    int completed;              /* under mu: nats.c is done with it */
    int handing;                /* holds a job on its client: its connection
                                 * closes only after the successor is
                                 * confirmed */
    int confirmed;              /* the server confirmed the interest */
    int confirming;             /* a confirmation job runs */
    struct nsub_s *next;
} nsub_t;

/* A request waiting for its reply: a future the calling coroutine waits
 * on (with the request's timeout). The client's slot for its token points
 * to it while it lives; a reply finds it there. */
typedef struct nreq_s {
    osara_sched_future_t f; /* first: the future's free finds the request */
    nclient_t *client;      /* held */
    uint64_t token;
    natsMsg *reply;
    const char *fail;       /* set instead of reply: the error to return */
} nreq_t;

/* A connection. Freed when its last reference goes (any thread): the
 * worker's shared resource, each client userdata of any script version,
 * each subscription, nats.c's connection (until the closed callback) and
 * reply inbox (until its on-complete callback), each posted event. Closing
 * (osara__nats_client_close) stops it at once; what still holds it sees
 * `closing` and fails softly ("client closed"). */
struct nclient_s {
    osara_worker_t *w;
    natsConnection *nc;
    char *url;
    pid_t server_pid;           /* the embedded server's; 0 while it restarts */
    struct nserver_watch_s *server_watch;
    char inbox[64];             /* "_INBOX.<nuid>." requests reply to inbox+token */
    natsSubscription *resp_sub;
    nreq_t *reqs[REQ_SLOTS];    /* by token % REQ_SLOTS */
    uint64_t next_token;
    nsub_t *subs;
    jsCtx *js;
    struct njs_s *jsubs;
    int streams_pending;        /* add_stream threads running */
    struct njspub_s *jspubs_waiting; /* jspublishes waiting for them */
    int jobs;                   /* thread-pool jobs using nc or js now */
    atomic_int connected;       /* the first connection was made (nats.c sets) */
    uv_timer_t *late;           /* logs while the first connection is not made */
    uint64_t late_since;        /* loop time (ms) the wait began */
    volatile int closing;
    int torn_down;              /* the teardown job was queued */
    atomic_int refs;
};

/* The client userdata (CLIENT_MT); c is NULL in `osara check`. */
typedef struct {
    nclient_t *c;
} client_ud_t;

/* Counters of every NATS client (the metrics registry is per process). */
typedef struct {
    osara_metric_t *received, *handled, *failed, *replies, *requests, *timeouts, *slow,
        *reconnects, *disconnects, *acked, *naked, *termed, *publish_failed, *js_publish_failed;
} osara__nats_metrics_t;

extern osara__nats_metrics_t osara__nats_m;

/* client.c */
void osara__nats_metrics_init(void);
/* Starts the embedded server when servers is "embedded", connects with the
 * options of the table at `conf` and subscribes the reply inbox. Returns
 * the client (one reference, the caller's) or NULL (osara_err_set). */
nclient_t *osara__nats_client_new(osara_worker_t *w, lua_State *L, int conf);
/* Stops the client (the shared resource's close) and drops its reference:
 * subscriptions stop, pending requests fail, and a thread-pool job
 * flushes and closes the connection off the loop. */
void osara__nats_client_close(void *ptr);
void osara__nats_client_ref(nclient_t *c);
/* Any thread. Frees the client when it was the last reference. */
void osara__nats_client_unref(nclient_t *c);
/* A thread-pool job will use c->nc / c->js (begin) or is done (end, loop
 * thread): the connection is closed only when none runs. */
void osara__nats_job_begin(nclient_t *c);
void osara__nats_job_end(nclient_t *c);
/* Frees obj with free_fn(obj, NULL): now, or (now = 0) from the worker's
 * inbox, for a caller that still touches obj afterwards (a lane, inside
 * settle); now as well when the inbox is closed (the loop is gone). */
void osara__nats_dispose(osara_inbox_t *inbox, osara_inbox_fn free_fn, void *obj, int now);
/* A registry entry's start: the client named by its options. Pushes the
 * options table and returns the client; NULL (nothing pushed,
 * osara_err_set) when it is closed. */
nclient_t *osara__nats_entry_client(osara_reg_entry_t *e);
/* A registry entry's adopt: moves old's impl to e and points the lane at
 * lane_offset inside it at e. Returns the impl (NULL: none). */
void *osara__nats_adopt(osara_reg_entry_t *e, osara_reg_entry_t *old, size_t lane_offset);
/* The Lua result for a call on a closed client: pushes nil, msg; 2. */
int osara__nats_push_closed(lua_State *L, const char *what);

/* server.c: the nats-server child; start sets c->url and c->server_pid
 * and watches the child: one that dies is reaped and started again (with
 * a backoff) until stop. */
int osara__nats_server_start(nclient_t *c, const char *data_dir);
void osara__nats_server_stop(nclient_t *c);

/* subs.c */
/* Pushes {subject=, raw=, reply=, headers=} for msg on T. */
void osara__nats_push_msg(lua_State *T, natsMsg *msg);
/* Stops the client's subscriptions (client close): queued messages are
 * dropped, running handlers finish, each is freed with its last reference. */
void osara__nats_subs_close(nclient_t *c);
void osara__nats_subs_open(void);

/* request.c */
natsStatus osara__nats_responses_start(nclient_t *c);
/* Sets the string fields of the table at idx as headers of m. */
natsStatus osara__nats_add_headers(lua_State *L, int idx, natsMsg *m);
/* Fails the requests still waiting ("client closed"). */
void osara__nats_requests_close(nclient_t *c);
/* Adds publish, reply and request to the method table at idx. */
void osara__nats_request_open(lua_State *L, int idx);

/* jetstream.c */
/* Client close: consumers stop delivering; their fetch threads are joined
 * in the thread pool (client jobs, so the teardown waits for them). */
void osara__nats_js_stop(nclient_t *c);
/* Adds stream and jspublish to the method table at idx. */
void osara__nats_js_open(lua_State *L, int idx);

/* The client connected (a first connection made late): subscriptions not
 * confirmed yet are confirmed again. Loop thread. */
void osara__nats_subs_connected(nclient_t *c);

/* lua.c: the client of the userdata at idx; raises in check mode. */
nclient_t *osara__nats_check_client(lua_State *L, int idx);

#endif
