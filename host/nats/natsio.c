#include "nats/natsio.h"

#include <errno.h>
#include <lauxlib.h>
#include <nats/nats.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include "core/err.h"
#include "core/log.h"
#include "core/lvm.h"
#include "core/metrics.h"
#include "core/registry.h"
#include "core/sched.h"
#include "core/worker.h"

#define CLIENT_MT "osara.nats.client"
#define REQ_SLOTS 4096

typedef struct nclient_s nclient_t;

typedef struct nsub_s {
    nclient_t *client;
    osara_reg_entry_t *entry;
    natsSubscription *sub;
    char *subject, *queue;
    int max_inflight, inflight;
    natsMsg **waiting;          /* over the bound: FIFO ring */
    int wcap, whead, wcount;
    int dead;
    /* Backpressure into nats.c: its delivery thread waits while `queued`
     * (posted to the loop, not yet handled) is at queued_max, so messages
     * pile up in nats.c's pending list, whose limits report a slow
     * consumer instead of growing without bound. */
    uv_mutex_t mu;
    uv_cond_t room;
    int queued, queued_max, blocked, released;
    char label[192];            /* "nats handler <subject> (<where>)" */
    osara_reg_entry_t *label_entry;
    struct nsub_s *next;
} nsub_t;

typedef struct {
    uint64_t token;
    osara_co_t *co;
    unsigned seq;
    uv_timer_t *timer;
    nclient_t *client;
} nreq_t;

struct nclient_s {
    osara_worker_t *w;
    natsConnection *nc;
    char *url;
    pid_t server_pid;
    char inbox[64];             /* "_INBOX.<nuid>." requests reply to inbox+token */
    natsSubscription *resp_sub;
    nreq_t reqs[REQ_SLOTS];
    uint64_t next_token;
    nsub_t *subs;
    jsCtx *js;
    struct njs_s *jsubs;
    volatile int closing;
    struct nclient_s *next_closed;
};

static nclient_t *closed_clients;

static osara_metric_t *m_received, *m_handled, *m_failed, *m_replies, *m_requests,
    *m_timeouts, *m_slow, *m_reconnects, *m_disconnects;

static void metrics_init(void)
{
    if (m_received) {
        return;
    }
    m_received = osara_metrics_counter("osara_nats_received_total", "messages received", NULL);
    m_handled = osara_metrics_counter("osara_nats_handled_total", "handler calls finished", NULL);
    m_failed = osara_metrics_counter("osara_nats_failed_total", "handler calls cancelled", NULL);
    m_replies = osara_metrics_counter("osara_nats_replies_total", "replies sent", NULL);
    m_requests = osara_metrics_counter("osara_nats_requests_total", "requests sent", NULL);
    m_timeouts = osara_metrics_counter("osara_nats_request_timeouts_total", "requests that timed out", NULL);
    m_slow = osara_metrics_counter("osara_nats_slow_consumer_total", "slow consumer events", NULL);
    m_reconnects = osara_metrics_counter("osara_nats_reconnects_total", "reconnections", NULL);
    m_disconnects = osara_metrics_counter("osara_nats_disconnects_total", "disconnections", NULL);
}

/* ---- connection events (nats.c threads: log and count only) ------------ */

static void on_disconnected(natsConnection *nc, void *closure)
{
    (void)nc;
    nclient_t *c = closure;
    if (!c->closing) {
        osara_metric_add(m_disconnects, 1);
        OSARA_WARN("nats %s: disconnected; reconnecting (publishes are buffered)", c->url);
    }
}

static void on_reconnected(natsConnection *nc, void *closure)
{
    (void)nc;
    nclient_t *c = closure;
    osara_metric_add(m_reconnects, 1);
    OSARA_INFO("nats %s: reconnected", c->url);
}

static void on_closed(natsConnection *nc, void *closure)
{
    (void)nc;
    nclient_t *c = closure;
    if (!c->closing) {
        OSARA_WARN("nats %s: connection closed", c->url);
    }
}

static void on_async_error(natsConnection *nc, natsSubscription *sub, natsStatus err,
                           void *closure)
{
    (void)nc;
    (void)sub;
    (void)closure;
    if (err == NATS_SLOW_CONSUMER) {
        osara_metric_add(m_slow, 1);
        OSARA_WARN("nats: slow consumer: messages dropped by the client's pending limit");
    } else {
        OSARA_WARN("nats: %s", natsStatus_GetText(err));
    }
}

/* ---- delivery to the loop ----------------------------------------------- */

static void deliver_msg(void *sub, void *msg);
static void deliver_response(void *client, void *msg);

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

static void on_response(natsConnection *nc, natsSubscription *s, natsMsg *msg, void *closure)
{
    (void)nc;
    (void)s;
    nclient_t *c = closure;
    if (osara_inbox_post(&c->w->inbox, deliver_response, c, msg) != 0) {
        natsMsg_Destroy(msg);
    }
}

/* Pushes {subject=, raw=, reply=, headers=} for msg on T. */
static void push_msg(lua_State *T, natsMsg *msg)
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
    osara_metric_add(ok ? m_handled : m_failed, 1);
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
    push_msg(T, msg); /* T: [runner, msg] */
    osara_co_set_user(co, msg);
    if (sub->label_entry != sub->entry) { /* formatted once per handler, not per message */
        snprintf(sub->label, sizeof(sub->label), "nats handler %s (%s)", sub->subject,
                 sub->entry->where);
        sub->label_entry = sub->entry;
    }
    osara_sched_run(co, 1, on_handler_done, sub, sub->label);
}

static void resolve_request(nclient_t *c, natsMsg *msg)
{
    const char *subj = natsMsg_GetSubject(msg);
    uint64_t token = strtoull(subj + strlen(c->inbox), NULL, 10);
    nreq_t *r = &c->reqs[token % REQ_SLOTS];
    if (r->token != token || r->co == NULL || !osara_co_waiting(r->co) ||
        osara_co_seq(r->co) != r->seq) {
        natsMsg_Destroy(msg); /* late reply to a request that timed out */
        return;
    }
    osara_co_t *co = r->co;
    lua_State *T = osara_co_thread(co);
    r->co = NULL;
    if (r->timer) {
        uv_timer_stop(r->timer);
    }
    int n;
    if (natsMsg_IsNoResponders(msg)) {
        lua_pushnil(T);
        lua_pushliteral(T, "no responders");
        n = 2;
    } else {
        push_msg(T, msg);
        n = 1;
    }
    natsMsg_Destroy(msg);
    osara_sched_resume(co, n);
}

static void deliver_msg(void *arg, void *msg)
{
    nsub_t *sub = arg;
    if (sub->client->closing) {
        natsMsg_Destroy(msg);
        settled(sub);
        return;
    }
    osara_metric_add(m_received, 1);
    dispatch_msg(sub, msg);
}

static void deliver_response(void *arg, void *msg)
{
    nclient_t *c = arg;
    if (c->closing) {
        natsMsg_Destroy(msg);
        return;
    }
    resolve_request(c, msg);
}

/* ---- embedded server ------------------------------------------------------ */

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    int port = -1;
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0) {
        port = ntohs(a.sin_port);
    }
    if (fd >= 0) {
        close(fd);
    }
    return port;
}

/* Starts nats-server as a child that dies with us (PR_SET_PDEATHSIG), so a
 * kill -9 of the host never leaves it behind. */
static int start_server(nclient_t *c, const char *data_dir)
{
    if (access("/usr/bin/nats-server", X_OK) != 0 && access("/usr/sbin/nats-server", X_OK) != 0) {
        return osara_err_set(OSARA_ENOENT, "nats: the embedded server needs the nats-server "
                                           "binary (apt-get install nats-server)");
    }
    int port = free_port();
    char portstr[16], sd[4096];
    snprintf(portstr, sizeof(portstr), "%d", port);
    snprintf(sd, sizeof(sd), "%s/nats", data_dir);
    mkdir(data_dir, 0755);
    mkdir(sd, 0755);
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        int devnull = open("/dev/null", 0);
        dup2(devnull, 1);
        dup2(devnull, 2);
        execlp("nats-server", "nats-server", "-a", "127.0.0.1", "-p", portstr, "-js", "-sd", sd,
               (char *)NULL);
        _exit(127);
    }
    if (pid < 0) {
        return osara_err_set(-errno, "nats: cannot start nats-server: %s", strerror(errno));
    }
    c->server_pid = pid;
    char url[64];
    snprintf(url, sizeof(url), "nats://127.0.0.1:%d", port);
    free(c->url);
    c->url = strdup(url);
    return 0;
}

static void stop_server(nclient_t *c)
{
    if (c->server_pid > 0) {
        kill(c->server_pid, SIGTERM);
        waitpid(c->server_pid, NULL, 0);
        c->server_pid = 0;
    }
}

/* ---- client ------------------------------------------------------------------ */

static void njs_stop_thread(struct njs_s *j);
static void njs_free(struct njs_s *j);

static void client_close(void *ptr)
{
    nclient_t *c = ptr;
    c->closing = 1;
    for (struct njs_s *j = c->jsubs; j; j = *(struct njs_s **)j) {
        njs_stop_thread(j);
    }
    for (nsub_t *s = c->subs; s; s = s->next) {
        release_sub(s);
    }
    osara_inbox_drain(&c->w->inbox); /* destroys messages still queued */
    if (c->nc) {
        natsConnection_FlushTimeout(c->nc, 2000);
        natsConnection_Close(c->nc);
    }
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
    if (c->resp_sub) {
        natsSubscription_Destroy(c->resp_sub);
    }
    while (c->jsubs) {
        struct njs_s *j = c->jsubs;
        c->jsubs = *(struct njs_s **)j;
        njs_free(j);
    }
    if (c->js) {
        jsCtx_Destroy(c->js);
    }
    if (c->nc) {
        natsConnection_Destroy(c->nc);
    }
    for (int i = 0; i < REQ_SLOTS; i++) {
        if (c->reqs[i].timer) {
            uv_close((uv_handle_t *)c->reqs[i].timer, (uv_close_cb)free);
        }
    }
    osara_inbox_drain(&c->w->inbox);
    stop_server(c);
    /* nats.c may still run this client's connection callbacks on its own
     * threads after Destroy: keep the struct until the library stopped. */
    c->next_closed = closed_clients;
    closed_clients = c;
}

void osara_natsio_shutdown(void)
{
    if (closed_clients == NULL) {
        return;
    }
    nats_CloseAndWait(2000);
    while (closed_clients) {
        nclient_t *c = closed_clients;
        closed_clients = c->next_closed;
        free(c->url);
        free(c);
    }
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
    /* The embedded server needs a moment to listen. */
    for (int attempt = 0; s == NATS_OK && attempt < 100; attempt++) {
        s = natsConnection_Connect(&c->nc, opts);
        if (s != NATS_NO_SERVER || c->server_pid == 0) {
            break;
        }
        s = NATS_OK;
        usleep(50000);
    }
    natsOptions_Destroy(opts);
    return s;
}

static natsStatus start_responses(nclient_t *c)
{
    char *nuid = NULL;
    natsStatus s = natsInbox_Create((natsInbox **)&nuid);
    if (s != NATS_OK) {
        return s;
    }
    snprintf(c->inbox, sizeof(c->inbox), "%s.", nuid);
    natsInbox_Destroy((natsInbox *)nuid);
    char wildcard[80];
    snprintf(wildcard, sizeof(wildcard), "%s*", c->inbox);
    return natsConnection_Subscribe(&c->resp_sub, c->nc, wildcard, on_response, c);
}

typedef struct {
    nclient_t *c;
} client_ud_t;

struct njs_s;

/* client(conf, key, check) -> client (unconnected when check). conf: {servers=, name=, user=, password=,
 * token=, creds=, tls=, ca=}; servers "embedded" (default) starts a
 * nats-server child. Raises with nats.c's message. */
static int l_nats_client(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    const char *key = luaL_checkstring(L, 2);
    osara_vm_t *vm = osara_vm_from_L(L);
    osara_worker_t *w = vm->w;
    metrics_init();
    char skey[1024];
    snprintf(skey, sizeof(skey), "nats:%s", key);
    int checking = w->opts.mode == OSARA_MODE_CHECK || lua_toboolean(L, 3);
    nclient_t *c = checking ? NULL : osara_worker_shared_get(w, skey);
    if (c == NULL && !checking) {
        c = calloc(1, sizeof(*c));
        c->w = w;
        lua_getfield(L, 1, "servers");
        const char *servers = luaL_optstring(L, -1, "embedded");
        c->url = strdup(servers);
        lua_pop(L, 1);
        if (strcmp(c->url, "embedded") == 0 && start_server(c, w->data_dir) != 0) {
            client_close(c);
            return luaL_error(L, "%s", osara_err_msg());
        }
        natsStatus s = connect_client(c, L, 1);
        if (s == NATS_OK) {
            s = start_responses(c);
        }
        if (s != NATS_OK) {
            char msg[512];
            snprintf(msg, sizeof(msg), "nats: cannot connect to %s: %s", c->url,
                     natsStatus_GetText(s));
            client_close(c);
            return luaL_error(L, "%s", msg);
        }
        if (c->server_pid) {
            OSARA_INFO("nats: embedded server (JetStream in %s/nats) at %s", w->data_dir, c->url);
        }
        osara_worker_shared_put(w, skey, c, client_close);
    }
    client_ud_t *ud = lua_newuserdata(L, sizeof(*ud));
    ud->c = c;
    luaL_getmetatable(L, CLIENT_MT);
    lua_setmetatable(L, -2);
    return 1;
}

static nclient_t *check_client(lua_State *L, int idx)
{
    client_ud_t *ud = luaL_checkudata(L, idx, CLIENT_MT);
    if (ud->c == NULL) {
        luaL_error(L, "nats: not connected (osara check mode)");
    }
    return ud->c;
}

static natsStatus add_headers(lua_State *L, int idx, natsMsg *m)
{
    natsStatus s = NATS_OK;
    lua_pushnil(L);
    while (s == NATS_OK && lua_next(L, idx) != 0) {
        if (lua_type(L, -2) == LUA_TSTRING && lua_isstring(L, -1)) {
            s = natsMsgHeader_Set(m, lua_tostring(L, -2), lua_tostring(L, -1));
        }
        lua_pop(L, 1);
    }
    return s;
}

/* client:publish(subject, bytes, reply_to|nil, headers|nil) -> true | nil, err
 * Buffered by nats.c; never blocks the loop. */
static int l_client_publish(lua_State *L)
{
    nclient_t *c = check_client(L, 1);
    const char *subject = luaL_checkstring(L, 2);
    size_t len;
    const char *data = luaL_checklstring(L, 3, &len);
    const char *reply = luaL_optstring(L, 4, NULL);
    natsStatus s;
    if (lua_istable(L, 5)) {
        natsMsg *m = NULL;
        s = natsMsg_Create(&m, subject, reply, data, (int)len);
        if (s == NATS_OK) s = add_headers(L, 5, m);
        if (s == NATS_OK) s = natsConnection_PublishMsg(c->nc, m);
        natsMsg_Destroy(m);
    } else if (reply) {
        s = natsConnection_PublishRequest(c->nc, subject, reply, data, (int)len);
    } else {
        s = natsConnection_Publish(c->nc, subject, data, (int)len);
    }
    if (s != NATS_OK) {
        lua_pushnil(L);
        lua_pushfstring(L, "nats: publish to %s: %s", subject, natsStatus_GetText(s));
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* client:reply(subject, bytes): counted as a reply */
static int l_client_reply(lua_State *L)
{
    int n = l_client_publish(L);
    osara_metric_add(m_replies, 1);
    return n;
}

static void request_cleanup(void *data)
{
    nreq_t *r = data;
    r->co = NULL;
    if (r->timer) {
        uv_timer_stop(r->timer);
    }
}

static void on_request_timeout(uv_timer_t *t)
{
    nreq_t *r = t->data;
    osara_co_t *co = r->co;
    if (co == NULL || !osara_co_waiting(co) || osara_co_seq(co) != r->seq) {
        return;
    }
    r->co = NULL;
    osara_metric_add(m_timeouts, 1);
    lua_State *T = osara_co_thread(co);
    lua_pushnil(T);
    lua_pushliteral(T, "timeout");
    osara_sched_resume(co, 2);
}

/* client:request(subject, bytes, timeout, headers|nil) -> msg | nil, err
 * All requests share one wildcard inbox subscription. */
static int l_client_request(lua_State *L)
{
    nclient_t *c = check_client(L, 1);
    const char *subject = luaL_checkstring(L, 2);
    size_t len;
    const char *data = luaL_checklstring(L, 3, &len);
    double timeout = luaL_optnumber(L, 4, 5);
    osara_co_t *co = osara_sched_current(L);
    if (co == NULL) {
        return luaL_error(L, "nats:request: only inside a handler, timer or task");
    }
    uint64_t token = ++c->next_token;
    nreq_t *r = &c->reqs[token % REQ_SLOTS];
    if (r->co != NULL) {
        lua_pushnil(L);
        lua_pushliteral(L, "too many requests in flight");
        return 2;
    }
    char reply[128];
    snprintf(reply, sizeof(reply), "%s%llu", c->inbox, (unsigned long long)token);
    natsStatus s;
    if (lua_istable(L, 5)) {
        natsMsg *m = NULL;
        s = natsMsg_Create(&m, subject, reply, data, (int)len);
        if (s == NATS_OK) s = add_headers(L, 5, m);
        if (s == NATS_OK) s = natsConnection_PublishMsg(c->nc, m);
        natsMsg_Destroy(m);
    } else {
        s = natsConnection_PublishRequest(c->nc, subject, reply, data, (int)len);
    }
    if (s != NATS_OK) {
        lua_pushnil(L);
        lua_pushfstring(L, "nats: request to %s: %s", subject, natsStatus_GetText(s));
        return 2;
    }
    osara_metric_add(m_requests, 1);
    r->token = token;
    r->co = co;
    r->seq = osara_co_seq(co) + 1;
    r->client = c;
    if (r->timer == NULL) {
        r->timer = malloc(sizeof(*r->timer));
        uv_timer_init(&c->w->loop, r->timer);
        r->timer->data = r;
    }
    uv_update_time(&c->w->loop);
    uv_timer_start(r->timer, on_request_timeout, (uint64_t)(timeout * 1000), 0);
    return osara_sched_wait(L, request_cleanup, r);
}

/* client:flush([timeout]) -> true | nil, err (blocks up to timeout; tests) */
static int l_client_flush(lua_State *L)
{
    nclient_t *c = check_client(L, 1);
    natsStatus s = natsConnection_FlushTimeout(c->nc, (int64_t)(luaL_optnumber(L, 2, 2) * 1000));
    if (s != NATS_OK) {
        lua_pushnil(L);
        lua_pushstring(L, natsStatus_GetText(s));
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int l_client_url(lua_State *L)
{
    client_ud_t *ud = luaL_checkudata(L, 1, CLIENT_MT);
    lua_pushstring(L, ud->c ? ud->c->url : "embedded");
    return 1;
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

void osara_natsio_open_js(lua_State *L);

int osara_natsio_open(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"publish", l_client_publish}, {"reply", l_client_reply},
        {"request", l_client_request}, {"flush", l_client_flush},
        {"url", l_client_url},         {NULL, NULL},
    };
    osara_registry_kind(&nats_kind);
    luaL_newmetatable(L, CLIENT_MT);
    lua_newtable(L);
    luaL_register(L, NULL, methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    osara_natsio_open_js(L);
    lua_newtable(L);
    lua_pushcfunction(L, l_nats_client);
    lua_setfield(L, -2, "client");
    return 1;
}

/* ---- JetStream ------------------------------------------------------------ *
 * Durable pull consumers: a fetch thread per subscription pulls a batch
 * (natsSubscription_Fetch blocks, so it never runs on the loop), hands it to
 * the loop through the inbox, and waits until the batch was handled before
 * pulling the next: in flight is bounded by the batch size. The handler's
 * outcome decides ack, nak with delay (retried) or term (never retried). */

typedef struct njs_s {
    struct njs_s *next;         /* first: client_close walks the list */
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

static osara_metric_t *m_acked, *m_naked, *m_termed;

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
        osara_metric_add(m_acked, 1);
    } else {
        jsMsgMetaData *meta = NULL;
        uint64_t delivered = 0;
        if (natsMsg_GetMetaData(&meta, msg) == NATS_OK) {
            delivered = meta->NumDelivered;
            jsMsgMetaData_Destroy(meta);
        }
        if (strcmp(outcome, "term") == 0 || (j->max_deliver > 0 && (int64_t)delivered >= j->max_deliver)) {
            natsMsg_Term(msg, NULL);
            osara_metric_add(m_termed, 1);
            OSARA_WARN("nats %s (durable %s): message terminated after %llu deliveries (%s)",
                       j->subject, j->durable, (unsigned long long)delivered, outcome);
        } else {
            natsMsg_NakWithDelay(msg, (int64_t)(j->nak_delay * 1000), NULL);
            osara_metric_add(m_naked, 1);
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
        osara_metric_add(m_received, 1);
        lua_rawgeti(T, LUA_REGISTRYINDEX, j->entry->fnref);
        push_msg(T, msg);
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
    if (m_acked == NULL) {
        m_acked = osara_metrics_counter("osara_nats_js_acked_total", "JetStream messages acked", NULL);
        m_naked = osara_metrics_counter("osara_nats_js_naked_total", "JetStream messages naked for redelivery", NULL);
        m_termed = osara_metrics_counter("osara_nats_js_termed_total", "JetStream messages terminated", NULL);
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
    nclient_t *c = check_client(L, 1);
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
    nclient_t *c = check_client(L, 1);
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
    return osara_sched_wait(L, jspub_cleanup, p);
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

void osara_natsio_open_js(lua_State *L)
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
    luaL_getmetatable(L, CLIENT_MT);
    lua_getfield(L, -1, "__index");
    lua_pushcfunction(L, l_client_stream);
    lua_setfield(L, -2, "stream");
    lua_pushcfunction(L, l_client_jspublish);
    lua_setfield(L, -2, "jspublish");
    lua_pop(L, 2);
}
