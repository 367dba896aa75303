/* produce.c - outputs, delivery reports, receipts. */

#include <lauxlib.h>

#include "core/log.h"
#include "core/loop.h"
#include "kafka/kafka_int.h"

/* ---- producing ---------------------------------------------------------- */

/* The last reference is gone: back to the client's pool. */
static void out_free(osara_sched_future_t *f)
{
    kout_t *o = (kout_t *)f;
    o->next_free = o->c->free_outs;
    o->c->free_outs = o;
}

static kout_t *out_get(kclient_t *c)
{
    kout_t *o = c->free_outs;
    if (o) {
        c->free_outs = o->next_free;
    } else {
        o = osara_xmalloc(sizeof(*o));
    }
    memset(o, 0, sizeof(*o));
    osara_sched_future_init(&o->f, out_free); /* the delivery report's reference */
    o->c = c;
    return o;
}

/* An output that cannot be enqueued (too large, unknown partition): it
 * fails the input it was sent for like a failed delivery, so the input is
 * handled again or takes the failure policy instead of being committed. */
static void fail_input(osara_delivery_t *d, const kafka_msg_t *m, rd_kafka_resp_err_t err)
{
    OSARA_ERROR("kafka: cannot produce to %s: %s (its input fails)", m->topic,
                rd_kafka_err2str(err));
    d->output_error = rd_kafka_err2str(err);
    osara_delivery_output_begin(d);
    osara_delivery_output_end(d, 0);
}

kout_t *osara__kafka_produce(kclient_t *c, const kafka_msg_t *m, osara_delivery_t *d,
                             rd_kafka_resp_err_t *err)
{
    kout_t *o = out_get(c);
    rd_kafka_vu_t vu[8];
    size_t nvu = 0;
    vu[nvu].vtype = RD_KAFKA_VTYPE_TOPIC;
    vu[nvu++].u.cstr = m->topic;
    vu[nvu].vtype = RD_KAFKA_VTYPE_MSGFLAGS;
    vu[nvu++].u.i = RD_KAFKA_MSG_F_COPY;
    vu[nvu].vtype = RD_KAFKA_VTYPE_VALUE;
    vu[nvu].u.mem.ptr = (void *)m->payload;
    vu[nvu++].u.mem.size = m->len;
    if (m->key) {
        vu[nvu].vtype = RD_KAFKA_VTYPE_KEY;
        vu[nvu].u.mem.ptr = (void *)m->key;
        vu[nvu++].u.mem.size = m->klen;
    }
    vu[nvu].vtype = RD_KAFKA_VTYPE_PARTITION;
    vu[nvu++].u.i32 = m->partition;
    vu[nvu].vtype = RD_KAFKA_VTYPE_OPAQUE;
    vu[nvu++].u.ptr = o;
    if (m->hdrs) { /* owned by librdkafka once produced */
        vu[nvu].vtype = RD_KAFKA_VTYPE_HEADERS;
        vu[nvu++].u.headers = m->hdrs;
    }
    rd_kafka_error_t *error = rd_kafka_produceva(c->producer, vu, nvu);
    *err = RD_KAFKA_RESP_ERR_NO_ERROR;
    if (error) {
        *err = rd_kafka_error_code(error);
        rd_kafka_error_destroy(error);
        if (m->hdrs) {
            rd_kafka_headers_destroy(m->hdrs);
        }
        osara_sched_future_unref(&o->f);
        if (*err != RD_KAFKA_RESP_ERR__QUEUE_FULL) { /* a full queue: the caller waits */
            osara_metric_add(osara__kafka_metrics.delivery_errors, 1);
            if (d) {
                fail_input(d, m, *err);
            }
        }
        return NULL;
    }
    osara_metric_add(osara__kafka_metrics.produced, 1);
    if (d) { /* the input is not done before this output is delivered */
        o->d = d;
        osara_delivery_output_begin(d);
    }
    return o;
}

/* ---- waiting for room in the producer's queue ---------------------------- */

/* A coroutine waiting for delivery reports to free room in the queue. */
typedef struct kroom_wait_s {
    osara_sched_waiter_t wt;
    kclient_t *c;
    struct kroom_wait_s *next;
} kroom_wait_t;

/* The wait's cleanup (the coroutine was cancelled): forget it. */
static void room_wait_cancel(void *data)
{
    kroom_wait_t *rw = data;
    for (kroom_wait_t **pp = &rw->c->room_waiters; *pp; pp = &(*pp)->next) {
        if (*pp == rw) {
            *pp = rw->next;
            break;
        }
    }
    free(rw);
}

int osara__kafka_wait_room(lua_State *L, kclient_t *c)
{
    kroom_wait_t *rw = osara_xcalloc(1, sizeof(*rw));
    rw->c = c;
    if (osara_sched_waiter_set(&rw->wt, L) != 0) {
        free(rw);
        return luaL_error(L, "kafka: cannot wait for room in the producer's queue here "
                             "(only inside a handler, timer or task)");
    }
    rw->next = c->room_waiters;
    c->room_waiters = rw;
    return osara_sched_wait(L, 0, room_wait_cancel, rw);
}

void osara__kafka_wake_room_waiters(kclient_t *c, int room)
{
    kroom_wait_t *rw = c->room_waiters;
    c->room_waiters = NULL;
    while (rw) {
        kroom_wait_t *next = rw->next;
        osara_co_t *co = osara_sched_waiter_current(&rw->wt);
        if (co) { /* resumed from the inbox: the wait's cleanup no longer runs */
            lua_pushboolean(osara_co_thread(co), room);
            osara_sched_resume_later(co, 1);
        }
        free(rw);
        rw = next;
    }
}

/* The receipt's results: true, or nil and librdkafka's reason. */
static int push_delivery(lua_State *L, void *ud)
{
    kout_t *o = ud;
    if (o->err) {
        lua_pushnil(L);
        lua_pushstring(L, rd_kafka_err2str(o->err));
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

void osara__kafka_on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *rkm, void *opaque)
{
    (void)rk;
    kclient_t *c = opaque;
    kout_t *o = rkm->_private;
    if (o == NULL) {
        return;
    }
    o->err = rkm->err;
    if (rkm->err) {
        osara_metric_add(osara__kafka_metrics.delivery_errors, 1);
        OSARA_ERROR("kafka: delivery to %s [%d] failed: %s", rd_kafka_topic_name(rkm->rkt),
                    (int)rkm->partition, rd_kafka_err2str(rkm->err));
    }
    if (o->d && !c->inputs_freed) { /* a lost output fails its input: handled again */
        if (rkm->err) {
            o->d->output_error = rd_kafka_err2str(rkm->err);
        }
        osara_delivery_output_end(o->d, rkm->err == RD_KAFKA_RESP_ERR_NO_ERROR);
        o->d = NULL;
    }
    if (!c->closing) { /* closing runs on libuv's pool: no VM holds c any more */
        osara_sched_future_complete(&o->f, push_delivery, o);
    }
    osara_sched_future_unref(&o->f); /* the delivery report's */
}

/* Delivery reports served per loop turn: 100,000 outputs acknowledged at
 * once would otherwise be served in one turn (about a second). */
#define REPORTS_PER_TURN 2048

/* The next report of the event being served, taking the next event off
 * the producer's queue as needed; errors are logged on the way. NULL when
 * the queue is empty. */
static const rd_kafka_message_t *next_report(kclient_t *c)
{
    for (;;) {
        if (c->dr_event == NULL) {
            c->dr_event = rd_kafka_queue_poll(c->pq, 0);
            if (c->dr_event == NULL) {
                return NULL;
            }
            if (rd_kafka_event_type(c->dr_event) == RD_KAFKA_EVENT_ERROR) {
                osara__kafka_log_error(c, rd_kafka_event_error(c->dr_event),
                                       rd_kafka_event_error_string(c->dr_event));
            } else if (rd_kafka_event_type(c->dr_event) == RD_KAFKA_EVENT_STATS) {
                osara__kafka_on_stats(c, rd_kafka_event_stats(c->dr_event));
            }
        }
        const rd_kafka_message_t *rkm = rd_kafka_event_type(c->dr_event) == RD_KAFKA_EVENT_DR
                                            ? rd_kafka_event_message_next(c->dr_event)
                                            : NULL;
        if (rkm) {
            return rkm;
        }
        rd_kafka_event_destroy(c->dr_event);
        c->dr_event = NULL;
    }
}

/* A turn's share of delivery reports: REPORTS_PER_TURN, or the loop's
 * turn budget in time (checked every 64: the clock is not free). */
static int turn_over(int served, uint64_t t0)
{
    return served >= REPORTS_PER_TURN ||
           (served > 0 && served % 64 == 0 &&
            uv_hrtime() - t0 >= (uint64_t)OSARA_TURN_BUDGET_MS * 1000000);
}

/* Serves the producer's queue as events (the same reports and errors the
 * callbacks get when rd_kafka_flush serves it at close), a bounded number
 * per turn; a full turn wakes the next one. */
void osara__kafka_on_producer_ready(uv_poll_t *h, int status, int events)
{
    (void)status;
    (void)events;
    kclient_t *c = h->data;
    osara__kafka_wakeup_clear(c->pfd);
    int served = 0;
    uint64_t t0 = uv_hrtime();
    while (!turn_over(served, t0)) {
        const rd_kafka_message_t *rkm = c->closing ? NULL : next_report(c);
        if (rkm == NULL) {
            break;
        }
        osara__kafka_on_delivery(c->producer, rkm, c);
        served++;
    }
    if (served > 0 && c->room_waiters) { /* served reports made room */
        osara__kafka_wake_room_waiters(c, 1);
    }
    if (turn_over(served, t0)) {
        osara__kafka_wakeup_set(c->pfd);
    }
}
