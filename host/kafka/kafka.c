#include "kafka/kafka.h"

#include <errno.h>
#include <lauxlib.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include <regex.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include <uv.h>

#include "core/err.h"
#include "core/log.h"
#include "core/lvm.h"
#include "core/metrics.h"
#include "transport/transport.h"
#include "core/registry.h"
#include "core/sched.h"
#include "core/worker.h"

/* The core's OOM policy (core/mem.h) replaces these once it is on main. */
static void *oom(void *p)
{
    if (p == NULL) {
        fprintf(stderr, "osara: out of memory\n");
        abort();
    }
    return p;
}
#define osara_xmalloc(n) oom(malloc(n))
#define osara_xcalloc(n, s) oom(calloc((n), (s)))
#define osara_xrealloc(p, n) oom(realloc((p), (n)))
#define osara_xstrdup(s) ((char *)oom(strdup(s)))

#define CLIENT_MT "osara.kafka.client"
#define RECEIPT_MT "osara.kafka.receipt"
#define BATCH 512

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

/* One produced message waiting for its delivery report. */
typedef struct kout_s {
    osara_delivery_t *d;           /* input it was sent for, or NULL */
    int refs;                      /* DR pending + receipt userdata */
    int done;
    rd_kafka_resp_err_t err;
    osara_co_t *waiter;
    unsigned waiter_seq;
    struct kout_s *next_free;
} kout_t;

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
    khandler_t *handlers;
    int subscription_dirty;
    uv_timer_t *resub_timer;
    kpart_t **buckets;             /* live partitions by (topic, partition) */
    int nbuckets, nparts;
    kpart_t *retired;              /* let go, freed once nothing is held */
    kout_t *free_outs;
    kinput_t *free_inputs;         /* recycled: no allocation per message */
    int closing;
    rd_kafka_resp_err_t last_error;
};

static osara_metric_t *m_consumed, *m_handled, *m_failed, *m_produced,
    *m_delivery_errors, *m_paused, *m_stuck;

static void metrics_init(void)
{
    if (m_consumed) {
        return;
    }
    m_consumed = osara_metrics_counter("osara_kafka_consumed_total", "messages consumed", NULL);
    m_handled = osara_metrics_counter("osara_kafka_handled_total", "handler calls finished", NULL);
    m_failed = osara_metrics_counter("osara_kafka_failed_total", "handler calls that raised or were cancelled", NULL);
    m_produced = osara_metrics_counter("osara_kafka_produced_total", "messages produced", NULL);
    m_delivery_errors = osara_metrics_counter("osara_kafka_delivery_errors_total", "produced messages that failed", NULL);
    m_paused = osara_metrics_gauge("osara_kafka_paused_partitions", "partitions paused by backpressure", NULL);
    m_stuck = osara_metrics_gauge("osara_kafka_stuck_partitions",
                                  "partitions waiting for a failed or cancelled input to be handled again", NULL);
}

/* ---- partitions --------------------------------------------------------- */

static unsigned part_hash(const char *topic, int32_t partition)
{
    unsigned h = 2166136261u; /* FNV-1a */
    for (const char *s = topic; *s; s++) {
        h = (h ^ (unsigned char)*s) * 16777619u;
    }
    return (h ^ (unsigned)partition) * 16777619u;
}

static kpart_t **part_slot(kclient_t *c, const char *topic, int32_t partition)
{
    kpart_t **slot = &c->buckets[part_hash(topic, partition) & (unsigned)(c->nbuckets - 1)];
    while (*slot && ((*slot)->partition != partition || strcmp((*slot)->topic, topic) != 0)) {
        slot = &(*slot)->next;
    }
    return slot;
}

/* The live (not retired) partition, or NULL. */
static kpart_t *find_part(kclient_t *c, const char *topic, int32_t partition)
{
    return c->nbuckets ? *part_slot(c, topic, partition) : NULL;
}

#define FOR_EACH_PART(c, p)                                       \
    for (int b_ = 0; b_ < (c)->nbuckets; b_++)                    \
        for (kpart_t *p = (c)->buckets[b_], *n_ = p ? p->next : NULL; p; \
             p = n_, n_ = p ? p->next : NULL)

static void grow_buckets(kclient_t *c)
{
    int n = c->nbuckets ? c->nbuckets * 2 : 16;
    kpart_t **old = c->buckets;
    int nold = c->nbuckets;
    c->buckets = osara_xcalloc((size_t)n, sizeof(*c->buckets));
    c->nbuckets = n;
    for (int i = 0; i < nold; i++) {
        for (kpart_t *p = old[i], *next; p; p = next) {
            next = p->next;
            p->next = NULL;
            *part_slot(c, p->topic, p->partition) = p;
        }
    }
    free(old);
}

static khandler_t *handler_for(kclient_t *c, const char *topic)
{
    for (khandler_t *h = c->handlers; h; h = h->next) {
        if (h->is_regex ? regexec(&h->re, topic, 0, NULL, 0) == 0
                        : strcmp(h->topic, topic) == 0) {
            return h;
        }
    }
    return NULL;
}

static void lane_entry_refresh(kpart_t *p)
{
    khandler_t *h = handler_for(p->client, p->topic);
    osara_lane_set_entry(&p->lane, h ? h->entry : NULL);
}

/* After a handler started, moved to a new VM or stopped: every live
 * partition's lane calls the handler that now matches its topic. */
static void refresh_entries(kclient_t *c)
{
    FOR_EACH_PART (c, p) {
        lane_entry_refresh(p);
    }
}

static const osara_transport_t kafka_transport;

static kpart_t *get_part(kclient_t *c, rd_kafka_message_t *rkm)
{
    const char *topic = rd_kafka_topic_name(rkm->rkt);
    kpart_t *p = find_part(c, topic, rkm->partition);
    if (p) {
        return p;
    }
    if (c->nparts >= c->nbuckets) {
        grow_buckets(c);
    }
    p = osara_xcalloc(1, sizeof(*p));
    p->client = c;
    p->topic = osara_xstrdup(topic);
    p->partition = rkm->partition;
    p->track.committable = -1;
    osara_lane_init(&p->lane, &kafka_transport, p, p->topic, 1, 1, c->max_per_partition);
    char labels[512];
    snprintf(labels, sizeof(labels), "topic=\"%s\",partition=\"%d\"", topic, (int)rkm->partition);
    p->m_lag = osara_metrics_gauge("osara_kafka_consumer_lag", "high watermark minus the next offset to handle", labels);
    *part_slot(c, topic, p->partition) = p;
    c->nparts++;
    lane_entry_refresh(p);
    return p;
}

static void set_paused(kpart_t *p, int pause)
{
    if (p->paused == pause || p->client->consumer == NULL) {
        return;
    }
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, p->topic, p->partition);
    rd_kafka_resp_err_t err = pause ? rd_kafka_pause_partitions(p->client->consumer, l)
                                    : rd_kafka_resume_partitions(p->client->consumer, l);
    if (err == RD_KAFKA_RESP_ERR_NO_ERROR) {
        err = l->elems[0].err;
    }
    rd_kafka_topic_partition_list_destroy(l);
    if (err) {
        OSARA_WARN("kafka: cannot %s %s [%d]: %s", pause ? "pause" : "resume", p->topic,
                   (int)p->partition, rd_kafka_err2str(err));
        return;
    }
    p->paused = pause;
    osara_metric_gauge_add(m_paused, pause ? 1 : -1);
}

/* The lane is over (or back under) max_per_partition: pause, or resume
 * unless the client's overall bound still holds it. */
static void kafka_lane_pause(osara_lane_t *lane, int pause)
{
    kpart_t *p = lane->owner;
    kclient_t *c = p->client;
    if (pause) {
        set_paused(p, 1);
    } else if (!p->revoking && c->inflight <= c->max_inflight / 2) {
        set_paused(p, 0);
    }
}

static void release_input(osara_input_t *in)
{
    kinput_t *kin = in->owner;
    kclient_t *c = kin->part->client;
    if (kin->rkm) {
        rd_kafka_message_destroy(kin->rkm);
    }
    kin->next_free = c->free_inputs;
    c->free_inputs = kin;
}

/* Stores the committable position of p (enable.auto.offset.store=false:
 * librdkafka's auto-commit then commits what was stored). */
static void store_offsets(kpart_t *p)
{
    if (!osara_offsets_advance(&p->track, release_input) || p->retired ||
        p->client->consumer == NULL) {
        return;
    }
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, p->topic, p->partition)->offset = p->track.committable;
    rd_kafka_resp_err_t err = rd_kafka_offsets_store(p->client->consumer, l);
    if (err && err != RD_KAFKA_RESP_ERR__STATE) { /* __STATE: no longer assigned */
        OSARA_WARN("kafka: cannot store the offset of %s [%d]: %s", p->topic,
                   (int)p->partition, rd_kafka_err2str(err));
    }
    rd_kafka_topic_partition_list_destroy(l);
}

/* Crossing the overall low mark: resume every partition that waited only
 * for it - one whose own inputs all finished above the mark would
 * otherwise stay paused with nothing left to resume it. */
static void overall_released(kclient_t *c)
{
    FOR_EACH_PART (c, q) {
        if (q->paused && !q->revoking && !q->lane.paused) {
            set_paused(q, 0);
        }
    }
}

static void stuck_count(kpart_t *p, int delta)
{
    int before = p->retrying;
    p->retrying += delta;
    if ((before == 0) != (p->retrying == 0)) {
        osara_metric_gauge_add(m_stuck, p->retrying ? 1 : -1);
    }
}

static void on_retry_timer(uv_timer_t *t)
{
    kpart_t *p = t->data;
    p->lane.hold = 0;
    osara_lane_pump(&p->lane);
}

/* A failed or cancelled input is handled again, before anything after it
 * (the partition's order holds; its offset is not passed meanwhile). */
static void retry_input(kinput_t *kin, osara_settle_t how)
{
    kpart_t *p = kin->part;
    kclient_t *c = p->client;
    int attempt = kin->d.attempt;
    if (attempt == 1) {
        stuck_count(p, 1);
    }
    /* backoff: a failure that repeats must not spin the loop */
    uint64_t delay = how == OSARA_SETTLE_CANCELLED ? 0 : 50u << (attempt < 7 ? attempt - 1 : 6);
    OSARA_WARN("kafka: %s [%d] offset %lld %s (attempt %d); handling it again%s, "
               "the partition waits for it", p->topic, (int)p->partition,
               (long long)kin->d.in.offset,
               how == OSARA_SETTLE_CANCELLED ? "was cancelled" : "failed", attempt,
               delay ? " after a backoff" : "");
    osara_lane_requeue(&p->lane, &kin->d);
    c->inflight++;
    if (delay == 0) {
        return; /* the lane pumps after settling */
    }
    if (p->retry_timer == NULL) {
        p->retry_timer = osara_xmalloc(sizeof(*p->retry_timer));
        uv_timer_init(&c->w->loop, p->retry_timer);
        p->retry_timer->data = p;
    }
    p->lane.hold = 1;
    uv_timer_start(p->retry_timer, on_retry_timer, delay, 0);
}

static void kafka_settle(osara_delivery_t *d, osara_settle_t how)
{
    kinput_t *kin = (kinput_t *)d;
    kpart_t *p = kin->part;
    kclient_t *c = p->client;
    c->inflight--;
    int letting_go = p->retired || p->revoking || c->closing || p->lane.stopped;
    if (how != OSARA_SETTLE_ACK && !letting_go) {
        retry_input(kin, how);
    } else {
        if (d->attempt > 1) {
            stuck_count(p, -1);
        }
        if (how != OSARA_SETTLE_ACK) {
            d->in.blocked = 1; /* let go: the next owner consumes it again */
        }
        if (kin->rkm) { /* payload no longer needed; the offset entry stays */
            rd_kafka_message_destroy(kin->rkm);
            kin->rkm = NULL;
        }
        store_offsets(p);
    }
    if (c->inflight == c->max_inflight / 2) {
        overall_released(c);
    }
}

static void kafka_finished(osara_delivery_t *d, int ok)
{
    (void)d;
    osara_metric_add(ok ? m_handled : m_failed, 1);
}

static void update_lag(kpart_t *p, int64_t offset)
{
    int64_t lo, hi;
    if (rd_kafka_get_watermark_offsets(p->client->consumer, p->topic, p->partition,
                                       &lo, &hi) == RD_KAFKA_RESP_ERR_NO_ERROR && hi >= 0) {
        osara_metric_set(p->m_lag, (double)(hi - offset - 1 > 0 ? hi - offset - 1 : 0));
    }
}

/* Builds the message table for the Lua dispatcher on T (the lane starts
 * the handler with it). */
static void push_message(lua_State *T, osara_delivery_t *d)
{
    kinput_t *kin = (kinput_t *)d;
    rd_kafka_message_t *m = kin->rkm;
    update_lag(kin->part, m->offset);
    lua_createtable(T, 0, 8);
    lua_pushlstring(T, m->payload ? (const char *)m->payload : "", m->len);
    lua_setfield(T, -2, "raw");
    if (m->key) {
        lua_pushlstring(T, m->key, m->key_len);
        lua_setfield(T, -2, "key");
    }
    lua_pushstring(T, kin->part->topic);
    lua_setfield(T, -2, "topic");
    lua_pushinteger(T, m->partition);
    lua_setfield(T, -2, "partition");
    lua_pushnumber(T, (double)m->offset);
    lua_setfield(T, -2, "offset");
    if (d->attempt > 1) {
        lua_pushinteger(T, d->attempt);
        lua_setfield(T, -2, "attempt");
    }
    rd_kafka_timestamp_type_t tstype;
    int64_t ts = rd_kafka_message_timestamp(m, &tstype);
    if (ts >= 0) {
        lua_pushnumber(T, (double)ts / 1000.0);
        lua_setfield(T, -2, "timestamp");
    }
    rd_kafka_headers_t *hdrs = NULL;
    lua_createtable(T, 0, 0);
    if (rd_kafka_message_headers(m, &hdrs) == RD_KAFKA_RESP_ERR_NO_ERROR) {
        const char *name;
        const void *val;
        size_t size;
        for (size_t i = 0; rd_kafka_header_get_all(hdrs, i, &name, &val, &size) ==
                           RD_KAFKA_RESP_ERR_NO_ERROR; i++) {
            lua_pushlstring(T, val ? val : "", val ? size : 0);
            lua_setfield(T, -2, name);
        }
    }
    lua_setfield(T, -2, "headers"); /* [msg] */
}

static const osara_transport_t kafka_transport = {
    .name = "kafka",
    .push_message = push_message,
    .finished = kafka_finished,
    .settle = kafka_settle,
    .pause = kafka_lane_pause,
};

static void handle_free(uv_handle_t *h)
{
    free(h);
}

static void free_part(kpart_t *p)
{
    if (p->retrying) {
        osara_metric_gauge_add(m_stuck, -1);
    }
    if (p->paused) {
        osara_metric_gauge_add(m_paused, -1);
    }
    osara_input_t *in = p->track.head;
    while (in) {
        osara_input_t *next = in->next;
        release_input(in);
        in = next;
    }
    if (p->retry_timer) {
        uv_close((uv_handle_t *)p->retry_timer, handle_free);
    }
    free(p->topic);
    free(p);
}

/* Frees the retired partitions nothing is held on any more (called from
 * the loop, never from inside a lane callback). */
static void sweep_retired(kclient_t *c)
{
    for (kpart_t **pp = &c->retired; *pp;) {
        kpart_t *p = *pp;
        if (p->lane.held == 0 && p->lane.running == 0) {
            *pp = p->next;
            free_part(p);
        } else {
            pp = &p->next;
        }
    }
}

/* Lets go of p: no longer found by topic and partition; freed by
 * sweep_retired once its running handlers and outputs are over. */
static void retire_part(kclient_t *c, kpart_t *p)
{
    *part_slot(c, p->topic, p->partition) = p->next;
    c->nparts--;
    p->retired = 1;
    osara_lane_stop(&p->lane);
    p->next = c->retired;
    c->retired = p;
}

static void log_consumer_error(kclient_t *c, rd_kafka_resp_err_t err, const char *what)
{
    if (err == c->last_error) {
        return; /* once per change, not a flood */
    }
    c->last_error = err;
    OSARA_WARN("kafka %s: %s", c->bootstrap, what);
}

static kinput_t *input_get(kclient_t *c)
{
    kinput_t *kin = c->free_inputs;
    if (kin) {
        c->free_inputs = kin->next_free;
        memset(kin, 0, sizeof(*kin));
        return kin;
    }
    return osara_xcalloc(1, sizeof(*kin));
}

static void accept_message(kclient_t *c, rd_kafka_message_t *rkm)
{
    if (rkm->err) {
        if (rkm->err != RD_KAFKA_RESP_ERR__PARTITION_EOF) {
            log_consumer_error(c, rkm->err, rd_kafka_message_errstr(rkm));
        }
        rd_kafka_message_destroy(rkm);
        return;
    }
    c->last_error = 0;
    kpart_t *p = get_part(c, rkm);
    if (p->revoking) {
        /* fetched before the revoke: the new owner consumes it from the
         * committed position */
        rd_kafka_message_destroy(rkm);
        return;
    }
    kinput_t *kin = input_get(c);
    kin->d.in.offset = rkm->offset;
    kin->d.in.owner = kin;
    kin->rkm = rkm;
    kin->part = p;
    osara_offsets_push(&p->track, &kin->d.in);
    c->inflight++;
    osara_metric_add(m_consumed, 1);
    if (c->inflight >= c->max_inflight) {
        set_paused(p, 1);
    }
    osara_lane_push(&p->lane, &kin->d); /* may run the handler now */
}

static void on_consumer_ready(uv_poll_t *h, int status, int events)
{
    (void)status;
    (void)events;
    kclient_t *c = h->data;
    uint64_t v;
    if (read(c->cfd, &v, sizeof(v)) < 0 && errno != EAGAIN) {
        OSARA_DEBUG("kafka: wake-up read failed: %s", strerror(errno));
    }
    rd_kafka_message_t *batch[BATCH];
    ssize_t n;
    /* Drain in batches: one wake-up, many messages. */
    while (!c->closing && (n = rd_kafka_consume_batch_queue(c->cq, 0, batch, BATCH)) > 0) {
        for (ssize_t i = 0; i < n; i++) {
            accept_message(c, batch[i]);
        }
    }
    sweep_retired(c);
}

/* ---- producing ---------------------------------------------------------- */

static kout_t *out_get(kclient_t *c)
{
    kout_t *o = c->free_outs;
    if (o) {
        c->free_outs = o->next_free;
        memset(o, 0, sizeof(*o));
        return o;
    }
    return osara_xcalloc(1, sizeof(*o));
}

static void out_unref(kclient_t *c, kout_t *o)
{
    if (--o->refs == 0) {
        o->next_free = c->free_outs;
        c->free_outs = o;
    }
}

static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *rkm, void *opaque)
{
    (void)rk;
    kclient_t *c = opaque;
    kout_t *o = rkm->_private;
    if (o == NULL) {
        return;
    }
    o->done = 1;
    o->err = rkm->err;
    if (rkm->err) {
        osara_metric_add(m_delivery_errors, 1);
        OSARA_ERROR("kafka: delivery to %s [%d] failed: %s", rd_kafka_topic_name(rkm->rkt),
                    (int)rkm->partition, rd_kafka_err2str(rkm->err));
    }
    if (o->d) { /* a lost output fails its input: handled again, never committed past */
        osara_delivery_output_end(o->d, rkm->err == RD_KAFKA_RESP_ERR_NO_ERROR);
        o->d = NULL;
    }
    if (o->waiter && osara_co_waiting(o->waiter) && osara_co_seq(o->waiter) == o->waiter_seq) {
        osara_co_t *co = o->waiter;
        lua_State *T = osara_co_thread(co);
        o->waiter = NULL;
        int n = 1;
        if (rkm->err) {
            lua_pushnil(T);
            lua_pushstring(T, rd_kafka_err2str(rkm->err));
            n = 2;
        } else {
            lua_pushboolean(T, 1);
        }
        osara_sched_resume(co, n);
    }
    out_unref(c, o);
}

static void on_producer_ready(uv_poll_t *h, int status, int events)
{
    (void)status;
    (void)events;
    kclient_t *c = h->data;
    uint64_t v;
    if (read(c->pfd, &v, sizeof(v)) < 0 && errno != EAGAIN) {
        OSARA_DEBUG("kafka: wake-up read failed: %s", strerror(errno));
    }
    rd_kafka_poll(c->producer, 0);
}

/* ---- client lifecycle --------------------------------------------------- */

static void on_error(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    (void)rk;
    kclient_t *c = opaque;
    log_consumer_error(c, (rd_kafka_resp_err_t)err, reason);
}

static void on_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void)rk;
    /* librdkafka repeats connection failures on every retry; errors reach
     * the user once per change through on_error, the rest is debug. */
    osara_log_level_t l = level <= 2 ? OSARA_LOG_ERROR : OSARA_LOG_DEBUG;
    osara_log(l, "librdkafka %s: %s", fac, buf);
}

static void poll_closed(uv_handle_t *h)
{
    free(h);
}

static int watch_queue(kclient_t *c, rd_kafka_queue_t *q, int *fd, uv_poll_t **poll,
                       uv_poll_cb cb)
{
    *fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (*fd < 0) {
        return osara_err_set(-errno, "eventfd: %s", strerror(errno));
    }
    static const uint64_t one = 1;
    rd_kafka_queue_io_event_enable(q, *fd, &one, sizeof(one));
    *poll = malloc(sizeof(**poll));
    uv_poll_init(&c->w->loop, *poll, *fd);
    (*poll)->data = c;
    uv_poll_start(*poll, UV_READABLE, cb);
    return 0;
}

static int has_conf(kclient_t *c, const char *k)
{
    for (int i = 0; i < c->nconf; i++) {
        if (strcmp(c->conf[2 * i], k) == 0) {
            return 1;
        }
    }
    return 0;
}

static int is_consumer_property(const char *k)
{
    static const char *prefixes[] = {
        "group.", "enable.auto.", "auto.", "queued.", "fetch.", "enable.partition.eof",
        "partition.assignment.strategy", "session.timeout.ms", "heartbeat.interval.ms",
        "max.poll.interval.ms", "isolation.level", "check.crcs", "consume.",
        "coordinator.query.interval.ms", "max.partition.fetch.bytes", NULL,
    };
    for (int i = 0; prefixes[i]; i++) {
        if (strncmp(k, prefixes[i], strlen(prefixes[i])) == 0) {
            return 1;
        }
    }
    return 0;
}

static rd_kafka_conf_t *build_conf(kclient_t *c, int consumer, char *errstr, size_t cap)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    for (int i = 0; i < c->nconf; i++) {
        const char *k = c->conf[2 * i], *v = c->conf[2 * i + 1];
        if (!consumer && is_consumer_property(k)) {
            continue; /* keep the producer from warning about them */
        }
        if (rd_kafka_conf_set(conf, k, v, errstr, cap) != RD_KAFKA_CONF_OK) {
            rd_kafka_conf_destroy(conf);
            return NULL;
        }
    }
    rd_kafka_conf_set(conf, "bootstrap.servers", c->bootstrap, errstr, cap);
    rd_kafka_conf_set_opaque(conf, c);
    rd_kafka_conf_set_error_cb(conf, on_error);
    rd_kafka_conf_set_log_cb(conf, on_log);
    if (consumer) {
        rd_kafka_conf_set(conf, "enable.auto.offset.store", "false", errstr, cap);
        if (c->embedded && !has_conf(c, "fetch.wait.max.ms")) {
            /* The mock broker holds every fetch for the full wait. */
            rd_kafka_conf_set(conf, "fetch.wait.max.ms", "5", errstr, cap);
        }
        if (c->embedded && !has_conf(c, "fetch.error.backoff.ms")) {
            /* First fetches race topic creation; retry fast, not in 500 ms. */
            rd_kafka_conf_set(conf, "fetch.error.backoff.ms", "10", errstr, cap);
        }
    } else {
        rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    }
    return conf;
}

/* Frees every partition, live and retired, with the inputs they track
 * (librdkafka waits for held messages at close otherwise). */
static void free_parts(kclient_t *c)
{
    FOR_EACH_PART (c, p) {
        free_part(p);
    }
    if (c->buckets) {
        memset(c->buckets, 0, sizeof(*c->buckets) * (size_t)c->nbuckets);
    }
    c->nparts = 0;
    while (c->retired) {
        kpart_t *p = c->retired;
        c->retired = p->next;
        free_part(p);
    }
}

static void finish_revoke(kclient_t *c);

static void client_close(void *ptr)
{
    kclient_t *c = ptr;
    c->closing = 1;
    if (c->producer) {
        /* Delivery reports advance the offsets of finished inputs. */
        rd_kafka_flush(c->producer, 10000);
    }
    if (c->consumer) {
        if (c->revoking) {
            finish_revoke(c);
        }
        FOR_EACH_PART (c, p) {
            store_offsets(p);
        }
        free_parts(c);
        rd_kafka_consumer_close(c->consumer); /* commits what was stored */
        rd_kafka_queue_destroy(c->cq);
        rd_kafka_destroy(c->consumer);
    }
    if (c->cpoll) {
        uv_close((uv_handle_t *)c->cpoll, poll_closed);
        close(c->cfd);
    }
    if (c->ppoll) {
        uv_close((uv_handle_t *)c->ppoll, poll_closed);
        close(c->pfd);
    }
    if (c->resub_timer) {
        uv_close((uv_handle_t *)c->resub_timer, poll_closed);
    }
    if (c->revoke_timer) {
        uv_close((uv_handle_t *)c->revoke_timer, poll_closed);
    }
    if (c->pq) {
        rd_kafka_queue_destroy(c->pq);
    }
    if (c->producer) {
        rd_kafka_destroy(c->producer); /* also destroys the mock cluster */
    }
    free_parts(c); /* none without a consumer; retired ones otherwise freed above */
    free(c->buckets);
    while (c->free_outs) {
        kout_t *o = c->free_outs;
        c->free_outs = o->next_free;
        free(o);
    }
    while (c->free_inputs) {
        kinput_t *kin = c->free_inputs;
        c->free_inputs = kin->next_free;
        free(kin);
    }
    for (int i = 0; i < 2 * c->nconf; i++) {
        free(c->conf[i]);
    }
    free(c->conf);
    free(c->group);
    free(c->bootstrap);
    free(c->key);
    free(c);
}

static int start_producer(kclient_t *c, char *errstr, size_t cap)
{
    rd_kafka_conf_t *conf = build_conf(c, 0, errstr, cap);
    if (conf == NULL) {
        return -1;
    }
    if (c->embedded) {
        char n[16];
        snprintf(n, sizeof(n), "%d", c->embedded);
        rd_kafka_conf_set(conf, "test.mock.num.brokers", n, errstr, cap);
        /* Sticky partitioning fills one mock partition (~5 MiB each) first. */
        rd_kafka_conf_set(conf, "sticky.partitioning.linger.ms", "0", errstr, cap);
    }
    c->producer = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, cap);
    if (c->producer == NULL) {
        return -1;
    }
    if (c->embedded) {
        c->mock = rd_kafka_handle_mock_cluster(c->producer);
        free(c->bootstrap);
        c->bootstrap = strdup(rd_kafka_mock_cluster_bootstraps(c->mock));
    }
    c->pq = rd_kafka_queue_get_main(c->producer);
    return watch_queue(c, c->pq, &c->pfd, &c->ppoll, on_producer_ready);
}

/* ---- subscriptions ------------------------------------------------------ */

/* A revoked partition is busy while a handler runs or an output of a
 * finished input waits for its delivery report. */
static int part_busy(const kpart_t *p)
{
    return p->lane.held > 0;
}

/* Lets go of the revoked partitions: stores what finished, commits and
 * unassigns. Their kparts retire (still-running handlers finish against
 * them, storing nothing); a later assignment gets fresh ones. */
static void finish_revoke(kclient_t *c)
{
    rd_kafka_topic_partition_list_t *parts = c->revoking;
    int busy = 0;
    c->revoking = NULL;
    if (c->revoke_timer) {
        uv_timer_stop(c->revoke_timer);
    }
    for (int i = 0; i < parts->cnt; i++) {
        kpart_t *p = find_part(c, parts->elems[i].topic, parts->elems[i].partition);
        if (p == NULL) {
            continue;
        }
        store_offsets(p);
        busy += part_busy(p);
        set_paused(p, 0);
        p->revoking = 0;
        retire_part(c, p);
    }
    sweep_retired(c);
    if (busy) {
        OSARA_WARN("kafka: revoked %d partition(s) after %.0f ms with %d still busy "
                   "(over osara.revoke_timeout_ms): the new owner handles their inputs again",
                   parts->cnt, (osara_monotonic() - c->revoke_started) * 1000, busy);
    } else {
        OSARA_INFO("kafka: revoked %d partition(s) after %.0f ms", parts->cnt,
                   (osara_monotonic() - c->revoke_started) * 1000);
    }
    rd_kafka_topic_partition_list_destroy(parts);
    rd_kafka_resp_err_t err = rd_kafka_commit(c->consumer, NULL, 0);
    if (err && err != RD_KAFKA_RESP_ERR__NO_OFFSET) {
        /* the mock coordinator refuses commits once a rebalance started */
        OSARA_WARN("kafka: commit on revoke failed: %s (the new owner handles "
                   "what finished since the last auto-commit again)", rd_kafka_err2str(err));
    }
    rd_kafka_assign(c->consumer, NULL);
}

static void check_revoke(kclient_t *c)
{
    if (c->revoking == NULL) {
        return;
    }
    int busy = 0;
    for (int i = 0; i < c->revoking->cnt && !busy; i++) {
        kpart_t *p = find_part(c, c->revoking->elems[i].topic, c->revoking->elems[i].partition);
        busy = p && part_busy(p);
    }
    if (!busy || osara_monotonic() - c->revoke_started > c->revoke_timeout_ms / 1000.0) {
        finish_revoke(c);
    }
}

static void on_revoke_tick(uv_timer_t *t)
{
    check_revoke(t->data);
}

static void on_rebalance(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                         rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    kclient_t *c = opaque;
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        OSARA_INFO("kafka: assigned %d partition(s)", parts->cnt);
        rd_kafka_assign(rk, parts);
        return;
    }
    /* Revoked: inputs that had not started are dropped (the new owner
     * consumes them from the committed position); running handlers and
     * pending outputs get up to osara.revoke_timeout_ms to finish, so their
     * work is committed here instead of done twice. librdkafka waits for
     * the unassign, which finish_revoke makes from the loop. */
    if (c->revoking) {
        finish_revoke(c);
    }
    for (int i = 0; i < parts->cnt; i++) {
        kpart_t *p = find_part(c, parts->elems[i].topic, parts->elems[i].partition);
        if (p == NULL) {
            continue;
        }
        p->revoking = 1;
        osara_lane_stop(&p->lane); /* queued inputs settle CANCELLED: let go */
        set_paused(p, 1);
    }
    c->revoking = rd_kafka_topic_partition_list_copy(parts);
    c->revoke_started = osara_monotonic();
    if (c->closing) {
        finish_revoke(c);
        return;
    }
    if (c->revoke_timer == NULL) {
        c->revoke_timer = malloc(sizeof(*c->revoke_timer));
        uv_timer_init(&c->w->loop, c->revoke_timer);
        c->revoke_timer->data = c;
    }
    uv_timer_start(c->revoke_timer, on_revoke_tick, 0, 5);
}

static int start_consumer(kclient_t *c)
{
    char errstr[512];
    rd_kafka_conf_t *conf = build_conf(c, 1, errstr, sizeof(errstr));
    if (conf == NULL) {
        return osara_err_set(OSARA_EINVAL, "kafka: %s", errstr);
    }
    if (!c->embedded) {
        rd_kafka_conf_set_rebalance_cb(conf, on_rebalance);
    }
    c->consumer = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof(errstr));
    if (c->consumer == NULL) {
        return osara_err_set(OSARA_EINVAL, "kafka: %s", errstr);
    }
    rd_kafka_poll_set_consumer(c->consumer);
    c->cq = rd_kafka_queue_get_consumer(c->consumer);
    return watch_queue(c, c->cq, &c->cfd, &c->cpoll, on_consumer_ready);
}

static void ensure_topic(kclient_t *c, const char *topic)
{
    if (c->mock && topic[0] != '^') {
        rd_kafka_mock_topic_create(c->mock, topic, c->partitions, 1);
    }
}

static int reset_to_end(kclient_t *c)
{
    for (int i = 0; i < c->nconf; i++) {
        if (strcmp(c->conf[2 * i], "auto.offset.reset") == 0) {
            const char *v = c->conf[2 * i + 1];
            return strcmp(v, "latest") == 0 || strcmp(v, "largest") == 0 || strcmp(v, "end") == 0;
        }
    }
    return 0;
}

/* Embedded: no group join (the mock's initial rebalance takes ~3 s), so
 * assign every partition of the handled topics, resuming from committed
 * offsets. */
static void assign_embedded(kclient_t *c)
{
    double t0 = osara_monotonic();
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(16);
    const struct rd_kafka_metadata *md = NULL;
    /* Asked through the consumer: its cache then knows every leader, so the
     * assigned partitions start fetching at once instead of on a refresh. */
    if (rd_kafka_metadata(c->consumer, 1, NULL, &md, 5000) == RD_KAFKA_RESP_ERR_NO_ERROR) {
        for (int i = 0; i < md->topic_cnt; i++) {
            const char *t = md->topics[i].topic;
            khandler_t *h = handler_for(c, t);
            if (h == NULL) {
                continue;
            }
            for (int j = 0; j < md->topics[i].partition_cnt; j++) {
                rd_kafka_topic_partition_list_add(l, t, md->topics[i].partitions[j].id);
            }
        }
        rd_kafka_metadata_destroy(md);
    }
    /* Resume from the group's committed position. Without one, start at 0:
     * the embedded cluster lives in this process, so every log starts at 0,
     * and asking the broker (auto.offset.reset) costs a second at start-up
     * while the consumer's connection comes up. */
    rd_kafka_committed(c->consumer, l, 5000);
    int64_t start = reset_to_end(c) ? RD_KAFKA_OFFSET_END : 0;
    for (int i = 0; i < l->cnt; i++) {
        if (l->elems[i].offset < 0) {
            l->elems[i].offset = start;
        }
    }
    rd_kafka_assign(c->consumer, l);
    OSARA_DEBUG("kafka: embedded mode assigned %d partition(s) in %.1f ms", l->cnt,
                (osara_monotonic() - t0) * 1000);
    rd_kafka_topic_partition_list_destroy(l);
}

static void resubscribe(kclient_t *c)
{
    c->subscription_dirty = 0;
    if (c->closing) {
        return;
    }
    if (c->consumer == NULL && c->handlers && start_consumer(c) != 0) {
        OSARA_ERROR("%s", osara_err_msg());
        return;
    }
    if (c->consumer == NULL) {
        return;
    }
    if (c->embedded) {
        assign_embedded(c);
        return;
    }
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(4);
    for (khandler_t *h = c->handlers; h; h = h->next) {
        rd_kafka_topic_partition_list_add(l, h->topic, RD_KAFKA_PARTITION_UA);
    }
    rd_kafka_resp_err_t err = l->cnt ? rd_kafka_subscribe(c->consumer, l)
                                     : rd_kafka_unsubscribe(c->consumer);
    if (err) {
        OSARA_ERROR("kafka: cannot subscribe: %s", rd_kafka_err2str(err));
    }
    rd_kafka_topic_partition_list_destroy(l);
}

static void on_resub_timer(uv_timer_t *t)
{
    resubscribe(t->data);
}

/* Several handlers start in one reload: subscribe once, on the next turn. */
static void mark_subscription_dirty(kclient_t *c)
{
    if (c->subscription_dirty) {
        return;
    }
    c->subscription_dirty = 1;
    if (c->resub_timer == NULL) {
        c->resub_timer = malloc(sizeof(*c->resub_timer));
        uv_timer_init(&c->w->loop, c->resub_timer);
        c->resub_timer->data = c;
    }
    uv_timer_start(c->resub_timer, on_resub_timer, 0, 0);
}

/* ---- registry kind "kafka" ---------------------------------------------- */

static kclient_t *check_client_at(lua_State *L, int idx);

static int kind_start(osara_reg_entry_t *e)
{
    lua_State *L = e->vm->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, e->optsref); /* [opts] */
    lua_getfield(L, -1, "client");
    kclient_t *c = check_client_at(L, -1);
    lua_getfield(L, -2, "topic");
    const char *topic = lua_tostring(L, -1);
    khandler_t *h = calloc(1, sizeof(*h));
    h->client = c;
    h->entry = e;
    h->topic = strdup(topic ? topic : "");
    lua_pop(L, 3);
    if (h->topic[0] == '^') {
        if (regcomp(&h->re, h->topic, REG_EXTENDED | REG_NOSUB) != 0) {
            free(h->topic);
            free(h);
            return osara_err_set(OSARA_EINVAL, "invalid topic regex");
        }
        h->is_regex = 1;
    }
    h->next = c->handlers;
    c->handlers = h;
    e->impl = h;
    refresh_entries(c);
    mark_subscription_dirty(c);
    return 0;
}

static void kind_adopt(osara_reg_entry_t *e, osara_reg_entry_t *old)
{
    khandler_t *h = old->impl;
    old->impl = NULL;
    h->entry = e;
    e->impl = h;
    refresh_entries(h->client); /* inputs that waited for the new VM start */
}

static void kind_stop(osara_reg_entry_t *e)
{
    khandler_t *h = e->impl;
    if (h == NULL) {
        return;
    }
    kclient_t *c = h->client;
    for (khandler_t **p = &c->handlers; *p; p = &(*p)->next) {
        if (*p == h) {
            *p = h->next;
            break;
        }
    }
    if (h->is_regex) {
        regfree(&h->re);
    }
    free(h->topic);
    free(h);
    e->impl = NULL;
    refresh_entries(c); /* no lane keeps the stopped entry */
    if (!c->closing && !c->w->stopping) {
        mark_subscription_dirty(c);
    }
}

static const osara_reg_kind_t kafka_kind = {
    .name = "kafka", .start = kind_start, .adopt = kind_adopt, .stop = kind_stop,
};

/* ---- Lua binding -------------------------------------------------------- */

typedef struct {
    kclient_t *c;
} client_ud_t;

typedef struct {
    kout_t *o;
    kclient_t *c;
} receipt_ud_t;

static kclient_t *check_client_at(lua_State *L, int idx)
{
    client_ud_t *ud = luaL_checkudata(L, idx, CLIENT_MT);
    return ud->c;
}

/* Reads the conf table at idx into name/value pairs; validates each with
 * librdkafka so an unknown or invalid property fails at load. */
static int read_conf(lua_State *L, int idx, kclient_t *c, char *errstr, size_t cap)
{
    rd_kafka_conf_t *probe = rd_kafka_conf_new();
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        const char *k = lua_tostring(L, -2);
        const char *v = lua_tostring(L, -1);
        if (lua_type(L, -1) == LUA_TBOOLEAN) {
            v = lua_toboolean(L, -1) ? "true" : "false";
        }
        if (k == NULL || v == NULL) {
            lua_pop(L, 2);
            rd_kafka_conf_destroy(probe);
            snprintf(errstr, cap, "configuration names and values must be strings or numbers");
            return -1;
        }
        if (strcmp(k, "bootstrap.servers") == 0) {
            free(c->bootstrap);
            c->bootstrap = strdup(v);
        } else if (strncmp(k, "osara.", 6) == 0) {
            /* osara's own settings; not librdkafka's */
        } else if (rd_kafka_conf_set(probe, k, v, errstr, cap) != RD_KAFKA_CONF_OK) {
            lua_pop(L, 2);
            rd_kafka_conf_destroy(probe);
            return -1;
        } else {
            c->conf = realloc(c->conf, sizeof(char *) * (size_t)(2 * c->nconf + 2));
            c->conf[2 * c->nconf] = strdup(k);
            c->conf[2 * c->nconf + 1] = strdup(v);
            c->nconf++;
            if (strcmp(k, "group.id") == 0) {
                free(c->group);
                c->group = strdup(v);
            }
        }
        lua_pop(L, 1);
    }
    rd_kafka_conf_destroy(probe);
    return 0;
}

/* client(conf, key, settings) -> client | raises with librdkafka's message.
 * key identifies the configuration (shared across reloads). settings:
 * {brokers=, partitions=, max_per_partition=, max_inflight=}. */
static int l_kafka_client(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    const char *key = luaL_checkstring(L, 2);
    luaL_checktype(L, 3, LUA_TTABLE);
    osara_vm_t *vm = osara_vm_from_L(L);
    osara_worker_t *w = vm->w;
    metrics_init();
    lua_getfield(L, 3, "check");
    int checking = w->opts.mode == OSARA_MODE_CHECK || lua_toboolean(L, -1);
    lua_pop(L, 1);
    char skey[1024];
    snprintf(skey, sizeof(skey), "kafka:%s", key);
    kclient_t *c = checking ? NULL : osara_worker_shared_get(w, skey);
    if (c == NULL) {
        c = calloc(1, sizeof(*c));
        c->w = w;
        c->key = strdup(skey);
        c->bootstrap = strdup("embedded");
        char errstr[512];
        if (read_conf(L, 1, c, errstr, sizeof(errstr)) != 0) {
            client_close(c);
            return luaL_error(L, "kafka: %s", errstr);
        }
        lua_getfield(L, 3, "brokers");
        lua_getfield(L, 3, "partitions");
        lua_getfield(L, 3, "max_per_partition");
        lua_getfield(L, 3, "max_inflight");
        lua_getfield(L, 3, "revoke_timeout_ms");
        c->revoke_timeout_ms = (int)luaL_optinteger(L, -1, 10000);
        lua_pop(L, 1);
        int brokers = (int)luaL_optinteger(L, -4, 1);
        c->partitions = (int)luaL_optinteger(L, -3, 4);
        c->max_per_partition = (int)luaL_optinteger(L, -2, 1000);
        c->max_inflight = (int)luaL_optinteger(L, -1, 10000);
        lua_pop(L, 4);
        c->embedded = strcmp(c->bootstrap, "embedded") == 0 || c->bootstrap[0] == '\0' ? brokers : 0;
        if (checking) {
            client_close(c); /* validated; connect nothing */
            c = NULL;
        } else {
            if (start_producer(c, errstr, sizeof(errstr)) != 0) {
                char msg[600];
                snprintf(msg, sizeof(msg), "%s", errstr[0] ? errstr : osara_err_msg());
                client_close(c);
                return luaL_error(L, "kafka: %s", msg);
            }
            if (c->embedded) {
                OSARA_INFO("kafka: embedded broker (in memory, for development and tests) "
                           "at %s", c->bootstrap);
            }
            osara_worker_shared_put(w, skey, c, client_close);
        }
    }
    client_ud_t *ud = lua_newuserdata(L, sizeof(*ud));
    ud->c = c;
    luaL_getmetatable(L, CLIENT_MT);
    lua_setmetatable(L, -2);
    return 1;
}

static kclient_t *live_client(lua_State *L, int idx)
{
    kclient_t *c = check_client_at(L, idx);
    if (c == NULL) {
        luaL_error(L, "kafka: not connected (osara check mode)");
    }
    return c;
}

/* client:bootstrap() -> "host:port,..." (the mock cluster's when embedded) */
static int l_client_bootstrap(lua_State *L)
{
    kclient_t *c = check_client_at(L, 1);
    lua_pushstring(L, c ? c->bootstrap : "embedded");
    return 1;
}

/* client:ensure_topic(name): creates it in the embedded cluster and
 * fetches its metadata now, so the first send does not wait for the
 * producer's once-a-second scan of unknown topics. */
static int l_client_ensure_topic(lua_State *L)
{
    kclient_t *c = check_client_at(L, 1);
    const char *name = luaL_checkstring(L, 2);
    if (c == NULL || name[0] == '^') {
        return 0;
    }
    ensure_topic(c, name);
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(c->producer, name, NULL);
    const struct rd_kafka_metadata *md = NULL;
    if (rkt && rd_kafka_metadata(c->producer, 0, rkt, &md, 2000) == RD_KAFKA_RESP_ERR_NO_ERROR) {
        rd_kafka_metadata_destroy(md);
    }
    if (rkt) {
        rd_kafka_topic_destroy(rkt);
    }
    return 0;
}

static void receipt_wait_cleanup(void *data)
{
    kout_t *o = data;
    o->waiter = NULL;
}

/* client:produce(topic, payload, key|nil, headers|nil, partition|nil, want)
 * -> receipt | true. Enqueues without waiting; the output counts against
 * the input being handled by the calling coroutine, if any. */
static int l_client_produce(lua_State *L)
{
    kclient_t *c = live_client(L, 1);
    const char *topic = luaL_checkstring(L, 2);
    size_t len, klen = 0;
    const char *payload = luaL_checklstring(L, 3, &len);
    const char *key = lua_isnoneornil(L, 4) ? NULL : luaL_checklstring(L, 4, &klen);
    int32_t partition = lua_isnoneornil(L, 6) ? RD_KAFKA_PARTITION_UA : (int32_t)luaL_checkinteger(L, 6);
    int want = lua_toboolean(L, 7);
    rd_kafka_headers_t *hdrs = NULL;
    if (lua_istable(L, 5)) {
        hdrs = rd_kafka_headers_new(4);
        lua_pushnil(L);
        while (lua_next(L, 5) != 0) {
            size_t vlen;
            const char *v = lua_tolstring(L, -1, &vlen);
            if (lua_type(L, -2) == LUA_TSTRING && v) {
                rd_kafka_header_add(hdrs, lua_tostring(L, -2), -1, v, (ssize_t)vlen);
            }
            lua_pop(L, 1);
        }
    }
    kout_t *o = out_get(c);
    o->refs = 1 + (want ? 1 : 0);
    osara_co_t *co = osara_sched_current(L);
    osara_delivery_t *d = osara_delivery_of(co);
    rd_kafka_vu_t vu[8];
    size_t nvu = 0;
    vu[nvu].vtype = RD_KAFKA_VTYPE_TOPIC;
    vu[nvu++].u.cstr = topic;
    vu[nvu].vtype = RD_KAFKA_VTYPE_MSGFLAGS;
    vu[nvu++].u.i = RD_KAFKA_MSG_F_COPY;
    vu[nvu].vtype = RD_KAFKA_VTYPE_VALUE;
    vu[nvu].u.mem.ptr = (void *)payload;
    vu[nvu++].u.mem.size = len;
    if (key) {
        vu[nvu].vtype = RD_KAFKA_VTYPE_KEY;
        vu[nvu].u.mem.ptr = (void *)key;
        vu[nvu++].u.mem.size = klen;
    }
    vu[nvu].vtype = RD_KAFKA_VTYPE_PARTITION;
    vu[nvu++].u.i32 = partition;
    vu[nvu].vtype = RD_KAFKA_VTYPE_OPAQUE;
    vu[nvu++].u.ptr = o;
    if (hdrs) {
        vu[nvu].vtype = RD_KAFKA_VTYPE_HEADERS;
        vu[nvu++].u.headers = hdrs;
    }
    rd_kafka_error_t *error = rd_kafka_produceva(c->producer, vu, nvu);
    rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;
    if (error) {
        err = rd_kafka_error_code(error);
        rd_kafka_error_destroy(error);
    }
    if (err) {
        if (hdrs) {
            rd_kafka_headers_destroy(hdrs);
        }
        o->refs = 1;
        out_unref(c, o);
        osara_metric_add(m_delivery_errors, 1);
        lua_pushnil(L);
        lua_pushfstring(L, "kafka: cannot produce to %s: %s", topic, rd_kafka_err2str(err));
        return 2;
    }
    osara_metric_add(m_produced, 1);
    if (d) { /* the input is not done before this output is delivered */
        o->d = d;
        osara_delivery_output_begin(d);
    }
    if (!want) {
        lua_pushboolean(L, 1);
        return 1;
    }
    receipt_ud_t *ud = lua_newuserdata(L, sizeof(*ud));
    ud->o = o;
    ud->c = c;
    luaL_getmetatable(L, RECEIPT_MT);
    lua_setmetatable(L, -2);
    return 1;
}

/* receipt:wait() -> true | nil, err: yields until the delivery report */
static int l_receipt_wait(lua_State *L)
{
    receipt_ud_t *ud = luaL_checkudata(L, 1, RECEIPT_MT);
    kout_t *o = ud->o;
    if (o->done) {
        if (o->err) {
            lua_pushnil(L);
            lua_pushstring(L, rd_kafka_err2str(o->err));
            return 2;
        }
        lua_pushboolean(L, 1);
        return 1;
    }
    osara_co_t *co = osara_sched_current(L);
    if (co == NULL) {
        return luaL_error(L, "kafka: wait() only inside a handler, timer or task");
    }
    o->waiter = co;
    o->waiter_seq = osara_co_seq(co) + 1;
    return osara_sched_wait(L, 1, receipt_wait_cleanup, o);
}

static int l_receipt_gc(lua_State *L)
{
    receipt_ud_t *ud = luaL_checkudata(L, 1, RECEIPT_MT);
    if (ud->o) {
        ud->o->waiter = NULL;
        out_unref(ud->c, ud->o);
        ud->o = NULL;
    }
    return 0;
}

/* client:stats() -> {inflight=, partitions=, paused=} */
static int l_client_stats(lua_State *L)
{
    kclient_t *c = live_client(L, 1);
    int paused = 0;
    FOR_EACH_PART (c, p) {
        paused += p->paused;
    }
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, c->inflight);
    lua_setfield(L, -2, "inflight");
    lua_pushinteger(L, c->nparts);
    lua_setfield(L, -2, "partitions");
    lua_pushinteger(L, paused);
    lua_setfield(L, -2, "paused");
    return 1;
}

/* client:position(topic, partition) -> next offset to commit (-1: none yet)
 * and the number of inputs held for that partition. */
static int l_client_position(lua_State *L)
{
    kclient_t *c = live_client(L, 1);
    kpart_t *p = find_part(c, luaL_checkstring(L, 2), (int32_t)luaL_checkinteger(L, 3));
    lua_pushnumber(L, p ? (double)p->track.committable : -1);
    lua_pushinteger(L, p ? p->track.count : 0);
    return 2;
}

/* client:mock_push_errors(api_key, count, err): makes the embedded cluster
 * fail the next `count` requests of that API (tests of retries). */
static int l_client_mock_push_errors(lua_State *L)
{
    kclient_t *c = live_client(L, 1);
    if (c->mock == NULL) {
        return luaL_error(L, "kafka: mock_push_errors needs the embedded cluster");
    }
    int16_t api = (int16_t)luaL_checkinteger(L, 2);
    int n = (int)luaL_checkinteger(L, 3);
    rd_kafka_resp_err_t err = (rd_kafka_resp_err_t)luaL_optinteger(
        L, 4, RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS);
    rd_kafka_resp_err_t errs[64];
    for (int i = 0; i < n && i < 64; i++) {
        errs[i] = err;
    }
    rd_kafka_mock_push_request_errors_array(c->mock, api, (size_t)(n < 64 ? n : 64), errs);
    return 0;
}

int osara_kafka_open(lua_State *L)
{
    static const luaL_Reg client_methods[] = {
        {"bootstrap", l_client_bootstrap}, {"ensure_topic", l_client_ensure_topic},
        {"produce", l_client_produce},     {"stats", l_client_stats},
        {"position", l_client_position},   {"mock_push_errors", l_client_mock_push_errors},
        {NULL, NULL},
    };
    static const luaL_Reg fns[] = {{"client", l_kafka_client}, {NULL, NULL}};
    osara_registry_kind(&kafka_kind);
    luaL_newmetatable(L, CLIENT_MT);
    lua_newtable(L);
    luaL_register(L, NULL, client_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    luaL_newmetatable(L, RECEIPT_MT);
    lua_pushcfunction(L, l_receipt_gc);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L);
    lua_pushcfunction(L, l_receipt_wait);
    lua_setfield(L, -2, "wait");
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}

/* ---- osara broker ------------------------------------------------------- */

static volatile sig_atomic_t broker_stop;

static void on_broker_signal(int sig)
{
    (void)sig;
    broker_stop = 1;
}

int osara_kafka_broker_main(int argc, char **argv)
{
    int brokers = 1, partitions = 4;
    const char *topics[128];
    int ntopics = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            printf("usage: osara broker [--brokers N] [--partitions N] [--topic NAME...]\n\n"
                   "runs the embedded Kafka cluster (librdkafka's mock cluster: in memory,\n"
                   "for development and tests) until SIGTERM; prints its bootstrap address\n"
                   "on the first line. Topics are created on first use.\n");
            return 0;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "osara broker: %s needs a value\n", a);
            return 2;
        }
        if (strcmp(a, "--brokers") == 0) {
            brokers = atoi(argv[++i]);
        } else if (strcmp(a, "--partitions") == 0) {
            partitions = atoi(argv[++i]);
        } else if (strcmp(a, "--topic") == 0 && ntopics < 128) {
            topics[ntopics++] = argv[++i];
        } else {
            fprintf(stderr, "osara broker: unknown option %s\n", a);
            return 2;
        }
    }
    if (brokers < 1 || partitions < 1) {
        fprintf(stderr, "osara broker: --brokers and --partitions must be >= 1\n");
        return 2;
    }
    char errstr[512], n[16];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    snprintf(n, sizeof(n), "%d", brokers);
    rd_kafka_conf_set(conf, "test.mock.num.brokers", n, errstr, sizeof(errstr));
    rd_kafka_conf_set_log_cb(conf, on_log);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    if (rk == NULL) {
        fprintf(stderr, "osara broker: %s\n", errstr);
        return 1;
    }
    rd_kafka_mock_cluster_t *mock = rd_kafka_handle_mock_cluster(rk);
    for (int i = 0; i < ntopics; i++) {
        rd_kafka_mock_topic_create(mock, topics[i], partitions, 1);
    }
    printf("%s\n", rd_kafka_mock_cluster_bootstraps(mock));
    fflush(stdout);
    signal(SIGTERM, on_broker_signal);
    signal(SIGINT, on_broker_signal);
    while (!broker_stop) {
        rd_kafka_poll(rk, 200);
    }
    rd_kafka_destroy(rk);
    return 0;
}
