/* pool.c - connection pools and leases, shared by both drivers, and the
 * Lua binding `osara.sql_c`.
 *
 * acquire() hands out an idle connection at once, opens a new one while
 * fewer than `size` are open, or parks the coroutine in a FIFO until a
 * connection comes back or `timeout` runs out. Connections come back from
 * Lua code (release, __gc), so handing them to the next waiter waits for
 * the next loop turn (an idle handle) when no Lua code runs. A connection
 * that breaks schedules a reconnect with backoff (0.1 s doubling to 2 s);
 * while nothing is open and the last attempt failed, acquire fails at once
 * with the last error instead of waiting. */
#include <dirent.h>
#include <errno.h>
#include <lauxlib.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/log.h"
#include "core/lvm.h"
#include "core/mem.h"
#include "core/metrics.h"
#include "sql/sql.h"
#include "sql/sql_int.h"

#define POOL_MT "osara.sql_pool"
#define LEASE_MT "osara.sql_lease"

static const double BACKOFF_MIN = 0.1, BACKOFF_MAX = 2.0;

typedef struct {
    sql_pool_t *pool;
} pool_handle_t;

typedef struct {
    sql_conn_t *conn;
    sql_pool_t *pool;
} sql_lease_t;

static void dispatch(sql_pool_t *pool);
static void schedule_reconnect(sql_pool_t *pool);

/* ---- statements cache ------------------------------------------------------ */

static unsigned hash_sql(const char *s)
{
    unsigned h = 2166136261u; /* FNV-1a */
    for (; *s; s++) {
        h = (h ^ (unsigned char)*s) * 16777619u;
    }
    return h % SQL_STMT_BUCKETS;
}

sql_stmt_t *osara__sql_stmt_find(sql_conn_t *conn, const char *sql)
{
    for (sql_stmt_t *st = conn->stmts[hash_sql(sql)]; st; st = st->next) {
        if (strcmp(st->sql, sql) == 0) {
            return st;
        }
    }
    return NULL;
}

void *osara__sql_stmt_remove(sql_conn_t *conn, const char *sql)
{
    for (sql_stmt_t **p = &conn->stmts[hash_sql(sql)]; *p; p = &(*p)->next) {
        sql_stmt_t *st = *p;
        if (strcmp(st->sql, sql) == 0) {
            void *handle = st->handle;
            *p = st->next;
            conn->nstmts--;
            free(st->sql);
            free(st);
            return handle;
        }
    }
    return NULL;
}

sql_stmt_t *osara__sql_stmt_add(sql_conn_t *conn, const char *sql, void *handle)
{
    if (conn->nstmts >= SQL_STMT_MAX) {
        return NULL;
    }
    sql_stmt_t *st = osara_xcalloc(1, sizeof(*st));
    st->sql = osara_xstrdup(sql);
    st->handle = handle;
    st->id = ++conn->next_stmt_id;
    unsigned b = hash_sql(sql);
    st->next = conn->stmts[b];
    conn->stmts[b] = st;
    conn->nstmts++;
    return st;
}

/* ---- values ---------------------------------------------------------------- */

void osara__sql_push_int(lua_State *L, long long v, const char *text)
{
    if (v <= (1LL << 53) && v >= -(1LL << 53)) {
        lua_pushnumber(L, (lua_Number)v);
    } else if (text) {
        lua_pushstring(L, text);
    } else {
        char buf[24];
        snprintf(buf, sizeof(buf), "%lld", v);
        lua_pushstring(L, buf);
    }
}

const char *osara__sql_param_text(lua_State *L, int idx, char *buf, size_t cap,
                                  size_t *len)
{
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        return NULL;
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == NULL) { /* osara.null / cjson.null */
            return NULL;
        }
        break;
    case LUA_TBOOLEAN:
        *len = lua_toboolean(L, idx) ? 4 : 5;
        return lua_toboolean(L, idx) ? "true" : "false";
    case LUA_TNUMBER: {
        double d = lua_tonumber(L, idx);
        if (d == floor(d) && fabs(d) < 9.2e18) {
            *len = (size_t)snprintf(buf, cap, "%lld", (long long)d);
        } else {
            *len = (size_t)snprintf(buf, cap, "%.17g", d);
        }
        return buf;
    }
    case LUA_TSTRING:
        return lua_tolstring(L, idx, len);
    default:
        break;
    }
    luaL_error(L, "osara.sql: parameter $%d must be a string, number, boolean, "
                  "nil or osara.null, got %s",
               idx - 3, luaL_typename(L, idx));
    return NULL;
}

/* ---- pool lifetime --------------------------------------------------------- */

static void pool_ref(sql_pool_t *pool) { pool->refs++; }

static void close_conn(sql_conn_t *conn)
{
    conn->pool->nopen--;
    if (conn->pool->driver == SQL_PG) {
        osara__sql_pg_close(conn);
    } else {
        osara__sql_lite_close(conn);
    }
}

static void timer_closed(uv_handle_t *h) { free(h); } /* timers and idles */

static void pool_unref(sql_pool_t *pool)
{
    if (--pool->refs > 0) {
        return;
    }
    while (pool->idle) {
        sql_conn_t *conn = pool->idle;
        pool->idle = conn->next_idle;
        close_conn(conn);
    }
    /* (At exit the worker may have closed them already: they leak then.) */
    if (pool->reconnect && !uv_is_closing((uv_handle_t *)pool->reconnect)) {
        uv_close((uv_handle_t *)pool->reconnect, timer_closed);
    }
    if (pool->dispatcher && !uv_is_closing((uv_handle_t *)pool->dispatcher)) {
        uv_close((uv_handle_t *)pool->dispatcher, timer_closed);
    }
    free(pool->target);
    free(pool->label);
    free(pool);
}

static void pool_shared_close(void *ptr) { pool_unref(ptr); }

void osara__sql_conn_free(sql_conn_t *conn)
{
    for (int b = 0; b < SQL_STMT_BUCKETS; b++) {
        sql_stmt_t *st = conn->stmts[b];
        while (st) {
            sql_stmt_t *next = st->next;
            free(st->sql);
            free(st);
            st = next;
        }
    }
    free(conn);
}

/* ---- connections ----------------------------------------------------------- */

static void open_conn(sql_pool_t *pool)
{
    sql_conn_t *conn = osara_xcalloc(1, sizeof(*conn));
    conn->pool = pool;
    conn->fd = -1;
    conn->connecting = 1;
    pool->nopen++;
    pool_ref(pool); /* while connecting */
    if (pool->driver == SQL_PG) {
        osara__sql_pg_connect(conn);
    } else {
        osara__sql_lite_connect(conn);
    }
}

static void push_idle(sql_pool_t *pool, sql_conn_t *conn)
{
    conn->next_idle = pool->idle;
    pool->idle = conn;
}

static void fail_waiters(sql_pool_t *pool, const char *msg)
{
    while (pool->waits) {
        sql_wait_t *wt = pool->waits;
        pool->waits = wt->next;
        osara_co_t *co = osara_sched_waiter_current(&wt->waiter);
        free(wt);
        if (co) {
            lua_State *T = osara_co_thread(co);
            lua_pushnil(T);
            lua_pushstring(T, msg);
            osara_sched_resume_later(co, 2);
        }
    }
    pool->waits_tail = NULL;
}

void osara__sql_conn_ready(sql_conn_t *conn, int ok, const char *err)
{
    sql_pool_t *pool = conn->pool;
    conn->connecting = 0;
    if (ok) {
        if (pool->down || pool->backoff > 0) {
            OSARA_INFO("sql: connected to %s again", pool->label);
        }
        pool->down = 0;
        pool->backoff = 0;
        push_idle(pool, conn);
        dispatch(pool);
    } else {
        snprintf(pool->last_err, sizeof(pool->last_err), "%s", err);
        osara_metric_add(pool->m_connect_failures, 1);
        pool->nopen--;
        osara__sql_conn_free(conn);
        if (pool->driver == SQL_PG) {
            if (!pool->down) {
                OSARA_WARN("sql: cannot connect to %s: %s (retrying with backoff)",
                           pool->label, err);
            }
            if (pool->nopen == 0) {
                pool->down = 1;
                char msg[320];
                snprintf(msg, sizeof(msg), "sql: cannot connect to %s: %s", pool->label, err);
                fail_waiters(pool, msg);
            }
            schedule_reconnect(pool);
        }
    }
    pool_unref(pool); /* the connecting reference */
}

void osara__sql_conn_broken(sql_conn_t *conn, const char *why)
{
    sql_pool_t *pool = conn->pool;
    if (conn->broken) {
        return;
    }
    conn->broken = 1;
    osara_metric_add(pool->m_lost, 1);
    snprintf(pool->last_err, sizeof(pool->last_err), "%s", why);
    OSARA_WARN("sql: connection to %s lost: %s (reconnecting)", pool->label, why);
    if (!conn->leased) {
        for (sql_conn_t **p = &pool->idle; *p; p = &(*p)->next_idle) {
            if (*p == conn) {
                *p = conn->next_idle;
                break;
            }
        }
        close_conn(conn);
    }
    schedule_reconnect(pool);
}

static void on_reconnect(uv_timer_t *t)
{
    sql_pool_t *pool = t->data;
    pool->backoff = pool->backoff ? fmin(pool->backoff * 2, BACKOFF_MAX) : BACKOFF_MIN;
    if (pool->nopen < pool->size) {
        open_conn(pool);
    }
}

static void schedule_reconnect(sql_pool_t *pool)
{
    if (pool->reconnect == NULL) {
        pool->reconnect = osara_xmalloc(sizeof(*pool->reconnect));
        uv_timer_init(&pool->w->loop, pool->reconnect);
        pool->reconnect->data = pool;
    }
    if (uv_is_active((uv_handle_t *)pool->reconnect)) {
        return;
    }
    double delay = pool->backoff ? pool->backoff : BACKOFF_MIN;
    uv_timer_start(pool->reconnect, on_reconnect, (uint64_t)(delay * 1000), 0);
}

/* ---- leases ------------------------------------------------------------------ */

static void push_lease(lua_State *L, sql_pool_t *pool, sql_conn_t *conn)
{
    sql_lease_t *lease = lua_newuserdata(L, sizeof(*lease));
    lease->conn = conn;
    lease->pool = pool;
    conn->leased = 1;
    pool_ref(pool);
    osara_metric_add(pool->m_acquires, 1);
    luaL_getmetatable(L, LEASE_MT);
    lua_setmetatable(L, -2); /* [lease] */
}

static sql_conn_t *take_idle(sql_pool_t *pool)
{
    sql_conn_t *conn = pool->idle;
    pool->idle = conn->next_idle;
    conn->next_idle = NULL;
    return conn;
}

static void on_dispatch(uv_idle_t *h)
{
    sql_pool_t *pool = h->data;
    uv_idle_stop(h);
    pool->dispatch_posted = 0;
    dispatch(pool);
    pool_unref(pool);
}

/* Hands idle connections to waiters in arrival order. The caller holds a
 * reference (the resumed Lua code may drop every other one). */
static void dispatch(sql_pool_t *pool)
{
    while (pool->idle && pool->waits) {
        sql_wait_t *wt = pool->waits;
        pool->waits = wt->next;
        if (pool->waits) {
            pool->waits->prev = NULL;
        } else {
            pool->waits_tail = NULL;
        }
        osara_co_t *co = osara_sched_waiter_current(&wt->waiter);
        free(wt);
        if (co == NULL) {
            continue;
        }
        push_lease(osara_co_thread(co), pool, take_idle(pool));
        if (osara_sched_running() != NULL) {
            osara_sched_resume_later(co, 1); /* called from Lua (SQLite) */
        } else {
            osara_sched_resume(co, 1);
        }
    }
}

/* Dispatches on the next loop turn, when no Lua code runs: an idle handle
 * (no syscall, unlike a post to the inbox, which writes its eventfd). */
static void dispatch_later(sql_pool_t *pool)
{
    if (pool->dispatch_posted || pool->waits == NULL) {
        return;
    }
    if (pool->dispatcher == NULL) {
        pool->dispatcher = osara_xmalloc(sizeof(*pool->dispatcher));
        uv_idle_init(&pool->w->loop, pool->dispatcher);
        pool->dispatcher->data = pool;
    }
    if (uv_is_closing((uv_handle_t *)pool->dispatcher)) {
        return; /* the worker is stopping */
    }
    uv_idle_start(pool->dispatcher, on_dispatch);
    pool_ref(pool); /* dropped by on_dispatch */
    pool->dispatch_posted = 1;
}

static int reusable(sql_conn_t *conn)
{
    if (conn->broken || conn->busy) {
        return 0;
    }
    return conn->pool->driver == SQL_PG ? osara__sql_pg_reusable(conn)
                                        : osara__sql_lite_reusable(conn);
}

static void lease_release(sql_lease_t *lease)
{
    sql_conn_t *conn = lease->conn;
    sql_pool_t *pool = lease->pool;
    if (conn == NULL) {
        return;
    }
    lease->conn = NULL;
    conn->leased = 0;
    if (reusable(conn)) {
        push_idle(pool, conn);
        dispatch_later(pool);
    } else {
        close_conn(conn);
        if (!pool->waits || pool->nopen >= pool->size) {
            /* nothing to do: waiters are served by the next release */
        } else if (!pool->down) {
            open_conn(pool); /* a waiter gets the replacement */
        }
    }
    pool_unref(pool);
}

static sql_lease_t *check_lease(lua_State *L)
{
    sql_lease_t *lease = luaL_checkudata(L, 1, LEASE_MT);
    if (lease->conn == NULL) {
        luaL_error(L, "osara.sql: connection used after it was released "
                      "(a transaction object used after db:tx returned?)");
    }
    return lease;
}

static const char *const mode_names[] = {"rows", "exec", "script", NULL};

/* lease:run(sql, mode, ...) -> rows | affected, last_id | true | nil, err */
static int l_lease_run(lua_State *L)
{
    sql_lease_t *lease = check_lease(L);
    const char *sql = luaL_checkstring(L, 2);
    sql_mode_t mode = (sql_mode_t)luaL_checkoption(L, 3, NULL, mode_names);
    int nparams = lua_gettop(L) - 3;
    sql_conn_t *conn = lease->conn;
    if (conn->busy) {
        return luaL_error(L, "osara.sql: connection busy (one query at a time per "
                             "transaction)");
    }
    if (mode == SQL_SCRIPT && nparams > 0) {
        return luaL_error(L, "osara.sql: a script takes no parameters");
    }
    if (conn->broken) {
        lua_pushnil(L);
        lua_pushfstring(L, "sql: connection to %s lost: %s", lease->pool->label,
                        lease->pool->last_err);
        return 2;
    }
    if (lease->pool->driver == SQL_PG) {
        return osara__sql_pg_run(L, conn, sql, mode, 4, nparams, 1);
    }
    return osara__sql_lite_run(L, conn, sql, mode, 4, nparams);
}

static int l_lease_release(lua_State *L)
{
    sql_lease_t *lease = luaL_checkudata(L, 1, LEASE_MT);
    lease_release(lease);
    return 0;
}

/* ---- pool handles and acquire ------------------------------------------------- */

static sql_pool_t *check_pool(lua_State *L)
{
    return ((pool_handle_t *)luaL_checkudata(L, 1, POOL_MT))->pool;
}

static void wait_remove(sql_wait_t *wt)
{
    sql_pool_t *pool = wt->pool;
    if (wt->prev) {
        wt->prev->next = wt->next;
    } else {
        pool->waits = wt->next;
    }
    if (wt->next) {
        wt->next->prev = wt->prev;
    } else {
        pool->waits_tail = wt->prev;
    }
    free(wt);
}

static void wait_cleanup(void *data) { wait_remove(data); }

static int push_exhausted(lua_State *T, void *data)
{
    sql_pool_t *pool = ((sql_wait_t *)data)->pool;
    osara_metric_add(pool->m_timeouts, 1);
    lua_pushnil(T);
    lua_pushfstring(T, "sql: pool exhausted: no connection to %s free within %f s "
                       "(pool_size %d, pool_timeout %f)",
                    pool->label, pool->timeout, pool->size, pool->timeout);
    return 2;
}

static int push_unavailable(lua_State *L, sql_pool_t *pool)
{
    lua_pushnil(L);
    lua_pushfstring(L, "sql: %s unavailable (reconnecting): %s", pool->label,
                    pool->last_err);
    return 2;
}

/* pool:acquire() -> lease | nil, err. Waits (yields) for a connection when
 * none is idle or others wait already (first come, first served: a
 * newcomer never takes the connection a waiter is about to get); raises
 * when it would have to wait outside a coroutine. */
static int l_pool_acquire(lua_State *L)
{
    sql_pool_t *pool = check_pool(L);
    if (pool->idle == NULL && pool->nopen < pool->size) {
        if (pool->down) {
            return push_unavailable(L, pool);
        }
        open_conn(pool); /* SQLite: done now; Postgres: later */
        if (pool->idle == NULL && pool->driver == SQL_SQLITE) {
            lua_pushnil(L);
            lua_pushstring(L, pool->last_err);
            return 2;
        }
    }
    if (pool->idle && pool->waits == NULL) { /* waiters first: no barging */
        push_lease(L, pool, take_idle(pool));
        return 1;
    }
    sql_wait_t *wt = osara_xcalloc(1, sizeof(*wt));
    if (osara_sched_waiter_set(&wt->waiter, L) != 0) {
        free(wt);
        return luaL_error(L, "osara.sql: cannot wait for a connection here: only "
                             "inside a handler, timer or task (not at load time)");
    }
    wt->pool = pool;
    wt->prev = pool->waits_tail;
    if (pool->waits_tail) {
        pool->waits_tail->next = wt;
    } else {
        pool->waits = wt;
    }
    pool->waits_tail = wt;
    osara_metric_add(pool->m_waits, 1);
    if (pool->idle) {
        dispatch_later(pool); /* the idle connection goes to the first waiter */
    }
    return osara_sched_wait_for(L, 1, pool->timeout, wait_cleanup, wt, push_exhausted);
}

/* pool:stats() -> { size, open, idle, waiting, down, checkpoints } */
static int l_pool_stats(lua_State *L)
{
    sql_pool_t *pool = check_pool(L);
    int nidle = 0, nwait = 0;
    for (sql_conn_t *c = pool->idle; c; c = c->next_idle) {
        nidle++;
    }
    for (sql_wait_t *wt = pool->waits; wt; wt = wt->next) {
        nwait++;
    }
    osara_lua_push_stats(L, (osara_lua_stat_t[]){
        {"size", pool->size}, {"open", pool->nopen}, {"idle", nidle},
        {"waiting", nwait}, {"checkpoints", (double)pool->checkpoints},
    }, 5);
    lua_pushboolean(L, pool->down);
    lua_setfield(L, -2, "down");
    return 1;
}

static int l_pool_gc(lua_State *L)
{
    pool_handle_t *h = luaL_checkudata(L, 1, POOL_MT);
    if (h->pool) {
        pool_unref(h->pool);
        h->pool = NULL;
    }
    return 0;
}

/* The pool's counters, labelled db="<url without password>". */
static void pool_metrics(sql_pool_t *pool)
{
    char labels[600] = "db=\"";
    size_t n = strlen(labels);
    for (const char *c = pool->label; *c && n + 3 < sizeof(labels); c++) {
        if (*c == '"' || *c == '\\') {
            labels[n++] = '\\';
        }
        labels[n++] = *c;
    }
    labels[n++] = '"';
    labels[n] = '\0';
    pool->m_acquires = osara_metrics_counter("osara_sql_acquires_total",
        "connections taken from the pool (one per query or transaction)", labels);
    pool->m_waits = osara_metrics_counter("osara_sql_pool_waits_total",
        "acquires that had to wait for a connection", labels);
    pool->m_timeouts = osara_metrics_counter("osara_sql_pool_timeouts_total",
        "acquires that gave up after pool_timeout (pool exhausted)", labels);
    pool->m_lost = osara_metrics_counter("osara_sql_connections_lost_total",
        "connections the server closed or that broke", labels);
    pool->m_connect_failures = osara_metrics_counter("osara_sql_connect_failures_total",
        "connection attempts that failed", labels);
    pool->m_checkpoints = osara_metrics_counter("osara_sql_checkpoints_total",
        "SQLite WAL checkpoints run on the thread pool", labels);
}

static sql_pool_t *pool_new(osara_worker_t *w, sql_driver_t driver, const char *target,
                            const char *label, int size, double timeout)
{
    sql_pool_t *pool = osara_xcalloc(1, sizeof(*pool));
    pool->driver = driver;
    pool->target = osara_xstrdup(target);
    pool->label = osara_xstrdup(label);
    pool->size = size;
    pool->timeout = timeout;
    pool->w = w;
    pool->refs = 1; /* the worker's shared entry */
    pool_metrics(pool);
    return pool;
}

/* pool(driver, target, label, size, timeout[, min]) -> pool handle. One
 * pool per worker and (driver, target, size, timeout): it survives reloads.
 * min: connections to start opening now (Postgres), before any query. */
static int l_sql_pool(lua_State *L)
{
    static const char *const drivers[] = {"sqlite", "postgres", NULL};
    sql_driver_t driver = (sql_driver_t)luaL_checkoption(L, 1, NULL, drivers);
    const char *target = luaL_checkstring(L, 2);
    const char *label = luaL_checkstring(L, 3);
    int size = (int)luaL_checkinteger(L, 4);
    double timeout = luaL_checknumber(L, 5);
    int min = (int)luaL_optinteger(L, 6, 0);
    osara_worker_t *w = osara_worker_from_L(L);
    luaL_argcheck(L, size >= 1, 4, "pool_size must be >= 1");
    char key[1200];
    snprintf(key, sizeof(key), "sql %s %s size=%d timeout=%g", drivers[driver], target,
             size, timeout);
    sql_pool_t *pool = osara_worker_shared_get(w, key);
    if (pool == NULL) {
        pool = pool_new(w, driver, target, label, size, timeout);
        osara_worker_shared_put(w, key, pool, pool_shared_close);
    }
    while (driver == SQL_PG && pool->nopen < min && pool->nopen < size && !pool->down) {
        open_conn(pool); /* ready (idle) before the first query needs it */
    }
    pool_handle_t *h = lua_newuserdata(L, sizeof(*h));
    h->pool = pool;
    pool_ref(pool);
    luaL_getmetatable(L, POOL_MT);
    lua_setmetatable(L, -2);
    return 1;
}

/* listdir(path) -> { names... } | nil, err (unsorted, no dot entries) */
static int l_sql_listdir(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    DIR *d = opendir(path);
    if (d == NULL) {
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s", path, strerror(errno));
        return 2;
    }
    lua_newtable(L);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] != '.') {
            lua_pushstring(L, e->d_name);
            lua_rawseti(L, -2, ++n);
        }
    }
    closedir(d);
    return 1;
}

static int l_lease_gc(lua_State *L)
{
    lease_release(luaL_checkudata(L, 1, LEASE_MT));
    return 0;
}

int osara_sql_open(lua_State *L)
{
    static const luaL_Reg pool_methods[] = {
        {"acquire", l_pool_acquire}, {"stats", l_pool_stats}, {NULL, NULL}};
    static const luaL_Reg lease_methods[] = {
        {"run", l_lease_run}, {"release", l_lease_release}, {NULL, NULL}};
    static const luaL_Reg fns[] = {
        {"pool", l_sql_pool}, {"listdir", l_sql_listdir}, {NULL, NULL}};
    osara_lua_newclass(L, POOL_MT, pool_methods, l_pool_gc, NULL);
    osara_lua_newclass(L, LEASE_MT, lease_methods, l_lease_gc, NULL);
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
