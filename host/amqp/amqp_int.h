/* amqp_int.h - what the files of host/amqp share; not an interface.
 *
 *   conn.c   the connection thread: the only caller of librabbitmq
 *   client.c the loop side: client, commands, events, consumers on lanes
 *   lua.c    the `osara.amqp_c` module and the client userdata
 *
 * Channels of a connection: 1 consumes (and acks), 2 publishes in confirm
 * mode, 3 declares (a refused declaration closes only channel 3, which is
 * reopened: consumers and pending confirms are not lost with it). */
#ifndef OSARA_AMQP_INT_H
#define OSARA_AMQP_INT_H

#include <amqp.h>
#include <lua.h>
#include <stdatomic.h>
#include <stdint.h>
#include <uv.h>

#include "core/metrics.h"
#include "core/registry.h"
#include "core/sched.h"
#include "core/worker.h"
#include "transport/transport.h"

#define AMQP_CLIENT_MT "osara.amqp.client"
#define CH_CONSUME 1
#define CH_PUBLISH 2
#define CH_DECLARE 3

typedef struct aclient_s aclient_t;

/* A consumer as the connection thread keeps it, to declare and consume
 * again after a reconnect. Owned by the thread once sent. */
typedef struct tcons_s {
    int id;                 /* consumer tag "osara-<id>" */
    char *exchange, *type, *routing_key;
    char *queue;            /* requested name; NULL: server-named, exclusive */
    char *dlq;              /* a queue declared for dead letters, or NULL */
    int durable, prefetch, retry;
    char actual[256];       /* the queue's name on this connection */
    struct tcons_s *next;
} tcons_t;

/* A publish, from the loop to the thread and back (EV_CONFIRMED). */
typedef struct apub_s {
    osara_sched_future_t f; /* first: the future's free finds it */
    aclient_t *c;
    osara_delivery_t *d;    /* the input whose handler sent it, or NULL */
    char *exchange, *routing_key;
    char *declare_type;     /* declare the exchange first (once), or NULL */
    amqp_bytes_t body;
    amqp_basic_properties_t props;
    amqp_pool_t pool;       /* headers and property strings */
    uint64_t seq;           /* its confirm number on the connection */
    int ok;
    char err[160];
    struct apub_s *next;
} apub_t;

/* A consumed message on a lane. */
typedef struct amsg_s {
    osara_delivery_t d;     /* first: the lane hands it back */
    int sub_id;
    unsigned gen;           /* the connection it came on */
    uint64_t tag;
    int redelivered;
    amqp_bytes_t body;
    amqp_pool_t pool;       /* every string and the cloned headers */
    amqp_bytes_t exchange, routing_key, queue, content_type, correlation_id, reply_to,
        message_id;
    amqp_table_t headers;
    int has_headers;
} amsg_t;

/* A consumer on the loop: the lane, and the registry entry serving it.
 * Freed when the entry let it go and its last delivery settled. */
typedef struct asub_s {
    aclient_t *c;
    int id;
    char *name;             /* "exchange/routing_key", for labels */
    char *queue;            /* its queue once the thread consumes */
    osara_lane_t lane;
    int refs;               /* the entry's + one per delivery held */
    int stopped;
    int draining;           /* shutdown "drain": cancelled, still handling */
    struct asub_s *next;
} asub_t;

typedef enum {
    CMD_CONSUME, CMD_CANCEL, CMD_ACK, CMD_NACK, CMD_PUBLISH,
} acmd_type_t;

typedef struct acmd_s {
    acmd_type_t type;
    tcons_t *cons;          /* CONSUME */
    int id;                 /* CANCEL */
    uint64_t tag;           /* ACK, NACK */
    unsigned gen;
    apub_t *pub;            /* PUBLISH */
    struct acmd_s *next;
} acmd_t;

/* What the thread keeps between connections. */
typedef struct {
    amqp_connection_state_t conn; /* NULL while disconnected */
    unsigned gen;                 /* connections made so far */
    tcons_t *cons;
    apub_t *pending, *pending_tail; /* published, not yet confirmed */
    uint64_t next_seq;
    char **declared;              /* exchanges declared on this connection */
    int ndeclared;
    struct amsg_s *reading;       /* delivered, its content still coming */
    size_t body_size;
    int have_header;
} aconn_t;

/* A client. Freed with its last reference (any thread): the shared
 * resource's, each userdata's, each consumer's, the thread's, and each
 * event posted to the loop and not yet run. */
struct aclient_s {
    osara_worker_t *w;
    char *url;                    /* as given, for logs (password hidden) */
    char *url_full;
    int prefetch;
    atomic_int closing;
    atomic_int refs;
    /* loop thread */
    asub_t *subs;
    int next_sub_id;
    /* commands for the thread */
    uv_mutex_t mu;
    acmd_t *cmds, *cmds_tail;
    int efd;                      /* eventfd: wakes the thread */
    uv_thread_t thread;
    uv_work_t join;
    aconn_t t;                    /* the thread's own */
};

typedef struct {
    aclient_t *c;                 /* NULL in `osara check` */
} aclient_ud_t;

typedef struct {
    osara_metric_t *received, *handled, *failed, *acked, *requeued, *published,
        *publish_failed, *disconnects, *reconnects;
} osara__amqp_metrics_t;

extern osara__amqp_metrics_t osara__amqp_m;

/* client.c */
void osara__amqp_metrics_init(void);
/* Parses conf {url, prefetch} and starts the connection thread; one
 * reference, the caller's. NULL with osara_err_set. */
aclient_t *osara__amqp_client_new(osara_worker_t *w, const char *url, int prefetch);
/* The shared resource's close: consumers stop, the thread closes the
 * connection and is joined in the thread pool. */
void osara__amqp_client_close(void *ptr);
void osara__amqp_client_ref(aclient_t *c);
void osara__amqp_client_unref(aclient_t *c);
/* Queues cmd for the thread (loop thread). */
void osara__amqp_command(aclient_t *c, acmd_t *cmd);
/* Sends p (publish record with its future's reference for the confirm). */
void osara__amqp_publish(aclient_t *c, apub_t *p);
apub_t *osara__amqp_pub_new(aclient_t *c);
void osara__amqp_registry_open(void);
/* The retry queue of queue q (n bytes): "<q>.retry", or for a server-named
 * "amq.gen-..." queue (a reserved prefix) "osara.retry.<q>". */
void osara__amqp_retry_name(const char *q, size_t n, char *buf, size_t size);

/* conn.c: the thread's body; events reach the loop through these: */
void osara__amqp_thread(void *arg);
void osara__amqp_on_delivery(aclient_t *c, amsg_t *m);       /* thread */
void osara__amqp_on_confirmed(aclient_t *c, apub_t *p);      /* thread */
void osara__amqp_on_consuming(aclient_t *c, int id, const char *queue); /* thread */
void osara__amqp_on_cons_failed(aclient_t *c, int id, const char *why); /* thread */
/* Frees a message (any thread). */
void osara__amqp_msg_free(amsg_t *m);
void osara__amqp_pub_free(apub_t *p);
void osara__amqp_cons_free(tcons_t *k);

#endif
