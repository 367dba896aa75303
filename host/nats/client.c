/* client.c - a NATS connection: options, reconnect events, close. */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/mem.h"
#include "core/log.h"
#include "core/lvm.h"
#include "nats/natsio.h"
#include "nats/natsio_int.h"

osara__nats_metrics_t osara__nats_m;

static uv_once_t metrics_once = UV_ONCE_INIT;

/* Once per process (the counters are the process's, shared by workers). */
static void metrics_create(void)
{
    osara__nats_metrics_t *m = &osara__nats_m;
    m->received = osara_metrics_counter("osara_nats_received_total", "messages received", NULL);
    m->handled = osara_metrics_counter("osara_nats_handled_total", "handler calls finished", NULL);
    m->failed = osara_metrics_counter("osara_nats_failed_total", "handler calls cancelled", NULL);
    m->replies = osara_metrics_counter("osara_nats_replies_total", "replies sent", NULL);
    m->requests = osara_metrics_counter("osara_nats_requests_total", "requests sent", NULL);
    m->timeouts = osara_metrics_counter("osara_nats_request_timeouts_total",
                                        "requests that timed out", NULL);
    m->slow = osara_metrics_counter("osara_nats_slow_consumer_total", "slow consumer events", NULL);
    m->reconnects = osara_metrics_counter("osara_nats_reconnects_total", "reconnections", NULL);
    m->disconnects = osara_metrics_counter("osara_nats_disconnects_total", "disconnections", NULL);
    m->acked = osara_metrics_counter("osara_nats_js_acked_total", "JetStream messages acked", NULL);
    m->naked = osara_metrics_counter("osara_nats_js_naked_total",
                                     "JetStream messages naked for redelivery", NULL);
    m->termed = osara_metrics_counter("osara_nats_js_termed_total",
                                      "JetStream messages terminated", NULL);
    m->publish_failed = osara_metrics_counter("osara_nats_publish_failed_total",
                                              "publishes nats.c refused (reconnect buffer full, "
                                              "connection closed)", NULL);
    m->js_publish_failed = osara_metrics_counter("osara_nats_js_publish_failed_total",
                                                 "JetStream publishes the stream did not "
                                                 "acknowledge", NULL);
}

void osara__nats_metrics_init(void)
{
    uv_once(&metrics_once, metrics_create);
}

/* ---- connection events (nats.c threads: log and count only) ------------ */

static void on_disconnected(natsConnection *nc, void *closure)
{
    (void)nc;
    nclient_t *c = closure;
    if (!c->closing) {
        osara_metric_add(osara__nats_m.disconnects, 1);
        OSARA_WARN("nats %s: disconnected; reconnecting (publishes are buffered)", c->url);
    }
}

static void on_reconnected(natsConnection *nc, void *closure)
{
    (void)nc;
    nclient_t *c = closure;
    osara_metric_add(osara__nats_m.reconnects, 1);
    OSARA_INFO("nats %s: reconnected", c->url);
}

/* Loop thread: the late first connection was made. */
static void client_connected(void *arg, void *unused)
{
    (void)unused;
    nclient_t *c = arg;
    if (!c->closing) {
        osara__nats_subs_connected(c);
    }
    osara__nats_client_unref(c);
}

/* A first connection made in the background (nats.c's thread). */
static void on_connected(natsConnection *nc, void *closure)
{
    (void)nc;
    nclient_t *c = closure;
    atomic_store(&c->connected, 1);
    OSARA_INFO("nats %s: connected", c->url);
    osara__nats_client_ref(c); /* the event's */
    if (osara_inbox_post(&c->w->inbox, client_connected, c, NULL) != 0) {
        osara__nats_client_unref(c);
    }
}

/* ---- a server that is not there yet ------------------------------------------ */

#define LATE_LOG_MS 5000

static void on_late_closed(uv_handle_t *h)
{
    nclient_t *c = h->data;
    free(h);
    osara__nats_client_unref(c); /* the timer's */
}

static void late_stop(nclient_t *c)
{
    if (c->late) {
        uv_close((uv_handle_t *)c->late, on_late_closed);
        c->late = NULL;
    }
}

static void on_late_tick(uv_timer_t *t)
{
    nclient_t *c = t->data;
    if (atomic_load(&c->connected) || c->closing) {
        late_stop(c);
        return;
    }
    OSARA_WARN("nats %s: not connected yet after %llu s; still trying", c->url,
               (unsigned long long)((uv_now(t->loop) - c->late_since) / 1000));
}

/* The server is not there yet: nats.c keeps trying in the background
 * (handlers start when it appears); a warning every few seconds says so. */
static void late_start(nclient_t *c)
{
    OSARA_WARN("nats %s: not reachable yet; trying again in the background (a container "
               "started before its server?)", c->url);
    c->late = osara_xcalloc(1, sizeof(*c->late));
    c->late_since = uv_now(&c->w->loop);
    uv_timer_init(&c->w->loop, c->late);
    c->late->data = c;
    osara__nats_client_ref(c); /* the timer's, until closed */
    uv_timer_start(c->late, on_late_tick, LATE_LOG_MS, LATE_LOG_MS);
}

/* The last callback nats.c makes for the connection. */
static void on_closed(natsConnection *nc, void *closure)
{
    (void)nc;
    nclient_t *c = closure;
    if (!c->closing) {
        OSARA_WARN("nats %s: connection closed", c->url);
    }
    osara__nats_client_unref(c);
}

static void on_async_error(natsConnection *nc, natsSubscription *sub, natsStatus err,
                           void *closure)
{
    (void)nc;
    (void)sub;
    (void)closure;
    if (err == NATS_SLOW_CONSUMER) {
        osara_metric_add(osara__nats_m.slow, 1);
        OSARA_WARN("nats: slow consumer: messages dropped by the client's pending limit");
    } else {
        OSARA_WARN("nats: %s", natsStatus_GetText(err));
    }
}

/* ---- client ------------------------------------------------------------------ */

void osara__nats_client_ref(nclient_t *c)
{
    atomic_fetch_add(&c->refs, 1);
}

void osara__nats_client_unref(nclient_t *c)
{
    if (atomic_fetch_sub(&c->refs, 1) == 1) {
        free(c->url);
        free(c);
    }
}

void osara__nats_dispose(osara_inbox_t *inbox, osara_inbox_fn free_fn, void *obj, int now)
{
    if (now || osara_inbox_post(inbox, free_fn, obj, NULL) != 0) {
        free_fn(obj, NULL);
    }
}

nclient_t *osara__nats_entry_client(osara_reg_entry_t *e)
{
    lua_State *L = e->vm->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, e->optsref);
    lua_getfield(L, -1, "client"); /* [opts, client] */
    client_ud_t *ud = lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (ud == NULL || ud->c == NULL || ud->c->closing) {
        lua_pop(L, 1);
        osara_err_set(OSARA_EBROKER, "nats: the client of this handler is closed");
        return NULL;
    }
    return ud->c;
}

void *osara__nats_adopt(osara_reg_entry_t *e, osara_reg_entry_t *old, size_t lane_offset)
{
    void *impl = old->impl;
    old->impl = NULL;
    e->impl = impl;
    if (impl) {
        osara_lane_set_entry((osara_lane_t *)((char *)impl + lane_offset), e);
    }
    return impl;
}

int osara__nats_push_closed(lua_State *L, const char *what)
{
    lua_pushnil(L);
    lua_pushfstring(L, "nats: %s: the client is closed (the script's configuration changed)",
                    what);
    return 2;
}

#define DRAIN_MS 2000

/* Thread pool: the connection's drain, which may take up to DRAIN_MS. */
static void teardown_work(uv_work_t *work)
{
    nclient_t *c = work->data;
    if (c->nc == NULL) {
        return;
    }
    /* Drain: subscriptions unsubscribe and deliver what the server sent
     * them, buffered publishes reach the server, then it closes. */
    if (natsConnection_DrainTimeout(c->nc, DRAIN_MS) == NATS_OK) {
        for (int ms = 0; ms < DRAIN_MS + 500 && !natsConnection_IsClosed(c->nc); ms += 10) {
            nats_Sleep(10);
        }
    }
    natsConnection_Close(c->nc);
}

static void teardown_after(uv_work_t *work, int status)
{
    (void)status;
    nclient_t *c = work->data;
    free(work);
    if (c->resp_sub) {
        natsSubscription_Destroy(c->resp_sub);
        c->resp_sub = NULL;
    }
    if (c->js) {
        jsCtx_Destroy(c->js);
        c->js = NULL;
    }
    if (c->nc) {
        natsConnection_Destroy(c->nc);
        c->nc = NULL;
    }
    osara__nats_server_stop(c);
    osara__nats_client_unref(c); /* the worker's */
}

/* Starts the teardown once closing and no thread-pool job uses nc. */
static void maybe_teardown(nclient_t *c)
{
    if (!c->closing || c->jobs > 0 || c->torn_down) {
        return;
    }
    c->torn_down = 1;
    uv_work_t *work = osara_xcalloc(1, sizeof(*work));
    work->data = c;
    if (uv_queue_work(&c->w->loop, work, teardown_work, teardown_after) != 0) {
        teardown_work(work);
        teardown_after(work, 0);
    }
}

void osara__nats_job_begin(nclient_t *c)
{
    c->jobs++;
}

void osara__nats_job_end(nclient_t *c)
{
    c->jobs--;
    maybe_teardown(c);
}

void osara__nats_client_close(void *ptr)
{
    nclient_t *c = ptr;
    c->closing = 1;
    late_stop(c);
    osara__nats_subs_close(c);
    osara__nats_js_stop(c);
    osara__nats_requests_close(c);
    maybe_teardown(c);
}

void osara_natsio_shutdown(void)
{
    /* Waits for nats.c's threads: the last callbacks of closed connections
     * free their clients. */
    nats_CloseAndWait(2000);
}

static natsStatus connect_client(nclient_t *c, lua_State *L, int conf)
{
    natsOptions *opts = NULL;
    natsStatus s = natsOptions_Create(&opts);
    if (s == NATS_OK) s = natsOptions_SetServers(opts, (const char *[]){c->url}, 1);
    lua_getfield(L, conf, "name");
    if (s == NATS_OK && lua_isstring(L, -1)) s = natsOptions_SetName(opts, lua_tostring(L, -1));
    lua_getfield(L, conf, "user");
    lua_getfield(L, conf, "password");
    if (s == NATS_OK && lua_isstring(L, -2))
        s = natsOptions_SetUserInfo(opts, lua_tostring(L, -2), lua_tostring(L, -1));
    lua_getfield(L, conf, "token");
    if (s == NATS_OK && lua_isstring(L, -1)) s = natsOptions_SetToken(opts, lua_tostring(L, -1));
    lua_getfield(L, conf, "creds");
    if (s == NATS_OK && lua_isstring(L, -1))
        s = natsOptions_SetUserCredentialsFromFiles(opts, lua_tostring(L, -1), NULL);
    lua_getfield(L, conf, "tls");
    if (s == NATS_OK && lua_toboolean(L, -1)) s = natsOptions_SetSecure(opts, true);
    lua_getfield(L, conf, "ca");
    if (s == NATS_OK && lua_isstring(L, -1))
        s = natsOptions_LoadCATrustedCertificates(opts, lua_tostring(L, -1));
    lua_pop(L, 7);
    /* Requests and replies are latency-bound: do not wait for the flusher. */
    if (s == NATS_OK) s = natsOptions_SetSendAsap(opts, true);
    if (s == NATS_OK) s = natsOptions_SetMaxReconnect(opts, -1);
    if (s == NATS_OK) s = natsOptions_SetReconnectWait(opts, 250);
    if (s == NATS_OK) s = natsOptions_SetReconnectBufSize(opts, 8 * 1024 * 1024);
    if (s == NATS_OK) s = natsOptions_SetDisconnectedCB(opts, on_disconnected, c);
    if (s == NATS_OK) s = natsOptions_SetReconnectedCB(opts, on_reconnected, c);
    if (s == NATS_OK) s = natsOptions_SetClosedCB(opts, on_closed, c);
    if (s == NATS_OK) s = natsOptions_SetErrorHandler(opts, on_async_error, c);
    if (s == NATS_OK) s = natsOptions_SetTimeout(opts, 2000);
    /* A server that is not listening yet (the embedded one needs a
     * moment; a remote one may start after us, the usual order of a
     * container start): connect in the background instead of failing or
     * waiting on the loop; what is sent meanwhile is buffered. */
    if (s == NATS_OK) s = natsOptions_SetRetryOnFailedConnect(opts, true, on_connected, c);
    if (s == NATS_OK && c->server_pid) s = natsOptions_SetReconnectWait(opts, 20);
    if (s == NATS_OK) {
        s = natsConnection_Connect(&c->nc, opts);
        if (s == NATS_OK) {
            atomic_store(&c->connected, 1);
        } else if (s == NATS_NOT_YET_CONNECTED) {
            s = NATS_OK;
            if (!c->server_pid) {
                late_start(c);
            }
        }
    }
    if (c->nc) {
        osara__nats_client_ref(c); /* nats.c's, until on_closed */
    }
    natsOptions_Destroy(opts);
    return s;
}

nclient_t *osara__nats_client_new(osara_worker_t *w, lua_State *L, int conf)
{
    nclient_t *c = osara_xcalloc(1, sizeof(*c));
    c->w = w;
    atomic_init(&c->refs, 1);
    lua_getfield(L, conf, "servers");
    const char *servers = lua_isstring(L, -1) ? lua_tostring(L, -1) : "embedded";
    c->url = osara_xstrdup(servers);
    lua_pop(L, 1);
    if (strcmp(c->url, "embedded") == 0 && osara__nats_server_start(c, w->data_dir) != 0) {
        osara__nats_client_close(c);
        return NULL;
    }
    natsStatus s = connect_client(c, L, conf);
    if (s == NATS_OK) {
        s = osara__nats_responses_start(c);
    }
    if (s != NATS_OK) {
        osara_err_set(OSARA_EBROKER, "nats: cannot connect to %s: %s", c->url,
                      natsStatus_GetText(s));
        osara__nats_client_close(c);
        return NULL;
    }
    if (c->server_pid) {
        OSARA_INFO("nats: embedded server (pid %d, JetStream in %s/nats) at %s", (int)c->server_pid,
                   w->data_dir, c->url);
    }
    return c;
}
