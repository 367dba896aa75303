/* request.c - publish, reply and request. All requests of a client share
 * one wildcard inbox subscription; a reply finds its waiting coroutine by
 * the token at the end of its subject. */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/mem.h"
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

/* The request's results: the reply, or nil and why not. */
static int push_request_result(lua_State *T, void *ud)
{
    nreq_t *r = ud;
    if (r->fail) {
        lua_pushnil(T);
        lua_pushstring(T, r->fail);
        return 2;
    }
    osara__nats_push_msg(T, r->reply);
    return 1;
}

static void complete_request(nreq_t *r)
{
    osara_sched_future_ref(&r->f); /* complete wants one held across it */
    osara_sched_future_complete(&r->f, push_request_result, r);
    osara_sched_future_unref(&r->f);
}

static void resolve_request(nclient_t *c, natsMsg *msg)
{
    const char *subj = natsMsg_GetSubject(msg);
    uint64_t token = strtoull(subj + strlen(c->inbox), NULL, 10);
    nreq_t *r = c->reqs[token % REQ_SLOTS];
    if (r == NULL || r->token != token || r->f.done) {
        natsMsg_Destroy(msg); /* late reply to a request that timed out */
        return;
    }
    if (natsMsg_IsNoResponders(msg)) {
        r->fail = "no responders";
        natsMsg_Destroy(msg);
    } else {
        r->reply = msg;
    }
    complete_request(r);
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
    osara__nats_client_ref(c); /* nats.c's, until on_responses_complete */
    s = natsConnection_Subscribe(&c->resp_sub, c->nc, wildcard, on_response, c);
    if (s != NATS_OK) {
        osara__nats_client_unref(c);
        return s;
    }
    /* Failing, nats.c's reference stays: a leak, never a use after free. */
    return natsSubscription_SetOnCompleteCB(c->resp_sub, on_responses_complete, c);
}

natsStatus osara__nats_add_headers(lua_State *L, int idx, natsMsg *m)
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
        if (s == NATS_OK) s = osara__nats_add_headers(L, 5, m);
        if (s == NATS_OK) s = natsConnection_PublishMsg(c->nc, m);
        natsMsg_Destroy(m);
    } else if (reply) {
        s = natsConnection_PublishRequest(c->nc, subject, reply, data, (int)len);
    } else {
        s = natsConnection_Publish(c->nc, subject, data, (int)len);
    }
    if (s != NATS_OK) {
        osara_metric_add(osara__nats_m.publish_failed, 1);
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

/* The future's last reference went: the reply came, the wait timed out
 * or was cancelled. */
static void request_free(osara_sched_future_t *f)
{
    nreq_t *r = (nreq_t *)f;
    nclient_t *c = r->client;
    if (c->reqs[r->token % REQ_SLOTS] == r) {
        c->reqs[r->token % REQ_SLOTS] = NULL;
    }
    if (!f->done) {
        osara_metric_add(osara__nats_m.timeouts, 1);
    }
    if (r->reply) {
        natsMsg_Destroy(r->reply);
    }
    free(r);
    osara__nats_client_unref(c);
}

static natsStatus send_request(nclient_t *c, lua_State *L, uint64_t token)
{
    size_t len;
    const char *subject = lua_tostring(L, 2);
    const char *data = lua_tolstring(L, 3, &len);
    char reply[128];
    snprintf(reply, sizeof(reply), "%s%llu", c->inbox, (unsigned long long)token);
    if (!lua_istable(L, 5)) {
        return natsConnection_PublishRequest(c->nc, subject, reply, data, (int)len);
    }
    natsMsg *m = NULL;
    natsStatus s = natsMsg_Create(&m, subject, reply, data, (int)len);
    if (s == NATS_OK) s = osara__nats_add_headers(L, 5, m);
    if (s == NATS_OK) s = natsConnection_PublishMsg(c->nc, m);
    natsMsg_Destroy(m);
    return s;
}

/* client:request(subject, bytes, timeout, headers|nil) -> msg | nil, err
 * All requests share one wildcard inbox subscription. */
static int l_client_request(lua_State *L)
{
    nclient_t *c = osara__nats_check_client(L, 1);
    const char *subject = luaL_checkstring(L, 2);
    luaL_checkstring(L, 3);
    double timeout = luaL_optnumber(L, 4, 5);
    if (osara_sched_current(L) == NULL) {
        return luaL_error(L, "nats:request: only inside a handler, timer or task");
    }
    if (c->closing) {
        return osara__nats_push_closed(L, "request");
    }
    uint64_t token = ++c->next_token;
    if (c->reqs[token % REQ_SLOTS] != NULL) {
        lua_pushnil(L);
        lua_pushliteral(L, "too many requests in flight");
        return 2;
    }
    natsStatus s = send_request(c, L, token);
    if (s != NATS_OK) {
        lua_pushnil(L);
        lua_pushfstring(L, "nats: request to %s: %s", subject, natsStatus_GetText(s));
        return 2;
    }
    osara_metric_add(osara__nats_m.requests, 1);
    nreq_t *r = osara_xcalloc(1, sizeof(*r));
    osara_sched_future_init(&r->f, request_free);
    r->client = c;
    osara__nats_client_ref(c);
    r->token = token;
    c->reqs[token % REQ_SLOTS] = r;
    /* The wait holds the future; the slot only points to it. */
    int rc = osara_sched_future_wait(L, &r->f, 1, timeout);
    osara_sched_future_unref(&r->f);
    return rc;
}

static void fail_closed(void *arg, void *unused)
{
    (void)unused;
    nreq_t *r = arg;
    if (!r->f.done) {
        r->fail = "nats: request: the client is closed (the script's configuration changed)";
        complete_request(r);
    }
    osara_sched_future_unref(&r->f);
}

/* From the inbox: the close runs inside a reload, where no Lua may run. */
void osara__nats_requests_close(nclient_t *c)
{
    for (int i = 0; i < REQ_SLOTS; i++) {
        nreq_t *r = c->reqs[i];
        if (r && !r->f.done) {
            osara_sched_future_ref(&r->f);
            if (osara_inbox_post(&c->w->inbox, fail_closed, r, NULL) != 0) {
                osara_sched_future_unref(&r->f);
            }
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
