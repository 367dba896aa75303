/* client.c - the loop side of an AMQP client: its life, the commands it
 * sends the connection thread, the events the thread posts back, and the
 * consumers (registry kind "amqp") on transport lanes. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "amqp/amqp_int.h"
#include "core/err.h"
#include "core/log.h"
#include "core/lvm.h"
#include "core/mem.h"

osara__amqp_metrics_t osara__amqp_m;

static uv_once_t metrics_once = UV_ONCE_INIT;

static void metrics_create(void)
{
    osara__amqp_metrics_t *m = &osara__amqp_m;
    m->received = osara_metrics_counter("osara_amqp_received_total", "messages delivered", NULL);
    m->handled = osara_metrics_counter("osara_amqp_handled_total", "handler calls finished", NULL);
    m->failed = osara_metrics_counter("osara_amqp_failed_total", "handler calls cancelled", NULL);
    m->acked = osara_metrics_counter("osara_amqp_acked_total", "messages acknowledged", NULL);
    m->requeued = osara_metrics_counter("osara_amqp_requeued_total",
                                        "messages given back to their queue", NULL);
    m->published = osara_metrics_counter("osara_amqp_published_total",
                                         "publishes the broker confirmed", NULL);
    m->publish_failed = osara_metrics_counter("osara_amqp_publish_failed_total",
                                              "publishes refused or lost with the client", NULL);
    m->disconnects = osara_metrics_counter("osara_amqp_disconnects_total", "connections lost",
                                           NULL);
    m->reconnects = osara_metrics_counter("osara_amqp_reconnects_total", "reconnections", NULL);
}

void osara__amqp_metrics_init(void)
{
    uv_once(&metrics_once, metrics_create);
}

/* ---- client --------------------------------------------------------------- */

void osara__amqp_client_ref(aclient_t *c)
{
    atomic_fetch_add(&c->refs, 1);
}

void osara__amqp_client_unref(aclient_t *c)
{
    if (atomic_fetch_sub(&c->refs, 1) != 1) {
        return;
    }
    uv_mutex_destroy(&c->mu);
    close(c->efd);
    free(c->url);
    free(c->url_full);
    free(c);
}

/* "amqp://user:secret@host/" -> "amqp://user:***@host/" for logs. */
static char *hide_password(const char *url)
{
    char *s = osara_xstrdup(url);
    char *scheme = strstr(s, "://");
    char *at = strrchr(s, '@');
    char *colon = scheme ? strchr(scheme + 3, ':') : NULL;
    if (at && colon && colon < at) {
        size_t tail = strlen(at) + 1;
        memmove(colon + 4, at, tail);
        memcpy(colon, ":***", 4);
    }
    return s;
}

aclient_t *osara__amqp_client_new(osara_worker_t *w, const char *url, int prefetch)
{
    struct amqp_connection_info ci;
    char *check = osara_xstrdup(url);
    int bad = amqp_parse_url(check, &ci) != AMQP_STATUS_OK;
    int tls = !bad && ci.ssl;
    free(check);
    if (tls) {
        osara_err_set(OSARA_EINVAL, "amqp: %s: amqps:// (TLS) is not supported yet", url);
        return NULL;
    }
    if (bad) {
        osara_err_set(OSARA_EINVAL, "amqp: invalid URL %s (amqp://user:password@host:port/vhost)",
                      url);
        return NULL;
    }
    aclient_t *c = osara_xcalloc(1, sizeof(*c));
    c->w = w;
    c->url_full = osara_xstrdup(url);
    c->url = hide_password(url);
    c->prefetch = prefetch;
    c->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    uv_mutex_init(&c->mu);
    atomic_init(&c->refs, 2); /* the caller's and the thread's */
    if (c->efd < 0 || uv_thread_create(&c->thread, osara__amqp_thread, c) != 0) {
        osara_err_set(OSARA_EBROKER, "amqp: cannot start the connection thread");
        atomic_store(&c->refs, 1);
        osara__amqp_client_unref(c);
        return NULL;
    }
    return c;
}

void osara__amqp_command(aclient_t *c, acmd_t *cmd)
{
    cmd->next = NULL;
    uv_mutex_lock(&c->mu);
    int was_empty = c->cmds_tail == NULL;
    if (c->cmds_tail) {
        c->cmds_tail->next = cmd;
    } else {
        c->cmds = cmd;
    }
    c->cmds_tail = cmd;
    uv_mutex_unlock(&c->mu);
    /* One wake-up per batch: a queue that was not empty has a wake-up
     * pending (the thread clears the eventfd before taking the queue). */
    if (was_empty) {
        uint64_t one = 1;
        ssize_t r = write(c->efd, &one, sizeof(one));
        (void)r; /* EAGAIN: the counter is already set, the thread wakes */
    }
}

static void join_work(uv_work_t *work)
{
    aclient_t *c = work->data;
    uv_thread_join(&c->thread);
}

static void join_after(uv_work_t *work, int status)
{
    (void)status;
    osara__amqp_client_unref(work->data); /* the thread's */
}

static void sub_stop(asub_t *sub);

void osara__amqp_client_close(void *ptr)
{
    aclient_t *c = ptr;
    atomic_store(&c->closing, 1);
    for (asub_t *sub = c->subs; sub; sub = sub->next) {
        sub_stop(sub);
    }
    uint64_t one = 1;
    ssize_t r = write(c->efd, &one, sizeof(one));
    (void)r;
    /* The thread may be inside a blocking connect: join it off the loop. */
    c->join.data = c;
    if (uv_queue_work(&c->w->loop, &c->join, join_work, join_after) != 0) {
        uv_thread_join(&c->thread);
        osara__amqp_client_unref(c);
    }
    osara__amqp_client_unref(c); /* the shared resource's */
}

void osara__amqp_retry_name(const char *q, size_t n, char *buf, size_t size)
{
    if (n >= 4 && memcmp(q, "amq.", 4) == 0) {
        snprintf(buf, size, "osara.retry.%.*s", (int)n, q);
    } else {
        snprintf(buf, size, "%.*s.retry", (int)n, q);
    }
}

/* ---- publish records -------------------------------------------------------- */

static void pub_future_free(osara_sched_future_t *f)
{
    osara__amqp_pub_free((apub_t *)f);
}

void osara__amqp_pub_free(apub_t *p)
{
    free(p->exchange);
    free(p->routing_key);
    free(p->declare_type);
    amqp_bytes_free(p->body);
    empty_amqp_pool(&p->pool);
    free(p);
}

apub_t *osara__amqp_pub_new(aclient_t *c)
{
    apub_t *p = osara_xcalloc(1, sizeof(*p));
    osara_sched_future_init(&p->f, pub_future_free); /* the confirm's reference */
    init_amqp_pool(&p->pool, 512);
    p->c = c;
    return p;
}

void osara__amqp_publish(aclient_t *c, apub_t *p)
{
    acmd_t *cmd = osara_xcalloc(1, sizeof(*cmd));
    cmd->type = CMD_PUBLISH;
    cmd->pub = p;
    osara__amqp_command(c, cmd);
}

static int push_confirm(lua_State *L, void *ud)
{
    apub_t *p = ud;
    if (!p->ok) {
        lua_pushnil(L);
        lua_pushstring(L, p->err);
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

static void confirmed_event(void *arg, void *arg2)
{
    aclient_t *c = arg;
    apub_t *p = arg2;
    osara_metric_add(p->ok ? osara__amqp_m.published : osara__amqp_m.publish_failed, 1);
    if (!p->ok && !atomic_load(&c->closing)) {
        OSARA_ERROR("amqp: publish to %s%s%s not confirmed: %s", p->exchange[0] ? p->exchange : "",
                    p->exchange[0] ? " " : "(default exchange) ", p->routing_key, p->err);
    }
    if (p->d) { /* the input waits for its outputs */
        osara_delivery_output_end(p->d, p->ok);
        p->d = NULL;
    }
    osara_sched_future_complete(&p->f, push_confirm, p);
    osara_sched_future_unref(&p->f);
    osara__amqp_client_unref(c);
}

/* ---- events from the thread ----------------------------------------------------- */

/* Posts fn(c, obj) to the loop, holding c for the event. 0, or -1 when
 * the loop is gone (the caller frees obj). */
static int post(aclient_t *c, osara_inbox_fn fn, void *obj)
{
    osara__amqp_client_ref(c);
    if (osara_inbox_post(&c->w->inbox, fn, c, obj) != 0) {
        osara__amqp_client_unref(c);
        return -1;
    }
    return 0;
}

void osara__amqp_on_confirmed(aclient_t *c, apub_t *p)
{
    if (post(c, confirmed_event, p) != 0) {
        osara__amqp_pub_free(p);
    }
}

typedef struct {
    int id;
    char text[256];
    int failed;
} cons_note_t;

static asub_t *sub_find(aclient_t *c, int id)
{
    for (asub_t *sub = c->subs; sub; sub = sub->next) {
        if (sub->id == id) {
            return sub;
        }
    }
    return NULL;
}

static void cons_note_event(void *arg, void *arg2)
{
    aclient_t *c = arg;
    cons_note_t *n = arg2;
    asub_t *sub = sub_find(c, n->id);
    if (sub && !sub->stopped) {
        if (n->failed) {
            OSARA_ERROR("amqp: handler %s: %s", sub->name, n->text);
        } else {
            free(sub->queue);
            sub->queue = osara_xstrdup(n->text);
            OSARA_INFO("amqp: consuming %s from queue %s", sub->name, n->text);
        }
    }
    free(n);
    osara__amqp_client_unref(c);
}

static void cons_note(aclient_t *c, int id, const char *text, int failed)
{
    cons_note_t *n = osara_xcalloc(1, sizeof(*n));
    n->id = id;
    n->failed = failed;
    snprintf(n->text, sizeof(n->text), "%s", text);
    if (post(c, cons_note_event, n) != 0) {
        free(n);
    }
}

void osara__amqp_on_consuming(aclient_t *c, int id, const char *queue)
{
    cons_note(c, id, queue, 0);
}

void osara__amqp_on_cons_failed(aclient_t *c, int id, const char *why)
{
    cons_note(c, id, why, 1);
}

void osara__amqp_msg_free(amsg_t *m)
{
    amqp_bytes_free(m->body);
    empty_amqp_pool(&m->pool);
    free(m);
}

void osara__amqp_cons_free(tcons_t *k)
{
    free(k->exchange);
    free(k->type);
    free(k->routing_key);
    free(k->queue);
    free(k->dlq);
    free(k);
}

static void settle_cmd(aclient_t *c, amsg_t *m, acmd_type_t type)
{
    if (atomic_load(&c->closing)) {
        return;
    }
    acmd_t *cmd = osara_xcalloc(1, sizeof(*cmd));
    cmd->type = type;
    cmd->tag = m->tag;
    cmd->gen = m->gen;
    osara__amqp_command(c, cmd);
}

static void delivery_event(void *arg, void *arg2)
{
    aclient_t *c = arg;
    amsg_t *m = arg2;
    asub_t *sub = sub_find(c, m->sub_id);
    if (sub == NULL || sub->stopped || (sub->draining && sub->lane.entry == NULL)) {
        /* cancelled meanwhile: back to the queue */
        settle_cmd(c, m, CMD_NACK);
        osara__amqp_msg_free(m);
    } else {
        osara_metric_add(osara__amqp_m.received, 1);
        sub->refs++;
        osara_lane_push(&sub->lane, &m->d);
    }
    osara__amqp_client_unref(c);
}

void osara__amqp_on_delivery(aclient_t *c, amsg_t *m)
{
    if (post(c, delivery_event, m) != 0) {
        osara__amqp_msg_free(m);
    }
}

/* ---- consumers on lanes --------------------------------------------------------- */

static void sub_free(void *arg, void *unused)
{
    (void)unused;
    asub_t *sub = arg;
    aclient_t *c = sub->c;
    for (asub_t **p = &c->subs; *p; p = &(*p)->next) {
        if (*p == sub) {
            *p = sub->next;
            break;
        }
    }
    free(sub->name);
    free(sub->queue);
    free(sub);
    osara__amqp_client_unref(c);
}

/* inline_free: 0 inside settle (the lane is touched afterwards). */
static void sub_unref(asub_t *sub, int inline_free)
{
    if (--sub->refs > 0) {
        return;
    }
    if (inline_free || osara_inbox_post(&sub->c->w->inbox, sub_free, sub, NULL) != 0) {
        sub_free(sub, NULL);
    }
}

void osara__amqp_push_msg(lua_State *T, amsg_t *m);

static void tp_push_message(lua_State *T, osara_delivery_t *d)
{
    osara__amqp_push_msg(T, (amsg_t *)d);
}

static void tp_finished(osara_delivery_t *d, int ok)
{
    (void)d;
    osara_metric_add(ok ? osara__amqp_m.handled : osara__amqp_m.failed, 1);
}

/* Acked once handled and every output confirmed; otherwise given back to
 * the queue (the failure policy already took the handler's errors). */
static void tp_settle(osara_delivery_t *d, osara_settle_t how)
{
    amsg_t *m = (amsg_t *)d;
    asub_t *sub = d->lane->owner;
    int ack = how == OSARA_SETTLE_ACK;
    osara_metric_add(ack ? osara__amqp_m.acked : osara__amqp_m.requeued, 1);
    settle_cmd(sub->c, m, ack ? CMD_ACK : CMD_NACK);
    osara__amqp_msg_free(m);
    sub_unref(sub, 0);
}

static const osara_transport_t amqp_transport = {
    .name = "amqp",
    .push_message = tp_push_message,
    .finished = tp_finished,
    .settle = tp_settle,
};

static void sub_stop(asub_t *sub)
{
    if (sub->stopped) {
        return;
    }
    sub->stopped = 1;
    osara_lane_set_entry(&sub->lane, NULL);
    osara_lane_stop(&sub->lane); /* queued: settled CANCELLED (requeued) */
    acmd_t *cmd = osara_xcalloc(1, sizeof(*cmd));
    cmd->type = CMD_CANCEL;
    cmd->id = sub->id;
    osara__amqp_command(sub->c, cmd);
}

static char *opt_str(lua_State *L, int idx, const char *name, const char *dflt)
{
    lua_getfield(L, idx, name);
    const char *v = lua_isstring(L, -1) ? lua_tostring(L, -1) : dflt;
    char *s = v ? osara_xstrdup(v) : NULL;
    lua_pop(L, 1);
    return s;
}

static int opt_int(lua_State *L, int idx, const char *name, int dflt)
{
    lua_getfield(L, idx, name);
    int v = lua_isnumber(L, -1) ? (int)lua_tointeger(L, -1)
            : lua_isboolean(L, -1) ? lua_toboolean(L, -1)
                                   : dflt;
    lua_pop(L, 1);
    return v;
}

/* The thread's copy of the consumer, from the options at idx. */
static tcons_t *cons_new(aclient_t *c, lua_State *L, int idx, int id)
{
    tcons_t *k = osara_xcalloc(1, sizeof(*k));
    k->id = id;
    k->exchange = opt_str(L, idx, "exchange", "");
    k->type = opt_str(L, idx, "exchange_type", "topic");
    k->routing_key = opt_str(L, idx, "routing_key", "#");
    k->queue = opt_str(L, idx, "queue", NULL);
    k->dlq = opt_str(L, idx, "dlq_queue", NULL);
    k->durable = opt_int(L, idx, "durable", 1);
    k->retry = opt_int(L, idx, "retry_queue", 0);
    k->prefetch = opt_int(L, idx, "prefetch", c->prefetch);
    return k;
}

static int kind_start(osara_reg_entry_t *e)
{
    lua_State *L = e->vm->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, e->optsref);
    int opts = lua_gettop(L);
    lua_getfield(L, opts, "client"); /* [opts, client] */
    aclient_ud_t *ud = lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (ud == NULL || ud->c == NULL || atomic_load(&ud->c->closing)) {
        lua_pop(L, 1);
        return osara_err_set(OSARA_EBROKER, "amqp: the client of this handler is closed");
    }
    aclient_t *c = ud->c;
    asub_t *sub = osara_xcalloc(1, sizeof(*sub));
    sub->c = c;
    osara__amqp_client_ref(c);
    sub->id = ++c->next_sub_id;
    sub->refs = 1; /* the entry's */
    sub->name = opt_str(L, opts, "name", "?");
    int max_inflight = opt_int(L, opts, "max_inflight", 256);
    int prefetch = opt_int(L, opts, "prefetch", c->prefetch);
    /* The broker's prefetch bounds what is held: the lane never pauses. */
    osara_lane_init(&sub->lane, &amqp_transport, sub, sub->name, max_inflight == 1,
                    max_inflight, prefetch + 1);
    sub->next = c->subs;
    c->subs = sub;
    acmd_t *cmd = osara_xcalloc(1, sizeof(*cmd));
    cmd->type = CMD_CONSUME;
    cmd->cons = cons_new(c, L, opts, sub->id);
    lua_pop(L, 1);
    e->impl = sub;
    osara_lane_set_entry(&sub->lane, e);
    osara__amqp_command(c, cmd);
    return 0;
}

static void kind_adopt(osara_reg_entry_t *e, osara_reg_entry_t *old)
{
    asub_t *sub = old->impl;
    old->impl = NULL;
    e->impl = sub;
    if (sub) {
        osara_lane_set_entry(&sub->lane, e);
    }
}

/* The script's osara.shutdown: 1 for "drain", 0 for "finish_running" (or
 * unset; another value is reported and taken as the default). */
static int shutdown_drains(lua_State *L)
{
    lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
    lua_getfield(L, -1, "osara");
    lua_getfield(L, -1, "shutdown"); /* [_LOADED, osara, mode] */
    const char *mode = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
    int drain = mode && strcmp(mode, "drain") == 0;
    if (mode && !drain && strcmp(mode, "finish_running") != 0) {
        OSARA_WARN("osara.shutdown = \"%s\": expected \"finish_running\" or \"drain\"; "
                   "finishing the running handlers only", mode);
    }
    lua_pop(L, 3);
    return drain;
}

/* Shutdown in "drain" mode: the broker stops delivering (basic.cancel),
 * but what osara already received - prefetched messages included - is
 * still handled (the lane may start coroutines in the stopping VM) and
 * acked; the worker waits for it within its grace period. */
static void sub_drain(asub_t *sub)
{
    sub->draining = 1;
    sub->lane.force = 1;
    acmd_t *cmd = osara_xcalloc(1, sizeof(*cmd));
    cmd->type = CMD_CANCEL;
    cmd->id = sub->id;
    osara__amqp_command(sub->c, cmd);
    OSARA_INFO("amqp: draining %s: handling what was received before stopping", sub->name);
}

static void kind_stop(osara_reg_entry_t *e)
{
    asub_t *sub = e->impl;
    if (sub == NULL) {
        return;
    }
    e->impl = NULL;
    if (e->vm->w->stopping && shutdown_drains(e->vm->L)) {
        sub_drain(sub);
    } else {
        sub_stop(sub);
    }
    sub_unref(sub, 1);
}

static const osara_reg_kind_t amqp_kind = {
    .name = "amqp", .start = kind_start, .adopt = kind_adopt, .stop = kind_stop,
};

void osara__amqp_registry_open(void)
{
    osara_registry_kind(&amqp_kind);
}
