/* jetstream.c - JetStream: streams, durable pull consumers (registry kind
 * "nats-durable") and publish with the stream's ack. */
#include <lauxlib.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/err.h"
#include "core/log.h"
#include "core/lvm.h"
#include "core/mem.h"
#include "nats/natsio_int.h"

/* ---- durable pull consumers ------------------------------------------------ *
 * A fetch thread per consumer pulls a batch (natsSubscription_Fetch blocks,
 * so it never runs on the loop) and posts it to the loop, which pushes its
 * messages onto the consumer's unordered lane; the thread pulls the next
 * batch once every message of this one settled: in flight is bounded by
 * the batch size. The handler's runner (lua/osara/nats.lua, where the
 * failure policy decides) names the settle: ack, nak with its delay
 * (redelivered: msg.attempt is the delivery count) or term (the failure
 * was taken: never redelivered). A consumer is freed with its
 * last reference: the registry entry, the fetch thread (until joined, in the
 * thread pool) and each message on the lane. */

typedef struct njs_s {
    struct njs_s *next;
    nclient_t *client;
    natsSubscription *sub;
    char *subject, *durable, *stream;
    int batch;
    double ack_wait;
    osara_lane_t lane;
    uv_thread_t thread;
    uv_sem_t go;
    atomic_int stop;
    int joining;                /* the join job was queued */
    int deferred;               /* a pump waits in the inbox */
    int pending;                /* messages of the current batch not yet settled */
    int refs;                   /* loop thread only */
} njs_t;

typedef enum { JS_ACK, JS_NAK, JS_TERM } njs_outcome_t;

/* A JetStream message on a lane. */
typedef struct {
    osara_delivery_t d; /* first: the lane hands it back */
    natsMsg *msg;
    lua_State *T;       /* the handler's thread: its result names the outcome */
    njs_outcome_t outcome;
    double nak_delay;   /* seconds, with JS_NAK */
} njsmsg_t;

/* A nak after a runner that raised (its dead letter was not stored): come
 * back after this long, not at once. */
#define NAK_AFTER_ERROR_S 1.0

typedef struct {
    njs_t *j;
    natsMsg **msgs;
    int count;
} njs_batch_t;

/* An inbox event too (osara__nats_dispose). */
static void njs_free(void *arg, void *unused)
{
    (void)unused;
    njs_t *j = arg;
    if (j->sub) {
        natsSubscription_Destroy(j->sub);
    }
    uv_sem_destroy(&j->go);
    free(j->subject);
    free(j->durable);
    free(j->stream);
    osara__nats_client_unref(j->client);
    free(j);
}

/* Drops a reference; inside settle the free waits for the inbox (the lane
 * is still touched afterwards). */
static void njs_unref(njs_t *j, int inline_free)
{
    if (--j->refs > 0) {
        return;
    }
    osara__nats_dispose(&j->client->w->inbox, njs_free, j, inline_free);
}

/* Tells the server; a failed ack/nak/term is logged: the server then
 * redelivers the message after ack_wait. (A term was logged by the
 * failure policy, which took the failure first.) */
static void njs_tell(njs_t *j, natsMsg *msg, njs_outcome_t outcome, double nak_delay)
{
    natsStatus s;
    const char *verb;
    if (outcome == JS_ACK) {
        verb = "ack";
        s = natsMsg_Ack(msg, NULL);
        osara_metric_add(osara__nats_m.acked, 1);
    } else if (outcome == JS_TERM) {
        verb = "term";
        s = natsMsg_Term(msg, NULL);
        osara_metric_add(osara__nats_m.termed, 1);
    } else {
        verb = "nak";
        s = natsMsg_NakWithDelay(msg, (int64_t)(nak_delay * 1000), NULL);
        osara_metric_add(osara__nats_m.naked, 1);
    }
    if (s != NATS_OK) {
        OSARA_WARN("nats %s (durable %s): %s failed: %s (redelivered after ack_wait)",
                   j->subject, j->durable, verb, natsStatus_GetText(s));
    }
}

/* Adds attempt (the delivery count), seq and stream to the message on T. */
static void push_metadata(lua_State *T, natsMsg *msg)
{
    jsMsgMetaData *meta = NULL;
    if (natsMsg_GetMetaData(&meta, msg) != NATS_OK) {
        return;
    }
    lua_pushinteger(T, (lua_Integer)meta->NumDelivered);
    lua_setfield(T, -2, "attempt");
    lua_pushnumber(T, (lua_Number)meta->Sequence.Stream);
    lua_setfield(T, -2, "seq");
    lua_pushstring(T, meta->Stream);
    lua_setfield(T, -2, "stream");
    jsMsgMetaData_Destroy(meta);
}

static void njs_tp_push(lua_State *T, osara_delivery_t *d)
{
    njsmsg_t *m = (njsmsg_t *)d;
    m->T = T;
    osara__nats_push_msg(T, m->msg);
    push_metadata(T, m->msg);
}

/* The runner returns "ok", "nak", delay or "term" (lua/osara/nats.lua);
 * one that raised leaves the message to come back. */
static void njs_tp_finished(osara_delivery_t *d, int ok)
{
    njsmsg_t *m = (njsmsg_t *)d;
    const char *r = ok && lua_isstring(m->T, 1) ? lua_tostring(m->T, 1) : "nak";
    m->outcome = strcmp(r, "ok") == 0 ? JS_ACK : strcmp(r, "term") == 0 ? JS_TERM : JS_NAK;
    m->nak_delay = ok && lua_isnumber(m->T, 2) ? lua_tonumber(m->T, 2) : NAK_AFTER_ERROR_S;
    m->T = NULL;
}

static void njs_tp_settle(osara_delivery_t *d, osara_settle_t how)
{
    njsmsg_t *m = (njsmsg_t *)d;
    njs_t *j = d->lane->owner;
    /* A failed output: consumed again later; a cancelled handler (a
     * reload's grace, shutdown): at once, by whoever serves it next. */
    if (how == OSARA_SETTLE_ACK) {
        njs_tell(j, m->msg, m->outcome, m->nak_delay);
    } else {
        njs_tell(j, m->msg, JS_NAK, how == OSARA_SETTLE_CANCELLED ? 0 : NAK_AFTER_ERROR_S);
    }
    natsMsg_Destroy(m->msg);
    free(m);
    if (--j->pending == 0) {
        uv_sem_post(&j->go); /* the fetch thread may pull the next batch */
    }
    njs_unref(j, 0);
}

static void njs_pump_deferred(void *arg, void *unused)
{
    (void)unused;
    njs_t *j = arg;
    j->deferred = 0;
    osara_lane_pump(&j->lane);
    njs_unref(j, 1);
}

/* The lane used its share of the loop turn: the rest on the next turn. */
static void njs_tp_defer(osara_lane_t *lane)
{
    njs_t *j = lane->owner;
    if (j->deferred || j->lane.stopped) {
        return;
    }
    j->deferred = 1;
    j->refs++; /* the event's */
    if (osara_inbox_post(&j->client->w->inbox, njs_pump_deferred, j, NULL) != 0) {
        j->deferred = 0;
        njs_unref(j, 0);
    }
}

static const osara_transport_t js_transport = {
    .name = "nats",
    .push_message = njs_tp_push,
    .finished = njs_tp_finished,
    .settle = njs_tp_settle,
    .defer = njs_tp_defer,
};

static void njs_deliver(void *arg, void *unused)
{
    (void)unused;
    njs_batch_t *b = arg;
    njs_t *j = b->j;
    j->pending = b->count;
    j->refs += b->count;
    for (int i = 0; i < b->count; i++) {
        njsmsg_t *m = osara_xcalloc(1, sizeof(*m));
        m->msg = b->msgs[i];
        osara_metric_add(osara__nats_m.received, 1);
        /* A stopped lane settles it at once (nak: redelivered later). */
        osara_lane_push(&j->lane, &m->d);
    }
    free(b->msgs);
    free(b);
    if (j->lane.stopped) {
        osara_lane_stop(&j->lane);
    }
}

static int njs_post_batch(njs_t *j, natsMsgList *list)
{
    njs_batch_t *b = osara_xmalloc(sizeof(*b));
    b->j = j;
    b->count = list->Count;
    b->msgs = list->Msgs;
    list->Msgs = NULL;
    list->Count = 0;
    if (osara_inbox_post(&j->client->w->inbox, njs_deliver, b, NULL) != 0) {
        for (int i = 0; i < b->count; i++) {
            natsMsg_Destroy(b->msgs[i]);
        }
        free(b->msgs);
        free(b);
        return -1;
    }
    return 0;
}

/* Creates the durable explicitly: bound to an existing consumer, the
 * subscription never deletes it, so a restart resumes where it was. */
static natsStatus njs_subscribe(njs_t *j, jsErrCode *jerr)
{
    nclient_t *c = j->client;
    natsStatus s = NATS_OK;
    {
        jsConsumerConfig cc;
        jsConsumerConfig_Init(&cc);
        cc.Durable = j->durable;
        cc.AckPolicy = js_AckExplicit;
        cc.FilterSubject = j->subject;
        /* Unlimited: the failure policy counts the attempts and terms the
         * last; a message whose dead letter was not stored comes back. */
        cc.MaxDeliver = -1;
        /* A message delivered to an instance that died is redelivered after this. */
        cc.AckWait = (int64_t)(j->ack_wait * 1e9);
        jsConsumerInfo *ci = NULL;
        s = js_AddConsumer(&ci, c->js, j->stream, &cc, NULL, jerr);
        if (ci) {
            jsConsumerInfo_Destroy(ci);
            ci = NULL;
        }
        if (s != NATS_OK &&
            js_GetConsumerInfo(&ci, c->js, j->stream, j->durable, NULL, NULL) == NATS_OK) {
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
        s = js_PullSubscribe(&j->sub, c->js, j->subject, j->durable, NULL, &so, jerr);
    }
    return s;
}

#define BIND_RETRY_MS 1000
#define BIND_WARN_EVERY 30

/* Fetch thread: creates the durable and binds its pull subscription (the
 * JetStream API round trips never run on the loop), trying again every
 * second while the stream or the server is not there yet (add_stream runs
 * in the background too), with a warning at the first failure and every
 * 30 s. Returns 0 when bound, -1 once stopped. */
static int njs_bind(njs_t *j)
{
    for (int tries = 0; !atomic_load(&j->stop); tries++) {
        jsErrCode jerr = 0;
        natsStatus s = njs_subscribe(j, &jerr);
        if (s == NATS_OK) {
            OSARA_INFO("nats: durable %s bound to stream %s (%s)", j->durable,
                       j->stream ? j->stream : "?", j->subject);
            return 0;
        }
        if (tries % BIND_WARN_EVERY == 0) {
            OSARA_WARN("nats: durable %s on %s: %s (JetStream error %d); trying again every "
                       "second", j->durable, j->subject, natsStatus_GetText(s), (int)jerr);
        }
        for (int ms = 0; ms < BIND_RETRY_MS && !atomic_load(&j->stop); ms += 50) {
            nats_Sleep(50);
        }
    }
    return -1;
}

static void njs_thread(void *arg)
{
    njs_t *j = arg;
    if (njs_bind(j) != 0) {
        return;
    }
    while (!atomic_load(&j->stop)) {
        natsMsgList list = {0};
        natsStatus s = natsSubscription_Fetch(&list, j->sub, j->batch, 500, NULL);
        if (s == NATS_OK && list.Count > 0) {
            if (njs_post_batch(j, &list) != 0) {
                break;
            }
            uv_sem_wait(&j->go);
        } else {
            natsMsgList_Destroy(&list);
            if (s != NATS_TIMEOUT && !atomic_load(&j->stop)) {
                usleep(100000); /* disconnected: nats.c reconnects meanwhile */
            }
        }
    }
}

typedef struct {
    uv_work_t work;
    njs_t *j;
} njs_join_t;

static void njs_join_work(uv_work_t *work)
{
    uv_thread_join(&((njs_join_t *)work->data)->j->thread);
}

static void njs_join_after(uv_work_t *work, int status)
{
    (void)status;
    njs_join_t *jw = work->data;
    njs_t *j = jw->j;
    free(jw);
    osara__nats_job_end(j->client); /* j holds the client */
    njs_unref(j, 1);                /* the thread's */
}

/* Stops delivering and lets the fetch thread end; it is joined in the
 * thread pool (a fetch may wait up to 500 ms). */
static void njs_stop(njs_t *j)
{
    if (j->joining) {
        return;
    }
    j->joining = 1;
    osara_lane_set_entry(&j->lane, NULL);
    osara_lane_stop(&j->lane);
    atomic_store(&j->stop, 1);
    uv_sem_post(&j->go);
    njs_join_t *jw = osara_xcalloc(1, sizeof(*jw));
    jw->j = j;
    jw->work.data = jw;
    osara__nats_job_begin(j->client);
    if (uv_queue_work(&j->client->w->loop, &jw->work, njs_join_work, njs_join_after) != 0) {
        njs_join_work(&jw->work);
        njs_join_after(&jw->work, 0);
    }
}

static natsStatus ensure_js(nclient_t *c)
{
    if (c->js) {
        return NATS_OK;
    }
    return natsConnection_JetStream(&c->js, c->nc, NULL);
}

static njs_t *njs_new(nclient_t *c, lua_State *L, int opts)
{
    njs_t *j = osara_xcalloc(1, sizeof(*j));
    j->client = c;
    osara__nats_client_ref(c);
    lua_getfield(L, opts, "subject");
    lua_getfield(L, opts, "durable");
    lua_getfield(L, opts, "stream"); /* [subject, durable, stream] */
    j->subject = osara_xstrdup(lua_tostring(L, -3));
    j->durable = osara_xstrdup(lua_tostring(L, -2));
    j->stream = lua_isstring(L, -1) ? osara_xstrdup(lua_tostring(L, -1)) : NULL;
    lua_getfield(L, opts, "batch");
    lua_getfield(L, opts, "ack_wait");
    j->batch = lua_isnumber(L, -2) ? (int)lua_tointeger(L, -2) : 64;
    j->ack_wait = lua_isnumber(L, -1) ? lua_tonumber(L, -1) : 30.0;
    lua_pop(L, 5);
    osara_lane_init(&j->lane, &js_transport, j, j->subject, 0, j->batch, j->batch);
    uv_sem_init(&j->go, 0);
    j->refs = 1; /* the registry entry's */
    return j;
}

static int js_start(osara_reg_entry_t *e)
{
    nclient_t *c = osara__nats_entry_client(e); /* [opts] */
    if (c == NULL) {
        return OSARA_EBROKER;
    }
    lua_State *L = e->vm->L;
    njs_t *j = njs_new(c, L, lua_gettop(L));
    lua_pop(L, 1);
    natsStatus s = ensure_js(c); /* no I/O: a context */
    if (s != NATS_OK) {
        osara_err_set(OSARA_EBROKER, "nats: durable %s: %s", j->durable, natsStatus_GetText(s));
        njs_unref(j, 1);
        return OSARA_EBROKER;
    }
    int rc = uv_thread_create(&j->thread, njs_thread, j);
    if (rc != 0) {
        osara_err_set(OSARA_EBROKER, "nats: durable %s: cannot start its fetch thread: %s",
                      j->durable, uv_strerror(rc));
        njs_unref(j, 1);
        return OSARA_EBROKER;
    }
    j->refs++; /* the thread's, until joined */
    j->next = c->jsubs;
    c->jsubs = j;
    e->impl = j;
    osara_lane_set_entry(&j->lane, e);
    return 0;
}

static void js_adopt(osara_reg_entry_t *e, osara_reg_entry_t *old)
{
    osara__nats_adopt(e, old, offsetof(njs_t, lane));
}

static void njs_unlink(njs_t *j)
{
    for (njs_t **p = &j->client->jsubs; *p; p = &(*p)->next) {
        if (*p == j) {
            *p = j->next;
            return;
        }
    }
}

static void js_stop(osara_reg_entry_t *e)
{
    njs_t *j = e->impl;
    if (j == NULL) {
        return;
    }
    e->impl = NULL;
    njs_stop(j);
    njs_unlink(j);
    njs_unref(j, 1);
}

static const osara_reg_kind_t natsjs_kind = {
    .name = "nats-durable", .start = js_start, .adopt = js_adopt, .stop = js_stop,
};

/* ---- streams, created off the loop ---------------------------------------- *
 * add_stream's JetStream round trips run on a thread of their own, which
 * posts the outcome to the inbox. At load nothing waits: the outcome is
 * logged, and while the server (or its JetStream) is not there yet the
 * thread tries again every second (a durable consumer on the stream binds
 * once it exists). Inside a coroutine the caller waits for one try. */

#define STREAM_RETRY_MS 1000
#define STREAM_WARN_EVERY 30

typedef struct {
    nclient_t *c;       /* a client job: the teardown waits for the thread */
    uv_thread_t thread;
    char *name;
    char **subjects;
    int nsubjects;
    jsRetentionPolicy retention;
    jsStorageType storage;
    int64_t max_age, max_msgs;
    int retry;          /* at load: try again while the server is not there */
    natsStatus status;
    jsErrCode jerr;
    osara_co_t *co;     /* the waiter; NULL at load or once cancelled */
    unsigned seq;
} nstream_t;

static void nstream_free(nstream_t *st)
{
    for (int i = 0; i < st->nsubjects; i++) {
        free(st->subjects[i]);
    }
    free(st->subjects);
    free(st->name);
    free(st);
}

/* Thread: one add (or update, when the stream exists) round trip. */
static natsStatus nstream_try(nstream_t *st, jsErrCode *jerr)
{
    jsStreamConfig sc;
    jsStreamConfig_Init(&sc);
    sc.Name = st->name;
    sc.Subjects = (const char **)st->subjects;
    sc.SubjectsLen = st->nsubjects;
    sc.Retention = st->retention;
    sc.Storage = st->storage;
    sc.MaxAge = st->max_age;
    sc.MaxMsgs = st->max_msgs;
    jsStreamInfo *si = NULL;
    natsStatus s = js_AddStream(&si, st->c->js, &sc, NULL, jerr);
    if (s != NATS_OK && *jerr == JSStreamNameExistErr) {
        s = js_UpdateStream(&si, st->c->js, &sc, NULL, jerr);
    }
    if (si) {
        jsStreamInfo_Destroy(si);
    }
    return s;
}

/* The server, or its JetStream, is not there yet. */
static int transient(natsStatus s)
{
    return s == NATS_NOT_YET_CONNECTED || s == NATS_CONNECTION_DISCONNECTED ||
           s == NATS_TIMEOUT || s == NATS_NO_RESPONDERS;
}

static int push_stream_result(lua_State *T, nstream_t *st)
{
    if (st->status != NATS_OK) {
        lua_pushnil(T);
        lua_pushfstring(T, "nats: stream %s: %s (JetStream error %d)", st->name,
                        natsStatus_GetText(st->status), (int)st->jerr);
        return 2;
    }
    lua_pushboolean(T, 1);
    return 1;
}

static void jspubs_release(nclient_t *c);

/* Loop: the thread finished. */
static void nstream_done(void *arg, void *unused)
{
    (void)unused;
    nstream_t *st = arg;
    uv_thread_join(&st->thread);
    if (st->co) {
        if (osara_co_waiting(st->co) && osara_co_seq(st->co) == st->seq) {
            osara_sched_resume(st->co, push_stream_result(osara_co_thread(st->co), st));
        }
    } else if (st->status == NATS_OK) {
        OSARA_INFO("nats: stream %s ready", st->name);
    } else if (!st->c->closing) {
        OSARA_ERROR("nats: stream %s: %s (JetStream error %d)", st->name,
                    natsStatus_GetText(st->status), (int)st->jerr);
    }
    nclient_t *c = st->c;
    nstream_free(st);
    if (--c->streams_pending == 0) {
        jspubs_release(c);
    }
    osara__nats_job_end(c);
}

static void nstream_thread(void *arg)
{
    nstream_t *st = arg;
    for (int tries = 0;; tries++) {
        st->jerr = 0;
        st->status = nstream_try(st, &st->jerr);
        if (!st->retry || !transient(st->status) || st->c->closing) {
            break;
        }
        if (tries % STREAM_WARN_EVERY == 0) {
            OSARA_WARN("nats: stream %s: %s; trying again every second", st->name,
                       natsStatus_GetText(st->status));
        }
        for (int ms = 0; ms < STREAM_RETRY_MS && !st->c->closing; ms += 50) {
            nats_Sleep(50);
        }
    }
    /* Failing, the inbox is closed: the loop is gone with the process. */
    osara_inbox_post(&st->c->w->inbox, nstream_done, st, NULL);
}

static void nstream_cleanup(void *data)
{
    ((nstream_t *)data)->co = NULL;
}

/* Reads the stream's configuration from the table at 2 (raises on misuse). */
static nstream_t *nstream_new(lua_State *L, nclient_t *c)
{
    lua_getfield(L, 2, "name");
    const char *name = luaL_checkstring(L, -1);
    lua_getfield(L, 2, "subjects");
    luaL_checktype(L, -1, LUA_TTABLE);
    int n = (int)lua_objlen(L, -1);
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, -1, i);
        if (lua_type(L, -1) != LUA_TSTRING) {
            luaL_error(L, "nats: stream %s: subjects[%d] is not a string", name, i);
        }
        lua_pop(L, 1);
    }
    lua_getfield(L, 2, "retention");
    lua_getfield(L, 2, "max_age");
    lua_getfield(L, 2, "max_msgs");
    lua_getfield(L, 2, "storage"); /* [name, subjects, retention, max_age, max_msgs, storage] */
    const char *ret = luaL_optstring(L, -4, "limits");
    nstream_t *st = osara_xcalloc(1, sizeof(*st));
    st->c = c;
    st->name = osara_xstrdup(name);
    st->retention = strcmp(ret, "workqueue") == 0  ? js_WorkQueuePolicy
                    : strcmp(ret, "interest") == 0 ? js_InterestPolicy
                                                   : js_LimitsPolicy;
    st->max_age = (int64_t)(luaL_optnumber(L, -3, 0) * 1e9);
    st->max_msgs = (int64_t)luaL_optnumber(L, -2, -1);
    st->storage = strcmp(luaL_optstring(L, -1, "file"), "memory") == 0 ? js_MemoryStorage
                                                                       : js_FileStorage;
    st->subjects = osara_xcalloc((size_t)(n ? n : 1), sizeof(*st->subjects));
    st->nsubjects = n;
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, -5, i + 1);
        st->subjects[i] = osara_xstrdup(lua_tostring(L, -1));
        lua_pop(L, 1);
    }
    lua_pop(L, 6);
    return st;
}

/* client:stream{name=, subjects={...}, retention=, max_age=, max_msgs=,
 * storage=}: creates or updates the stream (idempotent) off the loop.
 * Inside a coroutine -> true | nil, err once done; at load -> true at once
 * (the outcome is logged; retried while the server is not there yet). */
static int l_client_stream(lua_State *L)
{
    nclient_t *c = osara__nats_check_client(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    if (c->closing) {
        return luaL_error(L, "nats: stream: the client is closed");
    }
    if (ensure_js(c) != NATS_OK) {
        return luaL_error(L, "nats: JetStream is not available");
    }
    nstream_t *st = nstream_new(L, c);
    st->co = osara_sched_current(L);
    st->retry = st->co == NULL;
    st->seq = st->co ? osara_co_seq(st->co) + 1 : 0;
    osara__nats_job_begin(c);
    c->streams_pending++;
    int rc = uv_thread_create(&st->thread, nstream_thread, st);
    if (rc != 0) {
        c->streams_pending--;
        osara__nats_job_end(c);
        nstream_free(st);
        return luaL_error(L, "nats: stream: cannot start a thread: %s", uv_strerror(rc));
    }
    if (st->co == NULL) {
        lua_pushboolean(L, 1);
        return 1;
    }
    return osara_sched_wait(L, 1, nstream_cleanup, st);
}

#define JSPUB_MT "osara.nats.jspub"

/* A publish waiting for the stream's ack: a future held by the Lua handle
 * and by the thread-pool job. */
typedef struct njspub_s {
    osara_sched_future_t f; /* first: the future's free finds it */
    struct njspub_s *next;  /* waiting for the client's add_streams */
    uv_work_t work;
    nclient_t *c;
    natsMsg *msg;
    natsStatus status;
    jsErrCode jerr;
    uint64_t seq;
} jspub_t;

typedef struct {
    jspub_t *p;
} jspub_ud_t;

static void jspub_free(osara_sched_future_t *f)
{
    jspub_t *p = (jspub_t *)f;
    natsMsg_Destroy(p->msg);
    free(p);
}

static void jspub_work(uv_work_t *w)
{
    jspub_t *p = w->data;
    jsPubAck *ack = NULL;
    p->status = js_PublishMsg(&ack, p->c->js, p->msg, NULL, &p->jerr);
    if (ack) {
        p->seq = ack->Sequence;
        jsPubAck_Destroy(ack);
    }
}

static int jspub_push(lua_State *T, void *ud)
{
    jspub_t *p = ud;
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
    osara__nats_job_end(p->c);
    if (p->status != NATS_OK) {
        osara_metric_add(osara__nats_m.js_publish_failed, 1);
    }
    osara_sched_future_complete(&p->f, jspub_push, p);
    osara_sched_future_unref(&p->f); /* the job's */
}

/* The message of jspublish's arguments (headers at 4, optional). */
static natsStatus jspub_msg(lua_State *L, natsMsg **msg)
{
    size_t len;
    const char *data = lua_tolstring(L, 3, &len);
    natsStatus s = natsMsg_Create(msg, lua_tostring(L, 2), NULL, data, (int)len);
    if (s == NATS_OK && lua_istable(L, 4)) {
        s = osara__nats_add_headers(L, 4, *msg);
    }
    return s;
}

static void jspub_queue(jspub_t *p)
{
    int rc = uv_queue_work(&p->c->w->loop, &p->work, jspub_work, jspub_after);
    if (rc != 0) {
        p->status = NATS_ERR;
        jspub_after(&p->work, rc);
    }
}

/* The client's add_streams are done: the publishes made meanwhile go (so
 * a publish right after add_stream at load finds its stream). */
static void jspubs_release(nclient_t *c)
{
    jspub_t *p = NULL;
    while (c->jspubs_waiting) { /* pushed last first: in order again */
        jspub_t *next = c->jspubs_waiting->next;
        c->jspubs_waiting->next = p;
        p = c->jspubs_waiting;
        c->jspubs_waiting = next;
    }
    while (p) {
        jspub_t *next = p->next;
        jspub_queue(p);
        p = next;
    }
}

/* client:jspublish(subject, bytes, headers|nil) -> handle with :wait() ->
 * seq | nil, err. Publishes in the thread pool (js_PublishMsg waits for the
 * stream's ack). */
static int l_client_jspublish(lua_State *L)
{
    nclient_t *c = osara__nats_check_client(L, 1);
    luaL_checkstring(L, 2);
    luaL_checkstring(L, 3);
    if (!c->closing && ensure_js(c) != NATS_OK) {
        return luaL_error(L, "nats: JetStream is not available");
    }
    jspub_t *p = osara_xcalloc(1, sizeof(*p));
    osara_sched_future_init(&p->f, jspub_free); /* the handle's reference */
    p->c = c;
    p->status = c->closing ? NATS_CONNECTION_CLOSED : jspub_msg(L, &p->msg);
    if (p->status == NATS_OK) {
        p->work.data = p;
        osara__nats_job_begin(c);
        osara_sched_future_ref(&p->f); /* the job's */
        if (c->streams_pending > 0) {
            p->next = c->jspubs_waiting;
            c->jspubs_waiting = p;
        } else {
            jspub_queue(p);
        }
    } else {
        /* :wait() returns nil, "Connection Closed ..." */
        osara_sched_future_complete(&p->f, jspub_push, p);
    }
    jspub_ud_t *ud = lua_newuserdata(L, sizeof(*ud));
    ud->p = p;
    luaL_getmetatable(L, JSPUB_MT);
    lua_setmetatable(L, -2);
    return 1;
}

/* handle:wait() -> seq | nil, err (js_Publish's own timeout bounds it) */
static int l_jspub_wait(lua_State *L)
{
    jspub_ud_t *ud = luaL_checkudata(L, 1, JSPUB_MT);
    return osara_sched_future_wait(L, &ud->p->f, 1, -1);
}

static int l_jspub_gc(lua_State *L)
{
    jspub_ud_t *ud = luaL_checkudata(L, 1, JSPUB_MT);
    if (ud->p) {
        osara_sched_future_unref(&ud->p->f);
        ud->p = NULL;
    }
    return 0;
}

void osara__nats_js_stop(nclient_t *c)
{
    for (njs_t *j = c->jsubs; j; j = j->next) {
        njs_stop(j);
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
