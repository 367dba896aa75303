/* kafka_int.h - what the files of host/kafka share (librdkafka's
 * rdkafka_int.h). Not an interface: kafka.h is the folder's.
 *
 *   client.c     configuration, create, close; librdkafka callbacks
 *   consume.c    partitions (ordered lanes), backpressure, offsets
 *   produce.c    outputs, delivery reports, receipts
 *   rebalance.c  subscriptions, handlers, assignments and revokes
 *   lua.c        the Lua binding `osara.kafka_c` and the registry kind
 *   broker.c     `osara broker`, the standalone mock cluster
 *   member.c     a group member's trace in the data folder (restarts)
 *
 * Everything runs on the worker's loop thread; librdkafka's threads reach
 * it only through the queues' wake-up fds (rd_kafka_queue_io_event_enable)
 * and the callbacks served by rd_kafka_poll / consume on the loop. */
#ifndef OSARA_KAFKA_INT_H
#define OSARA_KAFKA_INT_H

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "core/mem.h"
#include "core/metrics.h"
#include "core/registry.h"
#include "core/sched.h"
#include "core/worker.h"
#include "transport/transport.h"


typedef struct kclient_s kclient_t;
typedef struct khandler_s khandler_t;
typedef struct kpart_s kpart_t;

/* One consumed message in flight: a delivery on its partition's lane. */
typedef struct kinput_s {
    osara_delivery_t d;       /* d.in: offset tracking; d.in.owner == this */
    rd_kafka_message_t *rkm;  /* held until settled (a retry needs it) */
    kpart_t *part;
    struct kinput_s *next_free;
} kinput_t;

/* A partition: an ordered lane (one handler at a time, in offset order). */
struct kpart_s {
    kclient_t *client;
    char *topic;
    int32_t partition;
    osara_lane_t lane;
    osara_offsets_t track;
    int paused;                    /* paused in librdkafka (any reason) */
    int revoking;                  /* revoke pending: finishing what is in flight */
    int retired;                   /* let go: stores nothing more; a later
                                    * assignment gets a fresh kpart */
    int retrying;                  /* inputs being handled again after failing */
    int deferred;                  /* its lane continues on the next turn */
    uv_timer_t *retry_timer;       /* backoff before the next attempt */
    osara_metric_t *m_lag;
    kpart_t *next;                 /* hash bucket, or the retired list */
};

struct khandler_s {
    kclient_t *client;
    osara_reg_entry_t *entry;      /* current entry: vm + fnref */
    char *topic;                   /* name, or regex when it starts with ^ */
    regex_t re;
    int is_regex;
    khandler_t *next;
};

/* One produced message waiting for its delivery report. Its future holds
 * a reference for the report and one for the receipt, if any. */
typedef struct kout_s {
    osara_sched_future_t f;        /* first: the future's free finds the kout */
    kclient_t *c;
    osara_delivery_t *d;           /* input it was sent for, or NULL */
    rd_kafka_resp_err_t err;
    struct kout_s *next_free;
} kout_t;

/* What produce sends; hdrs pass to librdkafka (destroyed on failure). */
typedef struct {
    const char *topic;
    const char *payload, *key;
    size_t len, klen;
    int32_t partition;
    rd_kafka_headers_t *hdrs;
} kafka_msg_t;

struct kclient_s {
    osara_worker_t *w;
    char *key;
    char **conf;                   /* name, value pairs for the consumer */
    int nconf;
    char *group;
    char *bootstrap;
    int embedded;
    int partitions;                /* for topics created in the mock */
    int max_per_partition, max_inflight;
    int revoke_timeout_ms;
    rd_kafka_topic_partition_list_t *revoking;
    double revoke_started;
    uv_timer_t *revoke_timer;
    int inflight;
    rd_kafka_t *producer, *consumer;
    rd_kafka_mock_cluster_t *mock;
    rd_kafka_queue_t *cq, *pq;
    int cfd, pfd;
    uv_poll_t *cpoll, *ppoll;
    rd_kafka_event_t *dr_event;    /* delivery reports being served */
    struct kroom_wait_s *room_waiters; /* coroutines waiting for room in
                                        * the producer's queue */
    khandler_t *handlers;
    int subscription_dirty;
    uv_timer_t *resub_timer;
    kpart_t **buckets;             /* live partitions by (topic, partition) */
    int nbuckets, nparts;
    kpart_t *retired;              /* let go, freed once nothing is held */
    kout_t *free_outs;
    kinput_t *free_inputs;         /* recycled: no allocation per message */
    int closing;
    int jobs;                      /* pool work using the handles */
    int close_queued;
    uv_timer_t *handover;          /* closing: to the pool on the next turn */
    uv_timer_t *pump_timer;        /* pumps deferred partitions next turn */
    int inputs_freed;              /* closing: delivery reports find no input */
    unsigned assign_gen;           /* the newest embedded assignment */
    char *cluster_id;              /* the cluster's identity once known: a
                                    * fresh one per embedded cluster */
    int cluster_job;               /* fetching it on the pool */
    rd_kafka_resp_err_t last_error;
    /* Readiness (/readyz): brokers seen up in the last statistics, every
     * broker reported down since, the consumer's assignment received. */
    int brokers_up, stats_seen, all_down, assigned;
    char last_error_text[200];
    char *member_file;             /* this consumer's trace (member.c) */
};


extern struct osara__kafka_metrics_s {
    osara_metric_t *consumed, *handled, *failed, *produced, *delivery_errors, *paused, *stuck;
} osara__kafka_metrics;

/* A group consumer started: logs once why the group waits if an earlier
 * run's member did not leave (killed), then leaves a trace of this one. */
void osara__kafka_member_join(kclient_t *c);

/* The consumer closed (it left the group): removes its trace. */
void osara__kafka_member_left(kclient_t *c);

/* Registers the metrics (once per process). */
void osara__kafka_metrics_init(void);

/* Every live partition of c; p may be retired or freed in the body. */
#define OSARA_KAFKA_FOR_EACH_PART(c, p)                                       \
    for (int b_ = 0; b_ < (c)->nbuckets; b_++)                    \
        for (kpart_t *p = (c)->buckets[b_], *n_ = p ? p->next : NULL; p; \
             p = n_, n_ = p ? p->next : NULL)

/* ---- client.c ---- */

/* Starts c's producer (and the embedded mock cluster); -1 with errstr. */
int osara__kafka_start_producer(kclient_t *c, char *errstr, size_t cap);
/* Starts c's consumer; 0 or negative with osara_err_set. */
int osara__kafka_start_consumer(kclient_t *c);
/* Closes and frees c (the worker's shared-resource close). */
void osara__kafka_client_close(void *ptr);
/* Creates a topic in the embedded cluster (nothing on a real one) and
 * fetches its metadata for the producer in the background. */
void osara__kafka_ensure_topic(kclient_t *c, const char *topic);
/* Runs work(req) on libuv's pool (req->data is the caller's); after(req)
 * runs on the loop and must call job_done. The client waits for its jobs
 * before it closes. */
void osara__kafka_job_queue(kclient_t *c, uv_work_t *req, uv_work_cb work,
                            uv_after_work_cb after);
void osara__kafka_job_done(kclient_t *c);
/* The identity of c's cluster (rd_kafka_clusterid; a fresh random one for
 * the embedded cluster, whose logs start empty at every start), or NULL
 * while not yet known: then it is fetched on the pool, without blocking
 * the loop, and a later call has it. */
const char *osara__kafka_cluster_id(kclient_t *c);
/* librdkafka's log callback: errors at ERROR, the rest at DEBUG. */
void osara__kafka_on_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf);
/* Sets / resets a queue's wake-up eventfd: set wakes the loop for that
 * queue on its next turn (librdkafka sets it when the queue turns
 * non-empty, and only then). */
void osara__kafka_wakeup_set(int fd);
void osara__kafka_wakeup_clear(int fd);
/* uv_close callback freeing a malloc'ed handle. */
void osara__kafka_handle_free(uv_handle_t *h);

/* ---- consume.c ---- */

/* The live partition (topic, partition), or NULL. */
kpart_t *osara__kafka_find_part(kclient_t *c, const char *topic, int32_t partition);
/* The handler whose topic (name or ^regex) matches, or NULL. */
khandler_t *osara__kafka_handler_for(kclient_t *c, const char *topic);
/* Every live partition's lane calls the handler that now matches. */
void osara__kafka_refresh_entries(kclient_t *c);
/* Pauses or resumes p in librdkafka (idempotent). */
void osara__kafka_set_paused(kpart_t *p, int pause);
/* Stores p's committable position once it moved. */
void osara__kafka_store_offsets(kpart_t *p);
/* Lets go of p (revoked); freed by sweep_retired when nothing is held. */
void osara__kafka_retire_part(kclient_t *c, kpart_t *p);
void osara__kafka_sweep_retired(kclient_t *c);
/* Frees every partition, live and retired, and the inputs they track. */
void osara__kafka_free_parts(kclient_t *c);
/* Logs a consumer error once per change of error. */
void osara__kafka_log_error(kclient_t *c, rd_kafka_resp_err_t err, const char *what);

/* librdkafka's statistics (JSON) of the producer: counts the brokers that
 * are up, for readiness; a broker back up ends an all-brokers-down spell. */
void osara__kafka_on_stats(kclient_t *c, const char *json);
/* The consumer queue's wake-up: drains it in batches. */
void osara__kafka_on_consumer_ready(uv_poll_t *h, int status, int events);

/* ---- produce.c ---- */

/* Enqueues m for d's input (or none): the output, holding the delivery
 * report's reference of its future, or NULL with *err. An error other than
 * a full queue (RD_KAFKA_RESP_ERR__QUEUE_FULL: the caller may wait for
 * room) fails d, as a failed delivery would. */
kout_t *osara__kafka_produce(kclient_t *c, const kafka_msg_t *m, osara_delivery_t *d,
                             rd_kafka_resp_err_t *err);
/* Parks the coroutine running on L until delivery reports free room in
 * c's producer queue; it resumes with true, or false when c closes. Use as
 * `return osara__kafka_wait_room(L, c)`; raises outside a coroutine. */
int osara__kafka_wait_room(lua_State *L, kclient_t *c);
/* Resumes every coroutine waiting for room with `room` (0: c closes). */
void osara__kafka_wake_room_waiters(kclient_t *c, int room);
/* librdkafka's delivery report callback (served on the loop). */
void osara__kafka_on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *rkm, void *opaque);
/* The producer queue's wake-up: serves delivery reports. */
void osara__kafka_on_producer_ready(uv_poll_t *h, int status, int events);

/* ---- rebalance.c ---- */

/* librdkafka's rebalance callback (group mode). */
void osara__kafka_on_rebalance(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                               rd_kafka_topic_partition_list_t *parts, void *opaque);
/* Lets go of the partitions being revoked now. */
void osara__kafka_finish_revoke(kclient_t *c);
/* A handler for topic (a name or a ^regex) of entry e: e->impl; 0 or
 * OSARA_EINVAL with osara_err_set. Remove frees it. Both resubscribe on
 * the next turn. */
int osara__kafka_handler_add(kclient_t *c, osara_reg_entry_t *e, const char *topic);
void osara__kafka_handler_remove(khandler_t *h);
/* Subscribes (or assigns) again on the next loop turn. */
void osara__kafka_subscription_dirty(kclient_t *c);

#endif
