/* lua.c - the `osara.natsio_c` module: client(), the client userdata and
 * its methods (each area adds its own). lua/osara/nats.lua is the public
 * surface built on it. */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/mem.h"
#include "core/lvm.h"
#include "nats/natsio.h"
#include "nats/natsio_int.h"


/* client(conf, key, check) -> client (unconnected when check). conf: {servers=, name=, user=, password=,
 * token=, creds=, tls=, ca=}; servers "embedded" (default) starts a
 * nats-server child. Raises with nats.c's message. */
static int l_nats_client(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    const char *key = luaL_checkstring(L, 2);
    osara_vm_t *vm = osara_vm_from_L(L);
    osara_worker_t *w = vm->w;
    osara__nats_metrics_init();
    char skey[1024];
    snprintf(skey, sizeof(skey), "nats:%s", key);
    int checking = w->opts.mode == OSARA_MODE_CHECK || lua_toboolean(L, 3);
    nclient_t *c = checking ? NULL : osara_worker_shared_get(w, skey);
    if (c == NULL && !checking) {
        c = osara__nats_client_new(w, L, 1);
        if (c == NULL) {
            return luaL_error(L, "%s", osara_err_msg());
        }
        osara_worker_shared_put(w, skey, c, osara__nats_client_close);
    }
    client_ud_t *ud = lua_newuserdata(L, sizeof(*ud));
    ud->c = c;
    if (c) {
        osara__nats_client_ref(c); /* the userdata's, until __gc */
    }
    luaL_getmetatable(L, CLIENT_MT);
    lua_setmetatable(L, -2);
    return 1;
}

nclient_t *osara__nats_check_client(lua_State *L, int idx)
{
    client_ud_t *ud = luaL_checkudata(L, idx, CLIENT_MT);
    if (ud->c == NULL) {
        luaL_error(L, "nats: not connected (osara check mode)");
    }
    return ud->c;
}

typedef struct {
    uv_work_t work;
    nclient_t *c;
    int64_t ms;
    natsStatus status;
    osara_co_t *co; /* the waiter; NULL once cancelled */
    unsigned seq;
} nflush_wait_t;

static void flush_wait_work(uv_work_t *work)
{
    nflush_wait_t *f = work->data;
    f->status = natsConnection_FlushTimeout(f->c->nc, f->ms);
}

static int push_flush_result(lua_State *T, natsStatus s)
{
    if (s != NATS_OK) {
        lua_pushnil(T);
        lua_pushstring(T, natsStatus_GetText(s));
        return 2;
    }
    lua_pushboolean(T, 1);
    return 1;
}

static void flush_wait_after(uv_work_t *work, int status)
{
    (void)status;
    nflush_wait_t *f = work->data;
    if (f->co && osara_co_waiting(f->co) && osara_co_seq(f->co) == f->seq) {
        osara_sched_resume(f->co, push_flush_result(osara_co_thread(f->co), f->status));
    }
    osara__nats_job_end(f->c);
    free(f);
}

static void flush_wait_cleanup(void *data)
{
    ((nflush_wait_t *)data)->co = NULL;
}

/* client:flush([timeout]) -> true | nil, err: waits until the server
 * processed what was sent (a PING/PONG round trip in the thread pool).
 * Only inside a coroutine: at load it would block the loop. */
static int l_client_flush(lua_State *L)
{
    nclient_t *c = osara__nats_check_client(L, 1);
    int64_t ms = (int64_t)(luaL_optnumber(L, 2, 2) * 1000);
    osara_co_t *co = osara_sched_current(L);
    if (co == NULL) {
        return luaL_error(L, "nats:flush: only inside a handler, timer or task");
    }
    if (c->closing) {
        return osara__nats_push_closed(L, "flush");
    }
    nflush_wait_t *f = osara_xcalloc(1, sizeof(*f));
    f->c = c;
    f->ms = ms;
    f->co = co;
    f->seq = osara_co_seq(co) + 1;
    f->work.data = f;
    osara__nats_job_begin(c);
    if (uv_queue_work(&c->w->loop, &f->work, flush_wait_work, flush_wait_after) != 0) {
        osara__nats_job_end(c);
        free(f);
        return luaL_error(L, "nats:flush: cannot queue the flush");
    }
    return osara_sched_wait(L, 1, flush_wait_cleanup, f);
}

static int l_client_gc(lua_State *L)
{
    client_ud_t *ud = luaL_checkudata(L, 1, CLIENT_MT);
    if (ud->c) {
        osara__nats_client_unref(ud->c);
        ud->c = NULL;
    }
    return 0;
}

static int l_client_url(lua_State *L)
{
    client_ud_t *ud = luaL_checkudata(L, 1, CLIENT_MT);
    lua_pushstring(L, ud->c ? ud->c->url : "embedded");
    return 1;
}

/* client:health() -> nil when connected, else why not (for /readyz). */
static int l_client_health(lua_State *L)
{
    client_ud_t *ud = luaL_checkudata(L, 1, CLIENT_MT);
    nclient_t *c = ud->c;
    natsConnStatus st = c && !c->closing ? natsConnection_Status(c->nc) : NATS_CONN_STATUS_CLOSED;
    if (c && c->server_watch && c->server_pid == 0) {
        lua_pushliteral(L, "the embedded server is restarting");
    } else if (st == NATS_CONN_STATUS_CONNECTED && c->streams_pending > 0) {
        lua_pushliteral(L, "creating its JetStream streams");
    } else if (st == NATS_CONN_STATUS_CONNECTED) {
        lua_pushnil(L);
    } else {
        lua_pushstring(L, st == NATS_CONN_STATUS_RECONNECTING ? "reconnecting"
                          : st == NATS_CONN_STATUS_CONNECTING ? "connecting"
                          : st == NATS_CONN_STATUS_DISCONNECTED ? "disconnected"
                                                                : "closed");
    }
    return 1;
}

int osara_natsio_open(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"flush", l_client_flush},
        {"url", l_client_url},
        {"health", l_client_health},
        {NULL, NULL},
    };
    osara__nats_subs_open();
    luaL_newmetatable(L, CLIENT_MT);
    lua_pushcfunction(L, l_client_gc);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L); /* [mt, index] */
    luaL_register(L, NULL, methods);
    osara__nats_request_open(L, lua_gettop(L));
    osara__nats_js_open(L, lua_gettop(L));
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushcfunction(L, l_nats_client);
    lua_setfield(L, -2, "client");
    return 1;
}
