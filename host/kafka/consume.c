/* consume.c - partitions as ordered lanes, backpressure, offsets. */

#include "core/log.h"
#include "kafka/kafka_int.h"

#define BATCH 512

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
kpart_t *osara__kafka_find_part(kclient_t *c, const char *topic, int32_t partition)
{
    return c->nbuckets ? *part_slot(c, topic, partition) : NULL;
}

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

khandler_t *osara__kafka_handler_for(kclient_t *c, const char *topic)
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
    khandler_t *h = osara__kafka_handler_for(p->client, p->topic);
    osara_lane_set_entry(&p->lane, h ? h->entry : NULL);
}

/* After a handler started, moved to a new VM or stopped: every live
 * partition's lane calls the handler that now matches its topic. */
void osara__kafka_refresh_entries(kclient_t *c)
{
    OSARA_KAFKA_FOR_EACH_PART (c, p) {
        lane_entry_refresh(p);
    }
}

static const osara_transport_t kafka_transport;

static kpart_t *get_part(kclient_t *c, rd_kafka_message_t *rkm)
{
    const char *topic = rd_kafka_topic_name(rkm->rkt);
    kpart_t *p = osara__kafka_find_part(c, topic, rkm->partition);
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

void osara__kafka_set_paused(kpart_t *p, int pause)
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
    osara_metric_gauge_add(osara__kafka_metrics.paused, pause ? 1 : -1);
}

/* The lane is over (or back under) max_per_partition: pause, or resume
 * unless the client's overall bound still holds it. */
static void kafka_lane_pause(osara_lane_t *lane, int pause)
{
    kpart_t *p = lane->owner;
    kclient_t *c = p->client;
    if (pause) {
        osara__kafka_set_paused(p, 1);
    } else if (!p->revoking && c->inflight <= c->max_inflight / 2) {
        osara__kafka_set_paused(p, 0);
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
void osara__kafka_store_offsets(kpart_t *p)
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
    OSARA_KAFKA_FOR_EACH_PART (c, q) {
        if (q->paused && !q->revoking && !q->lane.paused) {
            osara__kafka_set_paused(q, 0);
        }
    }
}

static void stuck_count(kpart_t *p, int delta)
{
    int before = p->retrying;
    p->retrying += delta;
    if ((before == 0) != (p->retrying == 0)) {
        osara_metric_gauge_add(osara__kafka_metrics.stuck, p->retrying ? 1 : -1);
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
        osara__kafka_store_offsets(p);
    }
    if (c->inflight == c->max_inflight / 2) {
        overall_released(c);
    }
}

static void kafka_finished(osara_delivery_t *d, int ok)
{
    /* a failure the policy took (logged, dead-lettered) is not "handled" */
    osara_metric_add(ok && !d->taken ? osara__kafka_metrics.handled : osara__kafka_metrics.failed, 1);
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
    if (d->output_error) { /* the last attempt's output was not delivered */
        lua_pushstring(T, d->output_error);
        lua_setfield(T, -2, "output_error");
        d->output_error = NULL;
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

static void on_pump_timer(uv_timer_t *t)
{
    kclient_t *c = t->data;
    OSARA_KAFKA_FOR_EACH_PART (c, p) {
        if (p->deferred) {
            p->deferred = 0;
            osara_lane_pump(&p->lane);
        }
    }
}

/* A partition's lane used its turn's budget: pump it again on the next
 * turn (one timer per client serves every deferred partition). */
static void kafka_lane_defer(osara_lane_t *lane)
{
    kpart_t *p = lane->owner;
    kclient_t *c = p->client;
    if (c->closing || p->retired) {
        return;
    }
    p->deferred = 1;
    if (c->pump_timer == NULL) {
        c->pump_timer = osara_xmalloc(sizeof(*c->pump_timer));
        uv_timer_init(&c->w->loop, c->pump_timer);
        c->pump_timer->data = c;
    }
    if (!uv_is_active((uv_handle_t *)c->pump_timer)) {
        uv_timer_start(c->pump_timer, on_pump_timer, 0, 0);
    }
}

static const osara_transport_t kafka_transport = {
    .name = "kafka",
    .push_message = push_message,
    .finished = kafka_finished,
    .settle = kafka_settle,
    .pause = kafka_lane_pause,
    .defer = kafka_lane_defer,
};

static void free_part(kpart_t *p)
{
    if (p->retrying) {
        osara_metric_gauge_add(osara__kafka_metrics.stuck, -1);
    }
    if (p->paused) {
        osara_metric_gauge_add(osara__kafka_metrics.paused, -1);
    }
    osara_input_t *in = p->track.head;
    while (in) {
        osara_input_t *next = in->next;
        release_input(in);
        in = next;
    }
    if (p->retry_timer) {
        uv_close((uv_handle_t *)p->retry_timer, osara__kafka_handle_free);
    }
    free(p->topic);
    free(p);
}

/* Frees the retired partitions nothing is held on any more (called from
 * the loop, never from inside a lane callback). */
void osara__kafka_sweep_retired(kclient_t *c)
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
 * osara__kafka_sweep_retired once its running handlers and outputs are over. */
void osara__kafka_retire_part(kclient_t *c, kpart_t *p)
{
    *part_slot(c, p->topic, p->partition) = p->next;
    c->nparts--;
    p->retired = 1;
    osara_lane_stop(&p->lane);
    p->next = c->retired;
    c->retired = p;
}

/* The errors of a broker that cannot be reached: librdkafka alternates
 * them (and repeats them per handle), one change for the log. */
static int unreachable(rd_kafka_resp_err_t err)
{
    return err == RD_KAFKA_RESP_ERR__TRANSPORT || err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN ||
           err == RD_KAFKA_RESP_ERR__RESOLVE;
}

void osara__kafka_log_error(kclient_t *c, rd_kafka_resp_err_t err, const char *what)
{
    if (err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN) {
        c->all_down = 1;
    }
    if (err == c->last_error || (unreachable(err) && unreachable(c->last_error))) {
        return; /* once per change, not a flood */
    }
    c->last_error = err;
    snprintf(c->last_error_text, sizeof(c->last_error_text), "%s", what);
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
            osara__kafka_log_error(c, rkm->err, rd_kafka_message_errstr(rkm));
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
    if (p->track.committable >= 0) { /* a handler that never returns: the lag grows */
        update_lag(p, p->track.committable - 1);
    }
    c->inflight++;
    osara_metric_add(osara__kafka_metrics.consumed, 1);
    if (c->inflight >= c->max_inflight) {
        osara__kafka_set_paused(p, 1);
    }
    osara_lane_push(&p->lane, &kin->d); /* may run the handler now */
}

void osara__kafka_on_consumer_ready(uv_poll_t *h, int status, int events)
{
    (void)status;
    (void)events;
    kclient_t *c = h->data;
    osara__kafka_wakeup_clear(c->cfd);
    rd_kafka_message_t *batch[BATCH];
    /* One batch per loop turn: a backlog (queued.min.messages is a
     * million) drained at once would run thousands of handlers in one turn
     * while timers and HTTP wait. A full batch wakes the next turn. */
    ssize_t n = rd_kafka_consume_batch_queue(c->cq, 0, batch, BATCH);
    for (ssize_t i = 0; i < n; i++) {
        if (c->closing) { /* a handler's end closed the client (its VM went) */
            rd_kafka_message_destroy(batch[i]);
        } else {
            accept_message(c, batch[i]);
        }
    }
    if (n == BATCH && !c->closing) {
        osara__kafka_wakeup_set(c->cfd);
    }
    osara__kafka_sweep_retired(c);
}

/* Frees every partition, live and retired, with the inputs they track
 * (librdkafka waits for held messages at close otherwise). */
void osara__kafka_free_parts(kclient_t *c)
{
    OSARA_KAFKA_FOR_EACH_PART (c, p) {
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
