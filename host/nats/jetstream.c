/* jetstream.c - JetStream: streams, durable pull consumers (registry kind
 * "nats-durable") and publish with the stream's ack. */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/err.h"
#include "core/log.h"
#include "core/lvm.h"
#include "nats/natsio_int.h"

/* ---- JetStream ------------------------------------------------------------ *
 * Durable pull consumers: a fetch thread per subscription pulls a batch
 * (natsSubscription_Fetch blocks, so it never runs on the loop), hands it to
 * the loop through the inbox, and waits until the batch was handled before
 * pulling the next: in flight is bounded by the batch size. The handler's
 * outcome decides ack, nak with delay (retried) or term (never retried). */

typedef struct njs_s {
    struct njs_s *next;
    nclient_t *client;
    osara_reg_entry_t *entry;
    natsSubscription *sub;
    char *subject, *durable, *stream;
    int batch;
    int64_t max_deliver;
    double nak_delay, ack_wait;
    uv_thread_t thread;
    int thread_started;
    uv_sem_t go;
    volatile int stop;
    int pending;                /* messages of the current batch not yet settled */
} njs_t;

typedef struct {
    njs_t *j;
    natsMsg **msgs;
    int count;
} njs_batch_t;

typedef struct {
    njs_t *j;
    natsMsg *msg;
} njs_call_t;

static void njs_settled(njs_t *j)
{
    if (--j->pending == 0) {
        uv_sem_post(&j->go); /* the fetch thread may pull the next batch */
    }
}

static void njs_settle(njs_t *j, natsMsg *msg, const char *outcome)
{
    if (strcmp(outcome, "ok") == 0) {
        natsMsg_Ack(msg, NULL);
        osara_metric_add(osara__nats_m.acked, 1);
    } else {
        jsMsgMetaData *meta = NULL;
        uint64_t delivered = 0;
        if (natsMsg_GetMetaData(&meta, msg) == NATS_OK) {
            delivered = meta->NumDelivered;
            jsMsgMetaData_Destroy(meta);
        }
        if (strcmp(outcome, "term") == 0 || (j->max_deliver > 0 && (int64_t)delivered >= j->max_deliver)) {
            natsMsg_Term(msg, NULL);
            osara_metric_add(osara__nats_m.termed, 1);
            OSARA_WARN("nats %s (durable %s): message terminated after %llu deliveries (%s)",
                       j->subject, j->durable, (unsigned long long)delivered, outcome);
        } else {
            natsMsg_NakWithDelay(msg, (int64_t)(j->nak_delay * 1000), NULL);
            osara_metric_add(osara__nats_m.naked, 1);
        }
    }
    natsMsg_Destroy(msg);
    njs_settled(j);
}

static void njs_done(osara_co_t *co, int ok, void *ud)
{
    njs_call_t *call = ud;
    lua_State *T = osara_co_thread(co);
    const char *outcome = ok && lua_isstring(T, 1) ? lua_tostring(T, 1) : "nak";
    njs_settle(call->j, call->msg, outcome);
    free(call);
}

static void njs_deliver(void *arg, void *unused)
{
    (void)unused;
    njs_batch_t *b = arg;
    njs_t *j = b->j;
    j->pending = b->count;
    for (int i = 0; i < b->count; i++) {
        natsMsg *msg = b->msgs[i];
        osara_co_t *co;
        lua_State *T = (j->stop || j->entry == NULL || j->client->closing)
                           ? NULL : osara_sched_acquire(j->entry->vm, 0, &co);
        if (T == NULL) {
            njs_settle(j, msg, "nak"); /* redelivered later, never lost */
            continue;
        }
        njs_call_t *call = malloc(sizeof(*call));
        call->j = j;
        call->msg = msg;
        osara_metric_add(osara__nats_m.received, 1);
        lua_rawgeti(T, LUA_REGISTRYINDEX, j->entry->fnref);
        osara__nats_push_msg(T, msg);
        char what[256];
        snprintf(what, sizeof(what), "nats durable %s (%s)", j->durable, j->entry->where);
        osara_sched_run(co, 1, njs_done, call, what);
    }
    free(b->msgs);
    free(b);
}

static void njs_thread(void *arg)
{
    njs_t *j = arg;
    while (!j->stop) {
        natsMsgList list = {0};
        natsStatus s = natsSubscription_Fetch(&list, j->sub, j->batch, 500, NULL);
        if (s == NATS_OK && list.Count > 0) {
            njs_batch_t *b = malloc(sizeof(*b));
            b->j = j;
            b->count = list.Count;
            b->msgs = malloc(sizeof(natsMsg *) * (size_t)list.Count);
            for (int i = 0; i < list.Count; i++) {
                b->msgs[i] = list.Msgs[i];
                list.Msgs[i] = NULL;
            }
            natsMsgList_Destroy(&list);
            if (osara_inbox_post(&j->client->w->inbox, njs_deliver, b, NULL) != 0) {
                for (int i = 0; i < b->count; i++) {
                    natsMsg_Destroy(b->msgs[i]);
                }
                free(b->msgs);
                free(b);
                break;
            }
            uv_sem_wait(&j->go);
        } else if (s != NATS_TIMEOUT && !j->stop) {
            usleep(100000); /* disconnected: nats.c reconnects meanwhile */
        }
    }
}

static void njs_stop_thread(njs_t *j)
{
    if (j->thread_started) {
        j->stop = 1;
        uv_sem_post(&j->go);
        uv_thread_join(&j->thread);
        j->thread_started = 0;
    }
}

static void njs_free(njs_t *j)
{
    njs_stop_thread(j);
    if (j->sub) {
        natsSubscription_Destroy(j->sub);
    }
    uv_sem_destroy(&j->go);
    free(j->subject);
    free(j->durable);
    free(j->stream);
    free(j);
}

static natsStatus ensure_js(nclient_t *c)
{
    if (c->js) {
        return NATS_OK;
    }
    return natsConnection_JetStream(&c->js, c->nc, NULL);
}

static int js_start(osara_reg_entry_t *e)
{
    lua_State *L = e->vm->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, e->optsref); /* [opts] */
    lua_getfield(L, -1, "client");
    client_ud_t *ud = luaL_checkudata(L, -1, CLIENT_MT);
    nclient_t *c = ud->c;
    njs_t *j = calloc(1, sizeof(*j));
    j->client = c;
    j->entry = e;
    lua_getfield(L, -2, "subject");
    j->subject = strdup(lua_tostring(L, -1));
    lua_getfield(L, -3, "durable");
    j->durable = strdup(lua_tostring(L, -1));
    lua_getfield(L, -4, "stream");
    j->stream = lua_isstring(L, -1) ? strdup(lua_tostring(L, -1)) : NULL;
    lua_getfield(L, -5, "batch");
    lua_getfield(L, -6, "max_deliver");
    lua_getfield(L, -7, "nak_delay");
    lua_getfield(L, -8, "ack_wait");
    j->batch = lua_isnumber(L, -4) ? (int)lua_tointeger(L, -4) : 64;
    j->max_deliver = lua_isnumber(L, -3) ? (int64_t)lua_tointeger(L, -3) : 5;
    j->nak_delay = lua_isnumber(L, -2) ? lua_tonumber(L, -2) : 1.0;
    j->ack_wait = lua_isnumber(L, -1) ? lua_tonumber(L, -1) : 30.0;
    lua_pop(L, 10);
    uv_sem_init(&j->go, 0);
    j->next = c->jsubs;
    c->jsubs = j;
    e->impl = j;
    jsErrCode jerr = 0;
    natsStatus s = ensure_js(c);
    if (s == NATS_OK) {
        /* Create the durable explicitly: bound to an existing consumer, the
         * subscription never deletes it, so a restart resumes where it was. */
        jsConsumerConfig cc;
        jsConsumerConfig_Init(&cc);
        cc.Durable = j->durable;
        cc.AckPolicy = js_AckExplicit;
        cc.FilterSubject = j->subject;
        cc.MaxDeliver = j->max_deliver > 0 ? j->max_deliver + 1 : -1;
        /* A message delivered to an instance that died is redelivered after this. */
        cc.AckWait = (int64_t)(j->ack_wait * 1e9);
        jsConsumerInfo *ci = NULL;
        s = js_AddConsumer(&ci, c->js, j->stream, &cc, NULL, &jerr);
        if (ci) {
            jsConsumerInfo_Destroy(ci);
        }
        if (s != NATS_OK && js_GetConsumerInfo(&ci, c->js, j->stream, j->durable, NULL, NULL) == NATS_OK) {
            jsConsumerInfo_Destroy(ci);
            s = NATS_OK; /* it exists from a previous run */
        }
    }
    if (s == NATS_OK) {
        jsSubOptions so;
        jsSubOptions_Init(&so);
        so.Stream = j->stream;
        so.Consumer = j->durable;
        so.ManualAck = true;
        s = js_PullSubscribe(&j->sub, c->js, j->subject, j->durable, NULL, &so, &jerr);
    }
    if (s != NATS_OK) {
        return osara_err_set(OSARA_EBROKER, "nats: durable %s on %s: %s (JetStream error %d)",
                             j->durable, j->subject, natsStatus_GetText(s), (int)jerr);
    }
    if (uv_thread_create(&j->thread, njs_thread, j) == 0) {
        j->thread_started = 1;
    }
    return 0;
}

static void js_adopt(osara_reg_entry_t *e, osara_reg_entry_t *old)
{
    njs_t *j = old->impl;
    old->impl = NULL;
    j->entry = e;
    e->impl = j;
}

static void js_stop(osara_reg_entry_t *e)
{
    njs_t *j = e->impl;
    if (j) {
        j->entry = NULL;
        njs_stop_thread(j);
        e->impl = NULL;
    }
}

static const osara_reg_kind_t natsjs_kind = {
    .name = "nats-durable", .start = js_start, .adopt = js_adopt, .stop = js_stop,
};

/* client:stream{name=, subjects={...}, retention=, max_age=, max_msgs=,
 * storage=} -> true | raises: creates or updates (idempotent) */
static int l_client_stream(lua_State *L)
{
    nclient_t *c = osara__nats_check_client(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    jsStreamConfig sc;
    jsStreamConfig_Init(&sc);
    lua_getfield(L, 2, "name");
    sc.Name = luaL_checkstring(L, -1);
    lua_getfield(L, 2, "subjects");
    luaL_checktype(L, -1, LUA_TTABLE);
    int n = (int)lua_objlen(L, -1);
    const char *subjects[64];
    for (int i = 0; i < n && i < 64; i++) {
        lua_rawgeti(L, -1, i + 1);
        subjects[i] = lua_tostring(L, -1);
        lua_pop(L, 1);
    }
    sc.Subjects = subjects;
    sc.SubjectsLen = n < 64 ? n : 64;
    lua_getfield(L, 2, "retention");
    const char *ret = luaL_optstring(L, -1, "limits");
    sc.Retention = strcmp(ret, "workqueue") == 0 ? js_WorkQueuePolicy
                 : strcmp(ret, "interest") == 0 ? js_InterestPolicy : js_LimitsPolicy;
    lua_getfield(L, 2, "max_age");
    sc.MaxAge = (int64_t)(luaL_optnumber(L, -1, 0) * 1e9);
    lua_getfield(L, 2, "max_msgs");
    sc.MaxMsgs = (int64_t)luaL_optnumber(L, -1, -1);
    lua_getfield(L, 2, "storage");
    sc.Storage = strcmp(luaL_optstring(L, -1, "file"), "memory") == 0 ? js_MemoryStorage : js_FileStorage;
    natsStatus s = ensure_js(c);
    jsErrCode jerr = 0;
    jsStreamInfo *si = NULL;
    if (s == NATS_OK) {
        s = js_AddStream(&si, c->js, &sc, NULL, &jerr);
        if (s != NATS_OK && jerr == JSStreamNameExistErr) {
            s = js_UpdateStream(&si, c->js, &sc, NULL, &jerr);
        }
    }
    if (si) {
        jsStreamInfo_Destroy(si);
    }
    if (s != NATS_OK) {
        return luaL_error(L, "nats: stream %s: %s (JetStream error %d)", sc.Name,
                          natsStatus_GetText(s), (int)jerr);
    }
    lua_pushboolean(L, 1);
    return 1;
}

#define JSPUB_MT "osara.nats.jspub"

typedef struct {
    uv_work_t work;
    nclient_t *c;
    char *subject;
    char *data;
    int len;
    natsStatus status;
    jsErrCode jerr;
    uint64_t seq;
    int done, refs;
    osara_co_t *waiter;
    unsigned waiter_seq;
} jspub_t;

typedef struct {
    jspub_t *p;
} jspub_ud_t;

static void jspub_unref(jspub_t *p)
{
    if (--p->refs == 0) {
        free(p->subject);
        free(p->data);
        free(p);
    }
}

static void jspub_work(uv_work_t *w)
{
    jspub_t *p = w->data;
    jsPubAck *ack = NULL;
    p->status = js_Publish(&ack, p->c->js, p->subject, p->data, p->len, NULL, &p->jerr);
    if (ack) {
        p->seq = ack->Sequence;
        jsPubAck_Destroy(ack);
    }
}

static int jspub_push(lua_State *T, jspub_t *p)
{
    if (p->status != NATS_OK) {
        lua_pushnil(T);
        lua_pushfstring(T, "%s (JetStream error %d)", natsStatus_GetText(p->status), (int)p->jerr);
        return 2;
    }
    lua_pushnumber(T, (double)p->seq);
    return 1;
}

static void jspub_after(uv_work_t *w, int status)
{
    (void)status;
    jspub_t *p = w->data;
    p->done = 1;
    if (p->waiter && osara_co_waiting(p->waiter) && osara_co_seq(p->waiter) == p->waiter_seq) {
        osara_co_t *co = p->waiter;
        p->waiter = NULL;
        osara_sched_resume(co, jspub_push(osara_co_thread(co), p));
    }
    jspub_unref(p);
}

/* client:jspublish(subject, bytes) -> handle with :wait() -> seq | nil, err
 * Publishes in the thread pool (js_Publish waits for the stream's ack). */
static int l_client_jspublish(lua_State *L)
{
    nclient_t *c = osara__nats_check_client(L, 1);
    const char *subject = luaL_checkstring(L, 2);
    size_t len;
    const char *data = luaL_checklstring(L, 3, &len);
    if (ensure_js(c) != NATS_OK) {
        return luaL_error(L, "nats: JetStream is not available");
    }
    jspub_t *p = calloc(1, sizeof(*p));
    p->c = c;
    p->subject = strdup(subject);
    p->data = malloc(len ? len : 1);
    memcpy(p->data, data, len);
    p->len = (int)len;
    p->refs = 2;
    p->work.data = p;
    uv_queue_work(&c->w->loop, &p->work, jspub_work, jspub_after);
    jspub_ud_t *ud = lua_newuserdata(L, sizeof(*ud));
    ud->p = p;
    luaL_getmetatable(L, JSPUB_MT);
    lua_setmetatable(L, -2);
    return 1;
}

static void jspub_cleanup(void *data)
{
    ((jspub_t *)data)->waiter = NULL;
}

static int l_jspub_wait(lua_State *L)
{
    jspub_ud_t *ud = luaL_checkudata(L, 1, JSPUB_MT);
    jspub_t *p = ud->p;
    if (p->done) {
        return jspub_push(L, p);
    }
    osara_co_t *co = osara_sched_current(L);
    if (co == NULL) {
        return luaL_error(L, "nats: wait() only inside a handler, timer or task");
    }
    p->waiter = co;
    p->waiter_seq = osara_co_seq(co) + 1;
    return osara_sched_wait(L, 1, jspub_cleanup, p);
}

static int l_jspub_gc(lua_State *L)
{
    jspub_ud_t *ud = luaL_checkudata(L, 1, JSPUB_MT);
    if (ud->p) {
        ud->p->waiter = NULL;
        jspub_unref(ud->p);
        ud->p = NULL;
    }
    return 0;
}

void osara__nats_js_stop_threads(nclient_t *c)
{
    for (njs_t *j = c->jsubs; j; j = j->next) {
        njs_stop_thread(j);
    }
}

void osara__nats_js_free(nclient_t *c)
{
    while (c->jsubs) {
        njs_t *j = c->jsubs;
        c->jsubs = j->next;
        njs_free(j);
    }
}

void osara__nats_js_open(lua_State *L, int idx)
{
    osara_registry_kind(&natsjs_kind);
    luaL_newmetatable(L, JSPUB_MT);
    lua_pushcfunction(L, l_jspub_gc);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L);
    lua_pushcfunction(L, l_jspub_wait);
    lua_setfield(L, -2, "wait");
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    lua_pushcfunction(L, l_client_stream);
    lua_setfield(L, idx, "stream");
    lua_pushcfunction(L, l_client_jspublish);
    lua_setfield(L, idx, "jspublish");
}
