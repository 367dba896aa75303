/* subs.c - core NATS subscriptions (registry kind "nats") and their
 * delivery: nats.c's thread posts each message to the worker's inbox; the
 * loop runs it in a pooled coroutine, up to max_inflight at once. */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/lvm.h"
#include "nats/natsio_int.h"

static void deliver_msg(void *sub, void *msg);


/* One message of sub left osara's queue (handled or dropped). */
static void settled(nsub_t *sub)
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

/* Lets a nats.c thread waiting in on_msg go (unsubscribe, close). */
static void release_sub(nsub_t *sub)
{
    uv_mutex_lock(&sub->mu);
    sub->released = 1;
    uv_cond_broadcast(&sub->room);
    uv_mutex_unlock(&sub->mu);
}

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
    uv_mutex_unlock(&sub->mu);
    if (osara_inbox_post(&sub->client->w->inbox, deliver_msg, sub, msg) != 0) {
        natsMsg_Destroy(msg);
        settled(sub);
    }
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

static void dispatch_msg(nsub_t *sub, natsMsg *msg);

static void pump(nsub_t *sub)
{
    while (sub->wcount > 0 && sub->inflight < sub->max_inflight && !sub->dead) {
        natsMsg *msg = sub->waiting[sub->whead];
        sub->whead = (sub->whead + 1) % sub->wcap;
        sub->wcount--;
        dispatch_msg(sub, msg);
    }
}

static void on_handler_done(osara_co_t *co, int ok, void *ud)
{
    nsub_t *sub = ud;
    natsMsg_Destroy(osara_co_user(co));
    settled(sub);
    sub->inflight--;
    osara_metric_add(ok ? osara__nats_m.handled : osara__nats_m.failed, 1);
    if (!sub->client->closing) {
        pump(sub);
    }
}

static void enqueue_waiting(nsub_t *sub, natsMsg *msg)
{
    if (sub->wcount == sub->wcap) {
        int cap = sub->wcap ? sub->wcap * 2 : 64;
        natsMsg **ring = malloc(sizeof(*ring) * (size_t)cap);
        for (int i = 0; i < sub->wcount; i++) {
            ring[i] = sub->waiting[(sub->whead + i) % sub->wcap];
        }
        free(sub->waiting);
        sub->waiting = ring;
        sub->wcap = cap;
        sub->whead = 0;
    }
    sub->waiting[(sub->whead + sub->wcount) % sub->wcap] = msg;
    sub->wcount++;
}

static void dispatch_msg(nsub_t *sub, natsMsg *msg)
{
    if (sub->dead || sub->entry == NULL) {
        natsMsg_Destroy(msg);
        settled(sub);
        return;
    }
    if (sub->inflight >= sub->max_inflight) {
        enqueue_waiting(sub, msg); /* waits in the queue; nats.c's pending limit bounds it */
        return;
    }
    osara_co_t *co;
    lua_State *T = osara_sched_acquire(sub->entry->vm, 0, &co);
    if (T == NULL) {
        enqueue_waiting(sub, msg); /* VM retiring: the adopting entry pumps */
        return;
    }
    sub->inflight++;
    lua_rawgeti(T, LUA_REGISTRYINDEX, sub->entry->fnref);
    osara__nats_push_msg(T, msg); /* T: [runner, msg] */
    osara_co_set_user(co, msg);
    if (sub->label_entry != sub->entry) { /* formatted once per handler, not per message */
        snprintf(sub->label, sizeof(sub->label), "nats handler %s (%s)", sub->subject,
                 sub->entry->where);
        sub->label_entry = sub->entry;
    }
    osara_sched_run(co, 1, on_handler_done, sub, sub->label);
}

static void deliver_msg(void *arg, void *msg)
{
    nsub_t *sub = arg;
    if (sub->client->closing) {
        natsMsg_Destroy(msg);
        settled(sub);
        return;
    }
    osara_metric_add(osara__nats_m.received, 1);
    dispatch_msg(sub, msg);
}

/* ---- registry kind "nats" --------------------------------------------------- */

static int kind_start(osara_reg_entry_t *e)
{
    lua_State *L = e->vm->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, e->optsref); /* [opts] */
    lua_getfield(L, -1, "client");
    client_ud_t *ud = luaL_checkudata(L, -1, CLIENT_MT);
    nclient_t *c = ud->c;
    lua_getfield(L, -2, "subject");
    lua_getfield(L, -3, "queue");
    lua_getfield(L, -4, "max_inflight");
    lua_getfield(L, -5, "max_waiting");
    lua_getfield(L, -6, "pending_msgs");
    lua_getfield(L, -7, "pending_bytes");
    nsub_t *sub = calloc(1, sizeof(*sub));
    sub->client = c;
    sub->entry = e;
    sub->subject = strdup(lua_tostring(L, -6));
    sub->queue = lua_isstring(L, -5) ? strdup(lua_tostring(L, -5)) : NULL;
    sub->max_inflight = lua_isnumber(L, -4) ? (int)lua_tointeger(L, -4) : 256;
    sub->queued_max = sub->max_inflight + (lua_isnumber(L, -3) ? (int)lua_tointeger(L, -3) : 1024);
    int pending_msgs = lua_isnumber(L, -2) ? (int)lua_tointeger(L, -2) : 65536;
    int pending_bytes = lua_isnumber(L, -1) ? (int)lua_tointeger(L, -1) : 64 * 1024 * 1024;
    lua_pop(L, 8);
    uv_mutex_init(&sub->mu);
    uv_cond_init(&sub->room);
    natsStatus s = sub->queue
        ? natsConnection_QueueSubscribe(&sub->sub, c->nc, sub->subject, sub->queue, on_msg, sub)
        : natsConnection_Subscribe(&sub->sub, c->nc, sub->subject, on_msg, sub);
    if (s == NATS_OK) {
        /* Bounded, and reported as a slow consumer past it - never silent. */
        natsSubscription_SetPendingLimits(sub->sub, pending_msgs, pending_bytes);
    }
    sub->next = c->subs;
    c->subs = sub;
    e->impl = sub;
    if (s != NATS_OK) {
        sub->dead = 1;
        return osara_err_set(OSARA_EBROKER, "nats: cannot subscribe to %s: %s", sub->subject,
                             natsStatus_GetText(s));
    }
    natsConnection_Flush(c->nc); /* the server knows the interest before we go on */
    return 0;
}

static void kind_adopt(osara_reg_entry_t *e, osara_reg_entry_t *old)
{
    nsub_t *sub = old->impl;
    old->impl = NULL;
    sub->entry = e;
    e->impl = sub;
    pump(sub);
}

static void kind_stop(osara_reg_entry_t *e)
{
    nsub_t *sub = e->impl;
    if (sub == NULL) {
        return;
    }
    sub->dead = 1;
    sub->entry = NULL;
    release_sub(sub);
    if (sub->sub && !sub->client->closing) {
        natsSubscription_Unsubscribe(sub->sub);
    }
    e->impl = NULL;
}

static const osara_reg_kind_t nats_kind = {
    .name = "nats", .start = kind_start, .adopt = kind_adopt, .stop = kind_stop,
};


/* Lets every nats.c thread blocked in on_msg of c go. */
void osara__nats_subs_release(nclient_t *c)
{
    for (nsub_t *s = c->subs; s; s = s->next) {
        release_sub(s);
    }
}

void osara__nats_subs_free(nclient_t *c)
{
    for (nsub_t *s = c->subs; s;) {
        nsub_t *next = s->next;
        if (s->sub) {
            natsSubscription_Destroy(s->sub);
        }
        for (int i = 0; i < s->wcount; i++) {
            natsMsg_Destroy(s->waiting[(s->whead + i) % s->wcap]);
        }
        free(s->waiting);
        uv_mutex_destroy(&s->mu);
        uv_cond_destroy(&s->room);
        free(s->subject);
        free(s->queue);
        free(s);
        s = next;
    }
    c->subs = NULL;
}

void osara__nats_subs_open(void)
{
    osara_registry_kind(&nats_kind);
}
