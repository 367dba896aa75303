/* produce.c - outputs, delivery reports, receipts. */

#include <errno.h>
#include <unistd.h>

#include "core/log.h"
#include "kafka/kafka_int.h"

/* ---- producing ---------------------------------------------------------- */

kout_t *osara__kafka_out_get(kclient_t *c)
{
    kout_t *o = c->free_outs;
    if (o) {
        c->free_outs = o->next_free;
        memset(o, 0, sizeof(*o));
        return o;
    }
    return osara_xcalloc(1, sizeof(*o));
}

void osara__kafka_out_unref(kclient_t *c, kout_t *o)
{
    if (--o->refs == 0) {
        o->next_free = c->free_outs;
        c->free_outs = o;
    }
}

void osara__kafka_on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *rkm, void *opaque)
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
        osara_metric_add(osara__kafka_metrics.delivery_errors, 1);
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
    osara__kafka_out_unref(c, o);
}

void osara__kafka_on_producer_ready(uv_poll_t *h, int status, int events)
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
