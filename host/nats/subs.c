/* subs.c - core NATS subscriptions (registry kind "nats") on transport
 * lanes. nats.c's delivery thread posts each message to the worker's
 * inbox; the loop pushes it onto the subscription's unordered lane, which
 * runs up to max_inflight handlers at once. Over max_inflight + max_waiting
 * messages in osara, the delivery thread waits, so messages pile up in
 * nats.c's pending list, whose limits report a slow consumer instead of
 * growing without bound. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/mem.h"
#include "core/log.h"
#include "core/lvm.h"
#include "nats/natsio_int.h"

/* A message on a lane. */
typedef struct {
    osara_delivery_t d; /* first: the lane hands it back */
    natsMsg *msg;
} nmsg_t;

/* An inbox event too (osara__nats_dispose). */
static void sub_free(void *arg, void *unused)
{
    (void)unused;
    nsub_t *sub = arg;
    uv_mutex_destroy(&sub->mu);
    uv_cond_destroy(&sub->room);
    free(sub->subject);
    free(sub->queue);
    free(sub);
}

/* Drops one reference. `inline_free` is 0 where the caller still touches
 * the lane afterwards (inside settle): the free then runs from the inbox.
 * Any thread; a nats.c thread passes 0 and frees in place only when the
 * inbox is closed (the loop is gone). */
static void sub_unref(nsub_t *sub, int inline_free)
{
    uv_mutex_lock(&sub->mu);
    int last = --sub->refs == 0;
    uv_mutex_unlock(&sub->mu);
    if (!last) {
        return;
    }
    osara__nats_dispose(sub->inbox, sub_free, sub, inline_free);
}

/* One message left osara (settled, or dropped before the lane). */
static void sub_settled(nsub_t *sub)
{
    uv_mutex_lock(&sub->mu);
    sub->queued--;
    /* Wake the delivery thread at half, not per message: one wake-up then
     * fills half the queue instead of a thread ping-pong per message. */
    if (sub->blocked && sub->queued <= sub->queued_max / 2) {
        sub->blocked = 0;
        uv_cond_signal(&sub->room);
    }
    uv_mutex_unlock(&sub->mu);
}

/* Lets a nats.c thread waiting in on_msg go (stop, close). */
static void release_sub(nsub_t *sub)
{
    uv_mutex_lock(&sub->mu);
    sub->released = 1;
    uv_cond_broadcast(&sub->room);
    uv_mutex_unlock(&sub->mu);
}

static void deliver_msg(void *arg, void *msg);

/* nats.c's delivery thread. */
static void on_msg(natsConnection *nc, natsSubscription *s, natsMsg *msg, void *closure)
{
    (void)nc;
    (void)s;
    nsub_t *sub = closure;
    uv_mutex_lock(&sub->mu);
    while (sub->queued >= sub->queued_max && !sub->released) {
        sub->blocked = 1;
        uv_cond_wait(&sub->room, &sub->mu);
    }
    sub->queued++;
    sub->refs++;
    uv_mutex_unlock(&sub->mu);
    if (osara_inbox_post(sub->inbox, deliver_msg, sub, msg) != 0) {
        natsMsg_Destroy(msg);
        sub_settled(sub);
        sub_unref(sub, 0); /* nats.c still holds one: never the last */
    }
}

/* nats.c's delivery thread, after its last on_msg for sub. */
static void on_sub_complete(void *closure)
{
    nsub_t *sub = closure;
    uv_mutex_lock(&sub->mu);
    sub->completed = 1;
    uv_mutex_unlock(&sub->mu);
    sub_unref(sub, 0);
}

void osara__nats_push_msg(lua_State *T, natsMsg *msg)
{
    lua_createtable(T, 0, 5);
    lua_pushstring(T, natsMsg_GetSubject(msg));
    lua_setfield(T, -2, "subject");
    lua_pushlstring(T, natsMsg_GetData(msg) ? natsMsg_GetData(msg) : "",
                    (size_t)natsMsg_GetDataLength(msg));
    lua_setfield(T, -2, "raw");
    if (natsMsg_GetReply(msg)) {
        lua_pushstring(T, natsMsg_GetReply(msg));
        lua_setfield(T, -2, "reply");
    }
    lua_createtable(T, 0, 0);
    const char **keys = NULL;
    int n = 0;
    if (natsMsgHeader_Keys(msg, &keys, &n) == NATS_OK) {
        for (int i = 0; i < n; i++) {
            const char *v = NULL;
            if (natsMsgHeader_Get(msg, keys[i], &v) == NATS_OK && v) {
                lua_pushstring(T, v);
                lua_setfield(T, -2, keys[i]);
            }
        }
        free((void *)keys);
    }
    lua_setfield(T, -2, "headers");
}

/* ---- the lane's transport ------------------------------------------------ */

static void tp_push_message(lua_State *T, osara_delivery_t *d)
{
    osara__nats_push_msg(T, ((nmsg_t *)d)->msg);
}

static void tp_finished(osara_delivery_t *d, int ok)
{
    /* a failure the policy took (logged, dead-lettered) is not "handled" */
    osara_metric_add(ok && !d->taken ? osara__nats_m.handled : osara__nats_m.failed, 1);
}

/* Core NATS delivers at most once: whatever the outcome, the message goes. */
static void tp_settle(osara_delivery_t *d, osara_settle_t how)
{
    (void)how;
    nmsg_t *m = (nmsg_t *)d;
    nsub_t *sub = d->lane->owner;
    natsMsg_Destroy(m->msg);
    free(m);
    sub_settled(sub);
    sub_unref(sub, 0); /* the lane is still touched after settle */
}

static void pump_deferred(void *arg, void *unused)
{
    (void)unused;
    nsub_t *sub = arg;
    sub->deferred = 0;
    if (!sub->stopped) {
        osara_lane_pump(&sub->lane);
    }
    sub_unref(sub, 1);
}

/* The lane used its share of the loop turn: pump the rest from the inbox,
 * on the next turn (as Kafka's lanes do). */
static void tp_defer(osara_lane_t *lane)
{
    nsub_t *sub = lane->owner;
    if (sub->deferred || sub->stopped) {
        return;
    }
    sub->deferred = 1;
    uv_mutex_lock(&sub->mu);
    sub->refs++; /* the event's */
    uv_mutex_unlock(&sub->mu);
    if (osara_inbox_post(sub->inbox, pump_deferred, sub, NULL) != 0) {
        sub->deferred = 0;
        sub_unref(sub, 0);
    }
}

static const osara_transport_t nats_transport = {
    .name = "nats",
    .push_message = tp_push_message,
    .finished = tp_finished,
    .settle = tp_settle,
    .defer = tp_defer,
};

static void deliver_msg(void *arg, void *msg)
{
    nsub_t *sub = arg;
    if (sub->stopped) {
        natsMsg_Destroy(msg);
        sub_settled(sub);
        sub_unref(sub, 1);
        return;
    }
    osara_metric_add(osara__nats_m.received, 1);
    nmsg_t *m = osara_xmalloc(sizeof(*m));
    m->msg = msg;
    osara_lane_push(&sub->lane, &m->d); /* the event's reference goes with it */
}

/* ---- subscribing off the loop --------------------------------------------- */

typedef struct {
    uv_work_t work;
    nsub_t *sub;  /* held */
    nclient_t *c; /* its job count holds it */
    natsConnection *nc;
    natsStatus status;
} nflush_t;

static void flush_work(uv_work_t *work)
{
    nflush_t *f = work->data;
    f->status = natsConnection_FlushTimeout(f->nc, 10000);
}

static void sub_drain_prev(nsub_t *sub);
static void handover_done(nsub_t *prev);
static void sub_release(nsub_t *sub);

static void flush_after(uv_work_t *work, int status)
{
    (void)status;
    nflush_t *f = work->data;
    nsub_t *sub = f->sub;
    nclient_t *c = f->c;
    natsStatus s = f->status;
    free(f);
    sub->confirming = 0;
    if (s == NATS_OK) {
        sub->confirmed = 1;
        OSARA_INFO("nats: subscribed to %s", sub->subject);
    } else if (!sub->stopped && atomic_load(&c->connected)) {
        OSARA_WARN("nats: subscribing to %s not confirmed by the server yet: %s", sub->subject,
                   natsStatus_GetText(s));
    }
    sub_drain_prev(sub); /* confirmed or not: never both for long */
    for (nsub_t *prev = sub->prev; prev; prev = prev->prev) {
        handover_done(prev);
    }
    osara__nats_job_end(c); /* the sub holds c */
    sub_unref(sub, 1);
}

/* Logs "nats: subscribed to <subject>" once the server confirmed the
 * interest (a PING/PONG round trip in the thread pool, never on the loop),
 * then lets a predecessor on the old client go. */
static void confirm_subscribed(nsub_t *sub)
{
    nclient_t *c = sub->client;
    nflush_t *f = osara_xcalloc(1, sizeof(*f));
    sub->confirming = 1;
    f->sub = sub;
    f->c = c;
    f->nc = c->nc;
    f->work.data = f;
    uv_mutex_lock(&sub->mu);
    sub->refs++; /* the job's */
    uv_mutex_unlock(&sub->mu);
    osara__nats_job_begin(c);
    if (uv_queue_work(&c->w->loop, &f->work, flush_work, flush_after) != 0) {
        f->status = NATS_ERR;
        flush_after(&f->work, 0);
    }
}

/* ---- registry kind "nats" -------------------------------------------------- */

static int opt_int(lua_State *L, int idx, const char *name, int dflt)
{
    lua_getfield(L, idx, name);
    int v = lua_isnumber(L, -1) ? (int)lua_tointeger(L, -1) : dflt;
    lua_pop(L, 1);
    return v;
}

static nsub_t *sub_new(nclient_t *c, lua_State *L, int opts)
{
    nsub_t *sub = osara_xcalloc(1, sizeof(*sub));
    sub->client = c;
    lua_getfield(L, opts, "subject");
    lua_getfield(L, opts, "queue"); /* [subject, queue] */
    sub->subject = osara_xstrdup(lua_tostring(L, -2));
    sub->queue = lua_isstring(L, -1) ? osara_xstrdup(lua_tostring(L, -1)) : NULL;
    lua_pop(L, 2);
    int max_inflight = opt_int(L, opts, "max_inflight", 256);
    sub->queued_max = max_inflight + opt_int(L, opts, "max_waiting", 1024);
    /* The delivery thread's bound keeps held under queued_max: no pause. */
    osara_lane_init(&sub->lane, &nats_transport, sub, sub->subject, 0, max_inflight,
                    sub->queued_max);
    sub->inbox = &c->w->inbox;
    sub->refs = 1; /* the registry entry's */
    uv_mutex_init(&sub->mu);
    uv_cond_init(&sub->room);
    return sub;
}

static natsStatus subscribe(nsub_t *sub, lua_State *L, int opts)
{
    nclient_t *c = sub->client;
    /* nats.c's reference, taken before its thread may call on_msg. */
    sub->refs++;
    natsStatus s = sub->queue ? natsConnection_QueueSubscribe(&sub->sub, c->nc, sub->subject,
                                                              sub->queue, on_msg, sub)
                              : natsConnection_Subscribe(&sub->sub, c->nc, sub->subject,
                                                         on_msg, sub);
    if (s != NATS_OK) {
        sub->refs--; /* no thread calls on_msg: nobody else can hold it yet */
        return s;
    }
    s = natsSubscription_SetOnCompleteCB(sub->sub, on_sub_complete, sub);
    if (s != NATS_OK) {
        /* Without the callback nothing tells when nats.c is done with sub:
         * its reference stays (a leak, never a use after free). */
        return s;
    }
    /* Bounded, and reported as a slow consumer past it - never silent. */
    return natsSubscription_SetPendingLimits(sub->sub, opt_int(L, opts, "pending_msgs", 65536),
                                             opt_int(L, opts, "pending_bytes", 64 << 20));
}

static void sub_stop(nsub_t *sub)
{
    if (sub->stopped) {
        return;
    }
    sub->stopped = 1;
    osara_lane_stop(&sub->lane); /* queued messages settle CANCELLED */
    release_sub(sub);
    if (sub->sub) {
        natsStatus s = NATS_OK;
        /* (a drained one is closed already) */
        if (sub->client && !sub->client->closing && natsSubscription_IsValid(sub->sub)) {
            s = natsSubscription_Unsubscribe(sub->sub);
        }
        if (s != NATS_OK) { /* the server drops the interest when the connection goes */
            OSARA_WARN("nats: unsubscribing from %s: %s", sub->subject, natsStatus_GetText(s));
        }
        natsSubscription_Destroy(sub->sub);
        sub->sub = NULL;
    }
}

static void sub_unlink(nsub_t *sub)
{
    nclient_t *c = sub->client;
    if (c == NULL) {
        return;
    }
    for (nsub_t **p = &c->subs; *p; p = &(*p)->next) {
        if (*p == sub) {
            *p = sub->next;
            break;
        }
    }
    sub->client = NULL;
    osara__nats_client_unref(c);
}

/* Stops sub and drops the registry's reference: what is queued is
 * dropped, running handlers finish; it goes with its last reference. */
static void sub_release(nsub_t *sub)
{
    handover_done(sub);
    if (sub->prev) {
        sub_release(sub->prev);
        sub->prev = NULL;
    }
    osara_lane_set_entry(&sub->lane, NULL);
    sub_stop(sub);
    sub_unlink(sub);
    sub_unref(sub, 1);
}

static void sub_retire(osara_reg_entry_t *e)
{
    nsub_t *sub = e->impl;
    if (sub != NULL) {
        e->impl = NULL;
        sub_release(sub);
    }
}

/* The successor is confirmed (or gone): the predecessor's connection may
 * close; it drains then, delivering what the server sent it. */
static void handover_done(nsub_t *prev)
{
    if (prev->handing) {
        prev->handing = 0;
        osara__nats_job_end(prev->client);
    }
}

/* The successor is confirmed: the predecessor unsubscribes, still
 * delivering (to the successor's handler) what the server sent it. */
static void sub_drain_prev(nsub_t *sub)
{
    for (nsub_t *prev = sub->prev; prev; prev = prev->prev) {
        if (prev->stopped || prev->sub == NULL || !natsSubscription_IsValid(prev->sub)) {
            continue;
        }
        natsStatus s = natsSubscription_Drain(prev->sub);
        if (s != NATS_OK) {
            OSARA_WARN("nats: draining the old subscription to %s: %s", prev->subject,
                       natsStatus_GetText(s));
        }
    }
}

/* Points sub's predecessors at the entry now serving (NULL: hold). */
static void prev_set_entry(nsub_t *sub, osara_reg_entry_t *e)
{
    for (nsub_t *prev = sub->prev; prev; prev = prev->prev) {
        osara_lane_set_entry(&prev->lane, e);
    }
}

/* Drops the predecessors that are finished: drained by nats.c and with
 * nothing left in osara. */
static void prev_trim(nsub_t *sub)
{
    nsub_t **link = &sub->prev;
    while (*link) {
        nsub_t *prev = *link;
        uv_mutex_lock(&prev->mu);
        int finished = prev->completed && prev->queued == 0;
        uv_mutex_unlock(&prev->mu);
        if (finished) {
            *link = prev->prev;
            prev->prev = NULL;
            sub_release(prev);
        } else {
            link = &prev->prev;
        }
    }
}

/* The entry of the new script version with e's key that is about to start
 * (a handler restarted because its client or options changed), or NULL. */
static osara_reg_entry_t *successor(osara_reg_entry_t *e)
{
    osara_vm_t *serving = e->vm->w->vm;
    if (serving == NULL || serving == e->vm) {
        return NULL;
    }
    for (osara_reg_entry_t *n = serving->reg.head; n; n = n->next) {
        if (n->kind == e->kind && !n->active && n->impl == NULL &&
            strcmp(n->key, e->key) == 0) {
            return n;
        }
    }
    return NULL;
}

static int kind_start(osara_reg_entry_t *e)
{
    nsub_t *prev = e->impl; /* handed over by kind_stop, or NULL */
    e->impl = NULL;
    nclient_t *c = osara__nats_entry_client(e); /* [opts] */
    if (c == NULL) {
        if (prev) {
            sub_release(prev);
        }
        return OSARA_EBROKER;
    }
    lua_State *L = e->vm->L;
    nsub_t *sub = sub_new(c, L, lua_gettop(L));
    osara__nats_client_ref(c);
    sub->next = c->subs;
    c->subs = sub;
    sub->prev = prev;
    e->impl = sub;
    natsStatus s = subscribe(sub, L, lua_gettop(L));
    lua_pop(L, 1);
    if (s != NATS_OK) {
        int rc = osara_err_set(OSARA_EBROKER, "nats: cannot subscribe to %s: %s", sub->subject,
                               natsStatus_GetText(s));
        sub_retire(e);
        return rc;
    }
    osara_lane_set_entry(&sub->lane, e);
    prev_set_entry(sub, e); /* their messages: the new handler */
    confirm_subscribed(sub);
    return 0;
}

static void kind_adopt(osara_reg_entry_t *e, osara_reg_entry_t *old)
{
    nsub_t *sub = osara__nats_adopt(e, old, offsetof(nsub_t, lane));
    if (sub) {
        prev_set_entry(sub, e);
    }
}

/* A handler restarted on another client hands its subscription to its
 * successor, which keeps it until its own is confirmed: no gap in which
 * the subject has no subscriber (core NATS would drop what is published
 * then). Otherwise the subscription stops. */
static void kind_stop(osara_reg_entry_t *e)
{
    nsub_t *sub = e->impl;
    osara_reg_entry_t *next = sub && !sub->stopped ? successor(e) : NULL;
    if (next == NULL) {
        sub_retire(e);
        return;
    }
    e->impl = NULL;
    prev_trim(sub); /* older handovers: the unfinished ones go along */
    osara_lane_set_entry(&sub->lane, NULL); /* queued: wait for the successor */
    prev_set_entry(sub, NULL);
    sub->handed = 1;
    sub->handing = 1;
    osara__nats_job_begin(sub->client);
    next->impl = sub;
}

/* An entry that never started may hold a handed-over subscription. */
static void kind_release(osara_reg_entry_t *e)
{
    if (!e->active && e->impl) {
        sub_release(e->impl);
        e->impl = NULL;
    }
}

static const osara_reg_kind_t nats_kind = {
    .name = "nats", .start = kind_start, .adopt = kind_adopt, .stop = kind_stop,
    .release = kind_release,
};

void osara__nats_subs_close(nclient_t *c)
{
    /* The entries keep e->impl: their stop finds the subscription stopped
     * and drops the registry's reference then. */
    for (nsub_t *sub = c->subs; sub; sub = sub->next) {
        if (!sub->handed) { /* a successor's: the connection's drain delivers it */
            sub_stop(sub);
        }
    }
}

void osara__nats_subs_connected(nclient_t *c)
{
    for (nsub_t *sub = c->subs; sub; sub = sub->next) {
        if (!sub->stopped && !sub->confirmed && !sub->confirming && sub->sub) {
            confirm_subscribed(sub);
        }
    }
}

void osara__nats_subs_open(void)
{
    osara_registry_kind(&nats_kind);
}
