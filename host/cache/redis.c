/* redis.c - a redis client on the worker's loop (hiredis + its libuv adapter).
 *
 * One connection per client, pipelined: commands are written at once and
 * the replies come back in order. A command yields its coroutine on a
 * future; the reply callback copies the reply (hiredis frees its own after
 * the callback) and completes the future. A connection that fails is not
 * retried for a second, so a server that is down costs one refused connect
 * per second, not one per command. */
#include <hiredis/adapters/libuv.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache/cache_int.h"
#include "core/mem.h"
#include "core/sched.h"
#include "core/worker.h"

#define REDIS_MT "osara.redis"
#define RETRY_AFTER 1.0 /* seconds between connection attempts once down */

typedef struct {
    int refs;   /* the worker's shared list + one per Lua handle */
    int closed;
    uv_loop_t *loop;
    redisAsyncContext *ac; /* NULL while disconnected */
    uv_timer_t *connect_timer;
    char *host, *password;
    int port, db;
    double timeout;
    double retry_at; /* monotonic: no new connection before */
    char err[200];   /* why the last connection failed */
} redis_t;

typedef struct reply_s {
    int type;
    long long integer;
    char *str;
    size_t len, nel;
    struct reply_s **el;
} reply_t;

typedef struct {
    osara_sched_future_t fut;
    int single;         /* call (one reply) rather than pipeline */
    int n, got;         /* commands sent, replies received */
    reply_t **replies;
    char *err;          /* connection-level failure, if any */
} rreq_t;

typedef struct {
    redis_t *rc;
} redis_ud_t;

/* ---- replies ---------------------------------------------------------------- */

static reply_t *reply_copy(const redisReply *r)
{
    reply_t *c = osara_xcalloc(1, sizeof(*c));
    c->type = r->type;
    c->integer = r->integer;
    if (r->str) {
        c->str = osara_xmalloc(r->len + 1);
        memcpy(c->str, r->str, r->len);
        c->str[r->len] = '\0';
        c->len = r->len;
    }
    if (r->type == REDIS_REPLY_ARRAY && r->elements > 0) {
        c->nel = r->elements;
        c->el = osara_xcalloc(r->elements, sizeof(*c->el));
        for (size_t i = 0; i < r->elements; i++) {
            c->el[i] = reply_copy(r->element[i]);
        }
    }
    return c;
}

static void reply_free(reply_t *c)
{
    if (c == NULL) {
        return;
    }
    for (size_t i = 0; i < c->nel; i++) {
        reply_free(c->el[i]);
    }
    free(c->el);
    free(c->str);
    free(c);
}

/* Pushes one reply as a Lua value; an error reply pushes nil and sets *err. */
static void push_reply(lua_State *L, const reply_t *c, const char **err)
{
    switch (c->type) {
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS:
        lua_pushlstring(L, c->str, c->len);
        break;
    case REDIS_REPLY_INTEGER:
        lua_pushnumber(L, (lua_Number)c->integer);
        break;
    case REDIS_REPLY_ARRAY:
        lua_createtable(L, (int)c->nel, 1);
        for (size_t i = 0; i < c->nel; i++) {
            push_reply(L, c->el[i], err);
            lua_rawseti(L, -2, (int)i + 1);
        }
        lua_pushinteger(L, (lua_Integer)c->nel);
        lua_setfield(L, -2, "n");
        break;
    case REDIS_REPLY_ERROR:
        if (*err == NULL) {
            *err = c->str;
        }
        lua_pushnil(L);
        break;
    default:
        lua_pushnil(L);
    }
}

/* Results of a finished request: call -> reply | nil, err;
 * pipeline -> { replies, n = } | nil, first error. */
static int push_results(lua_State *L, void *ud)
{
    rreq_t *req = ud;
    const char *err = req->err;
    int top = lua_gettop(L);
    if (req->single && err == NULL) {
        push_reply(L, req->replies[0], &err);
    } else if (err == NULL) {
        lua_createtable(L, req->n, 1);
        for (int i = 0; i < req->n; i++) {
            push_reply(L, req->replies[i], &err);
            lua_rawseti(L, -2, i + 1);
        }
        lua_pushinteger(L, req->n);
        lua_setfield(L, -2, "n");
    }
    if (err != NULL) {
        lua_settop(L, top);
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    return 1;
}

static void req_free(osara_sched_future_t *f)
{
    rreq_t *req = (rreq_t *)f;
    for (int i = 0; i < req->n; i++) {
        reply_free(req->replies[i]);
    }
    free(req->replies);
    free(req->err);
    free(req);
}

static void req_fail(rreq_t *req, const char *host, int port, const char *why)
{
    if (req->err == NULL) {
        char buf[300];
        snprintf(buf, sizeof(buf), "redis %s:%d: %s", host, port, why);
        req->err = osara_xstrdup(buf);
    }
}

/* One reply (or NULL when the connection failed or closed). */
static void on_reply(redisAsyncContext *ac, void *r, void *privdata)
{
    rreq_t *req = privdata;
    redis_t *rc = ac->data;
    int i = req->got++;
    if (r != NULL) {
        req->replies[i] = reply_copy(r);
    } else {
        req_fail(req, rc->host, rc->port, ac->errstr[0] ? ac->errstr : "connection lost");
    }
    if (req->got == req->n) {
        osara_sched_future_complete(&req->fut, push_results, req);
        osara_sched_future_unref(&req->fut); /* the in-flight reference */
    }
}

/* ---- connection --------------------------------------------------------------- */

static void connect_timer_closed(uv_handle_t *h)
{
    free(h);
}

static void stop_connect_timer(redis_t *rc)
{
    if (rc->connect_timer) {
        uv_close((uv_handle_t *)rc->connect_timer, connect_timer_closed);
        rc->connect_timer = NULL;
    }
}

static void mark_down(redis_t *rc, const char *why)
{
    snprintf(rc->err, sizeof(rc->err), "%s", why);
    rc->retry_at = osara_monotonic() + RETRY_AFTER;
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    redis_t *rc = ac->data;
    stop_connect_timer(rc);
    if (status != REDIS_OK) {
        mark_down(rc, ac->errstr[0] ? ac->errstr : "cannot connect");
        rc->ac = NULL; /* hiredis frees it after this callback */
    }
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    redis_t *rc = ac->data;
    stop_connect_timer(rc);
    rc->ac = NULL;
    if (status != REDIS_OK) {
        mark_down(rc, ac->errstr[0] ? ac->errstr : "connection lost");
    }
}

/* The adapter cannot report every connect failure (a poll error is
 * dropped), so a connection not up within the timeout is given up. */
static void on_connect_timeout(uv_timer_t *t)
{
    redis_t *rc = t->data;
    stop_connect_timer(rc);
    if (rc->ac != NULL && !(rc->ac->c.flags & REDIS_CONNECTED)) {
        redisAsyncContext *ac = rc->ac;
        rc->ac = NULL;
        mark_down(rc, "connect timed out");
        redisAsyncFree(ac); /* pending commands get their NULL reply */
    }
}

static int redis_connect(redis_t *rc)
{
    if (rc->ac != NULL) {
        return 0;
    }
    if (osara_monotonic() < rc->retry_at) {
        return -1;
    }
    redisAsyncContext *ac = redisAsyncConnect(rc->host, rc->port);
    if (ac == NULL || ac->err) {
        mark_down(rc, ac ? ac->errstr : "out of memory");
        if (ac) {
            redisAsyncFree(ac);
        }
        return -1;
    }
    ac->data = rc;
    redisLibuvAttach(ac, rc->loop);
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    rc->ac = ac;
    rc->connect_timer = osara_xmalloc(sizeof(*rc->connect_timer));
    uv_timer_init(rc->loop, rc->connect_timer);
    rc->connect_timer->data = rc;
    uv_timer_start(rc->connect_timer, on_connect_timeout,
                   (uint64_t)(rc->timeout * 1000 + 0.5), 0);
    /* Queued before any user command, so they run first on this connection. */
    if (rc->password) {
        redisAsyncCommand(ac, NULL, NULL, "AUTH %s", rc->password);
    }
    if (rc->db) {
        redisAsyncCommand(ac, NULL, NULL, "SELECT %d", rc->db);
    }
    return 0;
}

static void redis_unref(redis_t *rc)
{
    if (--rc->refs > 0) {
        return;
    }
    free(rc->host);
    free(rc->password);
    free(rc);
}

/* The worker's shared list lets go (reload without it, or stop). */
static void redis_close(void *ptr)
{
    redis_t *rc = ptr;
    rc->closed = 1;
    stop_connect_timer(rc);
    if (rc->ac != NULL) {
        redisAsyncContext *ac = rc->ac;
        rc->ac = NULL;
        redisAsyncFree(ac); /* pending commands get their NULL reply */
    }
    redis_unref(rc);
}

/* ---- sending ---------------------------------------------------------------- */

/* Sends the command array at `idx`; a command that cannot be queued counts
 * as a failed reply at once. */
static void send_command(lua_State *L, redis_t *rc, rreq_t *req, int idx)
{
    const char **argv;
    size_t *lens;
    int argc = osara__cache_strings(L, idx, "redis command", &argv, &lens);
    int rc_send = argc > 0 && rc->ac != NULL
                      ? redisAsyncCommandArgv(rc->ac, on_reply, req, argc, argv, lens)
                      : REDIS_ERR;
    free(argv);
    free(lens);
    if (rc_send != REDIS_OK) {
        req->got++;
        req_fail(req, rc->host, rc->port, argc > 0 ? "cannot send" : "empty command");
    }
}

/* Starts req's commands (the table at idx: one command, or a list of them)
 * and waits for the replies. */
static int send_and_wait(lua_State *L, redis_t *rc, int single, int idx)
{
    int n = single ? 1 : (int)lua_objlen(L, idx);
    rreq_t *req = osara_xcalloc(1, sizeof(*req));
    osara_sched_future_init(&req->fut, req_free);
    req->single = single;
    req->n = n;
    req->replies = osara_xcalloc(n ? n : 1, sizeof(*req->replies));
    /* Ours until the wait took its own (the first is the in-flight one). */
    osara_sched_future_ref(&req->fut);
    if (rc->closed) {
        req->got = n;
        req_fail(req, rc->host, rc->port, "closed");
    } else if (redis_connect(rc) != 0) {
        req->got = n;
        req_fail(req, rc->host, rc->port, rc->err);
    } else if (single) {
        send_command(L, rc, req, idx);
    } else {
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, idx, i); /* [..., cmd] */
            send_command(L, rc, req, lua_gettop(L));
            lua_pop(L, 1);
        }
    }
    if (req->got == n) { /* nothing in flight: complete now */
        osara_sched_future_complete(&req->fut, push_results, req);
        osara_sched_future_unref(&req->fut);
    }
    int nret = osara_sched_future_wait(L, &req->fut, 0, rc->timeout);
    osara_sched_future_unref(&req->fut);
    return nret;
}

/* ---- Lua -------------------------------------------------------------------- */

static redis_t *check_client(lua_State *L)
{
    redis_ud_t *ud = luaL_checkudata(L, 1, REDIS_MT);
    return ud->rc;
}

/* client:call({cmd, args...}) -> reply | nil, err */
static int l_call(lua_State *L)
{
    redis_t *rc = check_client(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    return send_and_wait(L, rc, 1, 2);
}

/* client:pipeline({{cmd...}, ...}) -> { replies..., n = } | nil, err */
static int l_pipeline(lua_State *L)
{
    redis_t *rc = check_client(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    return send_and_wait(L, rc, 0, 2);
}

static int l_gc(lua_State *L)
{
    redis_ud_t *ud = luaL_checkudata(L, 1, REDIS_MT);
    if (ud->rc) {
        redis_unref(ud->rc);
        ud->rc = NULL;
    }
    return 0;
}

static redis_t *redis_new(osara_worker_t *w, const char *host, int port, int db,
                          const char *password, double timeout)
{
    redis_t *rc = osara_xcalloc(1, sizeof(*rc));
    rc->refs = 1; /* the shared list's */
    rc->loop = &w->loop;
    rc->host = osara_xstrdup(host);
    rc->password = password ? osara_xstrdup(password) : NULL;
    rc->port = port;
    rc->db = db;
    rc->timeout = timeout;
    return rc;
}

/* redis(key, host, port, db, password, timeout) -> client (shared by key) */
static int l_redis(lua_State *L)
{
    const char *key = luaL_checkstring(L, 1);
    const char *host = luaL_checkstring(L, 2);
    int port = (int)luaL_checkinteger(L, 3);
    int db = (int)luaL_optinteger(L, 4, 0);
    const char *password = luaL_optstring(L, 5, NULL);
    double timeout = luaL_optnumber(L, 6, 1.0);
    osara_worker_t *w = osara_worker_from_L(L);
    char skey[512];
    snprintf(skey, sizeof(skey), "redis %s", key);
    redis_t *rc = osara_worker_shared_get(w, skey);
    if (rc == NULL) {
        rc = redis_new(w, host, port, db, password, timeout);
        osara_worker_shared_put(w, skey, rc, redis_close);
    }
    redis_ud_t *ud = lua_newuserdata(L, sizeof(*ud)); /* [..., ud] */
    ud->rc = rc;
    rc->refs++;
    luaL_getmetatable(L, REDIS_MT);
    lua_setmetatable(L, -2);
    return 1;
}

void osara__redis_register(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"call", l_call}, {"pipeline", l_pipeline}, {NULL, NULL}};
    osara__cache_register(L, REDIS_MT, methods, l_gc, "redis", l_redis);
}
