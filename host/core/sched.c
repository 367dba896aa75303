#include "core/sched.h"

#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/log.h"
#include "core/lvm.h"
#include "core/metrics.h"
#include "core/worker.h"

struct osara_co_s {
    lua_State *thread;
    int ref;                 /* keeps the thread alive in vm->L's registry */
    osara_vm_t *vm;
    osara_co_done_fn done;
    void *done_ud;
    char what[128];
    osara_wait_cleanup_fn cleanup;
    void *wait_data;
    unsigned seq;
    int waiting;
    int pending_nret;        /* for resume_later */
    int load_task;           /* spawned while the script loaded */
    void *user;              /* the entry's owner data (e.g. a Kafka input) */
    struct osara_co_s *next_idle;
    struct osara_co_s *next_all;
};

static osara_metric_t *m_errors, *m_started;

static void count(osara_metric_t **m, const char *name, const char *help)
{
    if (*m == NULL) {
        *m = osara_metrics_counter(name, help, NULL);
    }
    osara_metric_add(*m, 1);
}

lua_State *osara_co_thread(osara_co_t *co) { return co->thread; }
void osara_co_set_user(osara_co_t *co, void *user) { co->user = user; }
void *osara_co_user(osara_co_t *co) { return co->user; }
osara_vm_t *osara_co_vm(osara_co_t *co) { return co->vm; }
unsigned osara_co_seq(osara_co_t *co) { return co->seq; }
int osara_co_waiting(osara_co_t *co) { return co->waiting; }

static int new_thread(osara_co_t *co)
{
    co->thread = lua_newthread(co->vm->L);
    co->ref = luaL_ref(co->vm->L, LUA_REGISTRYINDEX);
    return co->thread ? 0 : -1;
}

lua_State *osara_sched_acquire(osara_vm_t *vm, int force, osara_co_t **out)
{
    if (vm->closing || (!vm->accepting && !force)) {
        return NULL;
    }
    osara_co_t *co = vm->idle;
    if (co != NULL) {
        vm->idle = co->next_idle;
        vm->nidle--;
        if (co->thread == NULL && new_thread(co) != 0) {
            return NULL;
        }
    } else {
        co = calloc(1, sizeof(*co));
        if (co == NULL) {
            return NULL;
        }
        co->vm = vm;
        co->next_all = vm->all;
        vm->all = co;
        if (new_thread(co) != 0) {
            return NULL;
        }
    }
    *out = co;
    return co->thread;
}

/* Returns the coroutine to the pool; a thread that died of an error cannot
 * be resumed again, so it is dropped and replaced on next use. */
static void release(osara_co_t *co, int dead)
{
    osara_vm_t *vm = co->vm;
    if (dead) {
        luaL_unref(vm->L, LUA_REGISTRYINDEX, co->ref);
        co->ref = LUA_NOREF;
        co->thread = NULL;
    } else {
        lua_settop(co->thread, 0);
    }
    co->load_task = 0;
    co->user = NULL;
    co->next_idle = vm->idle;
    vm->idle = co;
    vm->nidle++;
}

static void log_error(osara_co_t *co)
{
    lua_State *T = co->thread;
    const char *msg = lua_tostring(T, -1);
    if (msg == NULL) {
        msg = lua_type(T, -1) == LUA_TTABLE ? "(error object is a table)"
                                            : "(error object is not a string)";
    }
    count(&m_errors, "osara_lua_errors_total",
          "errors raised by user Lua code");
    OSARA_ERROR("error in %s: %s", co->what, msg);
    if (osara_log_enabled(OSARA_LOG_DEBUG)) {
        luaL_traceback(co->vm->L, T, msg, 0);
        OSARA_DEBUG("%s", lua_tostring(co->vm->L, -1));
        lua_pop(co->vm->L, 1);
    }
}

static void finish(osara_co_t *co, int ok)
{
    osara_vm_t *vm = co->vm;
    if (co->done) {
        co->done(co, ok, co->done_ud);
    }
    co->done = NULL;
    release(co, !ok);
    vm->inflight--;
    if (vm->inflight == 0) {
        osara_vm_idle(vm);
    }
}

static void on_resume_later(void *arg, void *unused);

/* The one caller of lua_resume. */
static int resume(osara_co_t *co, int nargs)
{
    osara_worker_t *w = co->vm->w;
    osara_co_t *prev = w->running;
    w->running = co;
    co->waiting = 0;
    co->cleanup = NULL;
    co->wait_data = NULL;
    int rc = lua_resume(co->thread, nargs);
    w->running = prev;
    if (rc == LUA_YIELD) {
        if (!co->waiting) {
            /* A bare coroutine.yield() from the entry function: treat as a
             * cooperative yield to the loop and continue on the next turn. */
            lua_settop(co->thread, 0);
            co->waiting = 1;
            co->seq++;
            osara_sched_resume_later(co, 0);
        }
        return 0;
    }
    if (rc != 0) {
        log_error(co);
        finish(co, 0);
        return -1;
    }
    finish(co, 1);
    return 0;
}

int osara_sched_run(osara_co_t *co, int nargs, osara_co_done_fn done,
                    void *ud, const char *what)
{
    co->done = done;
    co->done_ud = ud;
    size_t n = what ? strlen(what) : 0;
    if (n >= sizeof(co->what)) {
        n = sizeof(co->what) - 1;
    }
    memcpy(co->what, what ? what : "", n); /* per entry: no printf on the hot path */
    co->what[n] = '\0';
    co->vm->inflight++;
    count(&m_started, "osara_coroutines_started_total",
          "entries into user code");
    return resume(co, nargs);
}

int osara_sched_spawn(osara_vm_t *vm, int nargs, int force,
                      osara_co_done_fn done, void *ud, const char *what)
{
    osara_co_t *co;
    lua_State *T = osara_sched_acquire(vm, force, &co);
    if (T == NULL) {
        lua_pop(vm->L, nargs + 1);
        return -2;
    }
    lua_xmove(vm->L, T, nargs + 1); /* T: [fn, args...] */
    return osara_sched_run(co, nargs, done, ud, what);
}

osara_co_t *osara_sched_current(lua_State *L)
{
    osara_worker_t *w = osara_worker_from_L(L);
    osara_co_t *co = w ? w->running : NULL;
    return co && co->thread == L ? co : NULL;
}

int osara_sched_wait(lua_State *L, osara_wait_cleanup_fn cleanup, void *data)
{
    osara_co_t *co = osara_sched_current(L);
    if (co == NULL) {
        if (cleanup) {
            cleanup(data);
        }
        return luaL_error(L, "cannot wait here: only inside a handler, timer "
                             "or task (not at load time or in a coroutine "
                             "you created)");
    }
    co->cleanup = cleanup;
    co->wait_data = data;
    co->waiting = 1;
    co->seq++;
    return lua_yield(L, 0);
}

int osara_sched_resume(osara_co_t *co, int nret)
{
    if (!co->waiting) {
        lua_pop(co->thread, nret);
        return -1;
    }
    return resume(co, nret);
}

static void on_resume_later(void *arg, void *unused)
{
    (void)unused;
    osara_co_t *co = arg;
    if (co->vm->closing || !co->waiting) {
        return;
    }
    int n = co->pending_nret;
    co->pending_nret = 0;
    resume(co, n);
}

void osara_sched_resume_later(osara_co_t *co, int nret)
{
    co->pending_nret = nret;
    co->cleanup = NULL;
    if (osara_inbox_post(&co->vm->w->inbox, on_resume_later, co, NULL) != 0) {
        lua_pop(co->thread, nret);
    }
}

void osara_sched_cancel_all(osara_vm_t *vm)
{
    for (osara_co_t *co = vm->all; co; co = co->next_all) {
        if (co->waiting && co->cleanup) {
            co->cleanup(co->wait_data);
        }
        co->cleanup = NULL;
        if (co->waiting && co->done) {
            /* Report the abandoned entry so the owner can redeliver. */
            lua_pushliteral(co->thread, "cancelled: shutting down");
            co->done(co, 0, co->done_ud);
            co->done = NULL;
        }
        co->waiting = 0;
    }
}

void osara_sched_cancel_load_tasks(osara_vm_t *vm)
{
    for (osara_co_t *co = vm->all; co; co = co->next_all) {
        if (!co->load_task || !co->waiting) {
            continue;
        }
        if (co->cleanup) {
            co->cleanup(co->wait_data);
        }
        co->cleanup = NULL;
        co->waiting = 0;
        co->load_task = 0;
        co->done = NULL;
        release(co, 1); /* suspended mid-function: the thread cannot be reused */
        vm->inflight--;
    }
}

void osara_sched_free(osara_vm_t *vm)
{
    osara_co_t *co = vm->all;
    while (co) {
        osara_co_t *next = co->next_all;
        free(co);
        co = next;
    }
    vm->all = vm->idle = NULL;
    vm->nidle = 0;
}

/* ---- Lua binding: osara.sched_c ---------------------------------------- */

static const char *where_label(lua_State *L, const char *prefix, char *buf,
                               size_t cap)
{
    char at[96];
    snprintf(buf, cap, "%s at %s", prefix, osara_vm_where(L, 1, at, sizeof(at)));
    return buf;
}

static int spawn(lua_State *L, int load_task);

/* spawn(fn, ...) -> true: runs fn(...) in a new pooled coroutine now. */
static int l_sched_spawn(lua_State *L)
{
    return spawn(L, osara_vm_from_L(L)->loading);
}

/* spawn_service(fn, ...): like spawn, for a task the script started at load
 * (cancelled when that version of the script is replaced or stops). */
static int l_sched_spawn_service(lua_State *L)
{
    return spawn(L, 1);
}

static int spawn(lua_State *L, int load_task)
{
    luaL_checktype(L, 1, LUA_TFUNCTION);
    osara_vm_t *vm = osara_vm_from_L(L);
    int nargs = lua_gettop(L) - 1;
    osara_co_t *co;
    lua_State *T = osara_sched_acquire(vm, 1, &co);
    if (T == NULL) {
        lua_pushnil(L);
        lua_pushliteral(L, "shutting down");
        return 2;
    }
    lua_xmove(L, T, nargs + 1); /* T: [fn, args...] */
    co->load_task = load_task;
    char what[128];
    osara_sched_run(co, nargs, NULL, NULL, where_label(L, "task", what, sizeof(what)));
    lua_pushboolean(L, 1);
    return 1;
}

/* yield(): lets other coroutines and I/O run, continues on the next turn. */
static int l_sched_yield(lua_State *L)
{
    osara_co_t *co = osara_sched_current(L);
    if (co == NULL) {
        return luaL_error(L, "osara.yield: not inside a handler or task");
    }
    co->waiting = 1;
    co->seq++;
    osara_sched_resume_later(co, 0);
    return lua_yield(L, 0);
}

/* current() -> token, seq | nil: identifies the running coroutine so that
 * Lua code can park it and wake it later (request/reply, locks). */
static int l_sched_current(lua_State *L)
{
    osara_co_t *co = osara_sched_current(L);
    if (co == NULL) {
        lua_pushnil(L);
        return 1;
    }
    lua_pushlightuserdata(L, co);
    lua_pushnumber(L, co->seq + 1); /* the seq its next park will have */
    return 2;
}

typedef struct {
    uv_timer_t *timer;
    osara_co_t *co;
    unsigned seq;
} park_t;

static void park_timer_closed(uv_handle_t *h)
{
    free(h);
}

static void park_cleanup(void *data)
{
    park_t *p = data;
    if (p->timer) {
        uv_timer_stop(p->timer);
        uv_close((uv_handle_t *)p->timer, park_timer_closed);
        p->timer = NULL;
    }
    free(p);
}

static void on_park_timeout(uv_timer_t *t)
{
    park_t *p = t->data;
    osara_co_t *co = p->co;
    if (!co->waiting || co->seq != p->seq) {
        return;
    }
    park_cleanup(p);
    lua_pushnil(co->thread);
    lua_pushliteral(co->thread, "timeout");
    osara_sched_resume(co, 2);
}

/* park([timeout]) -> ... : waits until wake(token, seq, ...) passes values,
 * or returns nil, "timeout". */
static int l_sched_park(lua_State *L)
{
    osara_co_t *co = osara_sched_current(L);
    if (co == NULL) {
        return luaL_error(L, "cannot wait here: not inside a handler or task");
    }
    park_t *p = calloc(1, sizeof(*p));
    p->co = co;
    p->seq = co->seq + 1;
    if (!lua_isnoneornil(L, 1)) {
        double timeout = luaL_checknumber(L, 1);
        p->timer = malloc(sizeof(*p->timer));
        uv_timer_init(&co->vm->w->loop, p->timer);
        p->timer->data = p;
        uv_update_time(&co->vm->w->loop);
        uv_timer_start(p->timer, on_park_timeout,
                       (uint64_t)(timeout > 0 ? timeout * 1000 + 0.5 : 0), 0);
    }
    return osara_sched_wait(L, park_cleanup, p);
}

/* wake(token, seq, ...) -> boolean: resumes a parked coroutine with the
 * values on the next loop turn; false when it is no longer parked there. */
static int l_sched_wake(lua_State *L)
{
    osara_co_t *co = lua_touserdata(L, 1);
    unsigned seq = (unsigned)luaL_checknumber(L, 2);
    int n = lua_gettop(L) - 2;
    if (co == NULL || !co->waiting || co->seq != seq || co->cleanup != park_cleanup ||
        co->vm != osara_vm_from_L(L)) {
        lua_pushboolean(L, 0);
        return 1;
    }
    park_cleanup(co->wait_data);
    co->cleanup = NULL;
    co->wait_data = NULL;
    lua_xmove(L, co->thread, n);
    osara_sched_resume_later(co, n);
    lua_pushboolean(L, 1);
    return 1;
}

/* stats() -> {inflight=, idle=} for tests and metrics */
static int l_sched_stats(lua_State *L)
{
    osara_vm_t *vm = osara_vm_from_L(L);
    lua_createtable(L, 0, 2);
    lua_pushinteger(L, vm->inflight);
    lua_setfield(L, -2, "inflight");
    lua_pushinteger(L, vm->nidle);
    lua_setfield(L, -2, "idle");
    return 1;
}

int osara_sched_open(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"spawn", l_sched_spawn}, {"spawn_service", l_sched_spawn_service},
        {"yield", l_sched_yield},
        {"current", l_sched_current}, {"park", l_sched_park},
        {"wake", l_sched_wake}, {"stats", l_sched_stats},
        {NULL, NULL},
    };
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
