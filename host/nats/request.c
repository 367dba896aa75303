/* request.c - publish, reply and request. All requests of a client share
 * one wildcard inbox subscription; a reply finds its waiting coroutine by
 * the token at the end of its subject. */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nats/natsio_int.h"

static void deliver_response(void *client, void *msg);

static void on_response(natsConnection *nc, natsSubscription *s, natsMsg *msg, void *closure)
{
    (void)nc;
    (void)s;
    nclient_t *c = closure;
    osara__nats_client_ref(c); /* the event's */
    if (osara_inbox_post(&c->w->inbox, deliver_response, c, msg) != 0) {
        natsMsg_Destroy(msg);
        osara__nats_client_unref(c);
    }
}

/* nats.c's delivery thread, after the reply inbox's last on_response. */
static void on_responses_complete(void *closure)
{
    osara__nats_client_unref(closure);
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
        osara__nats_push_msg(T, msg);
        n = 1;
    }
    natsMsg_Destroy(msg);
    osara_sched_resume(co, n);
}

static void deliver_response(void *arg, void *msg)
{
    nclient_t *c = arg;
    if (c->closing) {
        natsMsg_Destroy(msg);
    } else {
        resolve_request(c, msg);
    }
    osara__nats_client_unref(c);
}

natsStatus osara__nats_responses_start(nclient_t *c)
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
    s = natsConnection_Subscribe(&c->resp_sub, c->nc, wildcard, on_response, c);
    if (s == NATS_OK) {
        osara__nats_client_ref(c); /* nats.c's, until on_responses_complete */
        s = natsSubscription_SetOnCompleteCB(c->resp_sub, on_responses_complete, c);
        if (s != NATS_OK) {
            osara__nats_client_unref(c);
        }
    }
    return s;
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
    nclient_t *c = osara__nats_check_client(L, 1);
    const char *subject = luaL_checkstring(L, 2);
    size_t len;
    const char *data = luaL_checklstring(L, 3, &len);
    const char *reply = luaL_optstring(L, 4, NULL);
    if (c->closing) {
        return osara__nats_push_closed(L, "publish");
    }
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
    osara_metric_add(osara__nats_m.replies, 1);
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
    osara_metric_add(osara__nats_m.timeouts, 1);
    lua_State *T = osara_co_thread(co);
    lua_pushnil(T);
    lua_pushliteral(T, "timeout");
    osara_sched_resume(co, 2);
}

/* client:request(subject, bytes, timeout, headers|nil) -> msg | nil, err
 * All requests share one wildcard inbox subscription. */
static int l_client_request(lua_State *L)
{
    nclient_t *c = osara__nats_check_client(L, 1);
    const char *subject = luaL_checkstring(L, 2);
    size_t len;
    const char *data = luaL_checklstring(L, 3, &len);
    double timeout = luaL_optnumber(L, 4, 5);
    osara_co_t *co = osara_sched_current(L);
    if (co == NULL) {
        return luaL_error(L, "nats:request: only inside a handler, timer or task");
    }
    if (c->closing) {
        return osara__nats_push_closed(L, "request");
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
    osara_metric_add(osara__nats_m.requests, 1);
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
    return osara_sched_wait(L, 1, request_cleanup, r);
}

void osara__nats_requests_close(nclient_t *c)
{
    for (int i = 0; i < REQ_SLOTS; i++) {
        nreq_t *r = &c->reqs[i];
        if (r->co && osara_co_waiting(r->co) && osara_co_seq(r->co) == r->seq) {
            /* From the inbox: the close may run inside other Lua code. */
            lua_State *T = osara_co_thread(r->co);
            osara_sched_resume_later(r->co, osara__nats_push_closed(T, "request"));
        }
        r->co = NULL;
        if (r->timer) {
            uv_close((uv_handle_t *)r->timer, (uv_close_cb)free);
            r->timer = NULL;
        }
    }
}

void osara__nats_request_open(lua_State *L, int idx)
{
    static const luaL_Reg methods[] = {
        {"publish", l_client_publish},
        {"reply", l_client_reply},
        {"request", l_client_request},
        {NULL, NULL},
    };
    for (const luaL_Reg *m = methods; m->name; m++) {
        lua_pushcfunction(L, m->func);
        lua_setfield(L, idx, m->name);
    }
}
