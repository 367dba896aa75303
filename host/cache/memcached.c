/* memcached.c - memcached through libmemcached, off the loop.
 *
 * libmemcached is blocking, so each client owns a thread with its own
 * memcached_st (ketama consistent hashing over the hosts, bounded connect
 * and I/O timeouts). A call copies its keys and values into a job, queues
 * it and yields on the job's future; the thread runs the job and posts it
 * to the worker's inbox, whose handler completes the future on the loop
 * thread. Lua never runs on the client thread, and the thread never
 * touches Lua. Why libmemcached and not the protocol on a uv_tcp_t: see
 * docs/cache.md. */
#include <lauxlib.h>
#include <libmemcached/memcached.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache/cache_int.h"
#include "core/log.h"
#include "core/mem.h"
#include "core/sched.h"
#include "core/worker.h"

#define MC_MT "osara.memcached"

enum { OP_GET, OP_SET, OP_DELETE };

typedef struct mc_job_s {
    osara_sched_future_t fut;
    struct mc_job_s *next;
    int op, n;
    char **keys, **vals; /* vals: set's input, get's output (NULL: miss) */
    size_t *klens, *vlens;
    time_t expire;
    char *err;
} mc_job_t;

typedef struct {
    int refs; /* the worker's shared list + one per Lua handle */
    int closed;
    osara_inbox_t *inbox;
    memcached_st *mc; /* used by the thread only */
    uv_thread_t thread;
    uv_mutex_t mu;
    uv_cond_t cond;
    mc_job_t *head, *tail; /* queued jobs, under mu */
    int stop;              /* under mu */
    double timeout;
} mc_t;

typedef struct {
    mc_t *mc;
} mc_ud_t;

/* ---- jobs ------------------------------------------------------------------ */

static char *copy_bytes(const char *s, size_t len)
{
    char *c = osara_xmalloc(len + 1);
    memcpy(c, s, len);
    c[len] = '\0';
    return c;
}

static void job_free(osara_sched_future_t *f)
{
    mc_job_t *job = (mc_job_t *)f;
    for (int i = 0; i < job->n; i++) {
        free(job->keys[i]);
        free(job->vals[i]);
    }
    free(job->keys);
    free(job->vals);
    free(job->klens);
    free(job->vlens);
    free(job->err);
    free(job);
}

/* The first failure of the job (the Lua layer names the hosts). */
static void job_error(mc_job_t *job, const char *what)
{
    if (job->err == NULL) {
        job->err = osara_xstrdup(what);
    }
}

/* get -> { [key] = bytes } [, err]; set/delete -> true | nil, err */
static int push_job(lua_State *L, void *ud)
{
    mc_job_t *job = ud;
    if (job->op != OP_GET) {
        if (job->err == NULL) {
            lua_pushboolean(L, 1);
            return 1;
        }
        lua_pushnil(L);
        lua_pushstring(L, job->err);
        return 2;
    }
    lua_createtable(L, 0, job->n);
    for (int i = 0; i < job->n; i++) {
        if (job->vals[i] != NULL) {
            lua_pushlstring(L, job->keys[i], job->klens[i]);
            lua_pushlstring(L, job->vals[i], job->vlens[i]);
            lua_rawset(L, -3);
        }
    }
    if (job->err == NULL) {
        return 1;
    }
    lua_pushstring(L, job->err);
    return 2;
}

/* ---- the client thread ----------------------------------------------------------- */

static int is_error(memcached_return_t rc)
{
    return rc != MEMCACHED_SUCCESS && rc != MEMCACHED_END && rc != MEMCACHED_NOTFOUND &&
           rc != MEMCACHED_STORED && rc != MEMCACHED_DELETED && rc != MEMCACHED_BUFFERED;
}

static void run_get(memcached_st *mc, mc_job_t *job)
{
    memcached_return_t rc =
        memcached_mget(mc, (const char *const *)job->keys, job->klens, (size_t)job->n);
    if (is_error(rc)) {
        job_error(job, memcached_strerror(mc, rc));
    }
    memcached_result_st *res;
    while ((res = memcached_fetch_result(mc, NULL, &rc)) != NULL) {
        const char *key = memcached_result_key_value(res);
        size_t klen = memcached_result_key_length(res);
        for (int i = 0; i < job->n; i++) { /* n is a page of keys: scan */
            if (job->vals[i] == NULL && job->klens[i] == klen &&
                memcmp(job->keys[i], key, klen) == 0) {
                job->vlens[i] = memcached_result_length(res);
                job->vals[i] = copy_bytes(memcached_result_value(res), job->vlens[i]);
                break;
            }
        }
        memcached_result_free(res);
    }
    if (is_error(rc)) {
        job_error(job, memcached_strerror(mc, rc));
    }
}

static void run_job(memcached_st *mc, mc_job_t *job)
{
    if (job->op == OP_GET) {
        run_get(mc, job);
        return;
    }
    for (int i = 0; i < job->n; i++) {
        memcached_return_t rc =
            job->op == OP_SET
                ? memcached_set(mc, job->keys[i], job->klens[i], job->vals[i], job->vlens[i],
                                job->expire, 0)
                : memcached_delete(mc, job->keys[i], job->klens[i], 0);
        if (is_error(rc)) {
            job_error(job, memcached_strerror(mc, rc));
        }
    }
}

/* On the loop thread: the job's result goes to its waiter. */
static void job_done(void *arg, void *unused)
{
    (void)unused;
    mc_job_t *job = arg;
    osara_sched_future_complete(&job->fut, push_job, job);
    osara_sched_future_unref(&job->fut); /* the in-flight reference */
}

static void client_thread(void *arg)
{
    mc_t *c = arg;
    for (;;) {
        uv_mutex_lock(&c->mu);
        while (c->head == NULL && !c->stop) {
            uv_cond_wait(&c->cond, &c->mu);
        }
        mc_job_t *job = c->head;
        if (job != NULL) {
            c->head = job->next;
            if (c->head == NULL) {
                c->tail = NULL;
            }
        }
        uv_mutex_unlock(&c->mu);
        if (job == NULL) {
            return; /* stopped and drained */
        }
        run_job(c->mc, job);
        if (osara_inbox_post(c->inbox, job_done, job, NULL) != 0) {
            osara_sched_future_unref(&job->fut); /* loop gone: nobody waits */
        }
    }
}

/* ---- client lifetime ---------------------------------------------------------------- */

static void mc_unref(mc_t *c)
{
    if (--c->refs > 0) {
        return;
    }
    uv_mutex_destroy(&c->mu);
    uv_cond_destroy(&c->cond);
    free(c);
}

/* The worker's shared list lets go: queued jobs fail with "closed", the
 * thread finishes the job it runs (bounded by the client's timeouts) and
 * ends. */
static void mc_close(void *ptr)
{
    mc_t *c = ptr;
    c->closed = 1;
    uv_mutex_lock(&c->mu);
    mc_job_t *queued = c->head;
    c->head = c->tail = NULL;
    c->stop = 1;
    uv_cond_signal(&c->cond);
    uv_mutex_unlock(&c->mu);
    uv_thread_join(&c->thread);
    memcached_free(c->mc);
    c->mc = NULL;
    while (queued) {
        mc_job_t *next = queued->next;
        job_error(queued, "closed");
        job_done(queued, NULL);
        queued = next;
    }
    mc_unref(c);
}

static int add_hosts(memcached_st *mc, lua_State *L, int idx)
{
    int n = (int)lua_objlen(L, idx);
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, i); /* [..., "host:port"] */
        const char *hp = luaL_checkstring(L, -1);
        char host[256];
        snprintf(host, sizeof(host), "%s", hp);
        char *colon = strrchr(host, ':');
        int port = 11211;
        if (colon) {
            *colon = '\0';
            port = atoi(colon + 1);
        }
        lua_pop(L, 1);
        if (memcached_server_add(mc, host, (in_port_t)port) != MEMCACHED_SUCCESS) {
            return luaL_error(L, "memcached: bad host '%s'", hp);
        }
    }
    return n;
}

static memcached_st *mc_configure(lua_State *L, int hosts_idx, double timeout)
{
    memcached_st *mc = memcached_create(NULL);
    if (mc == NULL) {
        luaL_error(L, "memcached: out of memory");
    }
    uint64_t ms = (uint64_t)(timeout * 1000 + 0.5);
    memcached_behavior_set(mc, MEMCACHED_BEHAVIOR_DISTRIBUTION,
                           MEMCACHED_DISTRIBUTION_CONSISTENT_KETAMA);
    memcached_behavior_set(mc, MEMCACHED_BEHAVIOR_KETAMA_HASH, MEMCACHED_HASH_MD5);
    memcached_behavior_set(mc, MEMCACHED_BEHAVIOR_TCP_NODELAY, 1);
    memcached_behavior_set(mc, MEMCACHED_BEHAVIOR_VERIFY_KEY, 1);
    memcached_behavior_set(mc, MEMCACHED_BEHAVIOR_CONNECT_TIMEOUT, ms);
    memcached_behavior_set(mc, MEMCACHED_BEHAVIOR_POLL_TIMEOUT, ms);
    memcached_behavior_set(mc, MEMCACHED_BEHAVIOR_SND_TIMEOUT, ms * 1000);
    memcached_behavior_set(mc, MEMCACHED_BEHAVIOR_RCV_TIMEOUT, ms * 1000);
    /* A host that failed is skipped for a second: its keys miss fast. */
    memcached_behavior_set(mc, MEMCACHED_BEHAVIOR_RETRY_TIMEOUT, 1);
    if (add_hosts(mc, L, hosts_idx) == 0) {
        memcached_free(mc);
        luaL_error(L, "memcached: no hosts");
    }
    return mc;
}

static mc_t *mc_new(lua_State *L, osara_worker_t *w, int hosts_idx, double timeout)
{
    memcached_st *mcst = mc_configure(L, hosts_idx, timeout);
    mc_t *c = osara_xcalloc(1, sizeof(*c));
    c->refs = 1; /* the shared list's */
    c->inbox = &w->inbox;
    c->mc = mcst;
    c->timeout = timeout;
    uv_mutex_init(&c->mu);
    uv_cond_init(&c->cond);
    int rc = uv_thread_create(&c->thread, client_thread, c);
    if (rc != 0) {
        memcached_free(mcst);
        mc_unref(c);
        luaL_error(L, "memcached: cannot start its thread: %s", uv_strerror(rc));
    }
    return c;
}

/* ---- Lua ---------------------------------------------------------------------------- */

static mc_t *check_client(lua_State *L)
{
    mc_ud_t *ud = luaL_checkudata(L, 1, MC_MT);
    return ud->mc;
}

/* Copies the strings of the array at idx into *out (and lengths). */
static void copy_strings(lua_State *L, int idx, const char *what, int n, char ***out,
                         size_t **lens)
{
    const char **s;
    size_t *l;
    int got = osara__cache_strings(L, idx, what, &s, &l);
    if (got != n) {
        free(s);
        free(l);
        luaL_error(L, "memcached: %d keys and %d values", n, got);
    }
    *out = osara_xcalloc(n ? n : 1, sizeof(**out));
    *lens = l;
    for (int i = 0; i < n; i++) {
        (*out)[i] = copy_bytes(s[i], l[i]);
    }
    free(s);
}

/* Queues the job and waits for its result. */
static int queue_and_wait(lua_State *L, mc_t *c, mc_job_t *job)
{
    osara_sched_future_init(&job->fut, job_free); /* the in-flight reference */
    osara_sched_future_ref(&job->fut);            /* ours, until the wait took one */
    if (c->closed || job->n == 0) {
        if (c->closed) {
            job_error(job, "closed");
        }
        job_done(job, NULL);
    } else {
        uv_mutex_lock(&c->mu);
        if (c->tail) {
            c->tail->next = job;
        } else {
            c->head = job;
        }
        c->tail = job;
        uv_cond_signal(&c->cond);
        uv_mutex_unlock(&c->mu);
    }
    /* Two timeouts may pass in the thread (connect, then I/O): wait a bit more. */
    int nret = osara_sched_future_wait(L, &job->fut, 0, 3 * c->timeout);
    osara_sched_future_unref(&job->fut);
    return nret;
}

static mc_job_t *new_job(lua_State *L, int op)
{
    luaL_checktype(L, 2, LUA_TTABLE);
    mc_job_t *job = osara_xcalloc(1, sizeof(*job));
    job->op = op;
    job->n = (int)lua_objlen(L, 2);
    copy_strings(L, 2, "memcached key", job->n, &job->keys, &job->klens);
    job->vlens = osara_xcalloc(job->n ? job->n : 1, sizeof(*job->vlens));
    job->vals = osara_xcalloc(job->n ? job->n : 1, sizeof(*job->vals));
    return job;
}

/* client:get({key...}) -> { [key] = bytes } [, err] */
static int l_get(lua_State *L)
{
    mc_t *c = check_client(L);
    return queue_and_wait(L, c, new_job(L, OP_GET));
}

/* client:set({key...}, {bytes...}, expire) -> true | nil, err */
static int l_set(lua_State *L)
{
    mc_t *c = check_client(L);
    luaL_checktype(L, 3, LUA_TTABLE);
    time_t expire = (time_t)luaL_optnumber(L, 4, 0);
    mc_job_t *job = new_job(L, OP_SET);
    free(job->vals);
    free(job->vlens);
    copy_strings(L, 3, "memcached value", job->n, &job->vals, &job->vlens);
    job->expire = expire;
    return queue_and_wait(L, c, job);
}

/* client:delete({key...}) -> true | nil, err */
static int l_delete(lua_State *L)
{
    mc_t *c = check_client(L);
    return queue_and_wait(L, c, new_job(L, OP_DELETE));
}

static int l_gc(lua_State *L)
{
    mc_ud_t *ud = luaL_checkudata(L, 1, MC_MT);
    if (ud->mc) {
        mc_unref(ud->mc);
        ud->mc = NULL;
    }
    return 0;
}

/* memcached(key, {"host:port"...}, timeout) -> client (shared by key) */
static int l_memcached(lua_State *L)
{
    const char *key = luaL_checkstring(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    double timeout = luaL_optnumber(L, 3, 1.0);
    osara_worker_t *w = osara_worker_from_L(L);
    char skey[1024];
    snprintf(skey, sizeof(skey), "memcached %s", key);
    mc_t *c = osara_worker_shared_get(w, skey);
    if (c == NULL) {
        c = mc_new(L, w, 2, timeout);
        osara_worker_shared_put(w, skey, c, mc_close);
    }
    mc_ud_t *ud = lua_newuserdata(L, sizeof(*ud)); /* [..., ud] */
    ud->mc = c;
    c->refs++;
    luaL_getmetatable(L, MC_MT);
    lua_setmetatable(L, -2);
    return 1;
}

void osara__memcached_register(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"get", l_get}, {"set", l_set}, {"delete", l_delete}, {NULL, NULL}};
    osara__cache_register(L, MC_MT, methods, l_gc, "memcached", l_memcached);
}
