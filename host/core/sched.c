#include "core/sched.h"

#include <lauxlib.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/log.h"
#include "core/loop.h"
#include "core/lvm.h"
#include "core/mem.h"
#include "core/metrics.h"
#include "core/runaway.h"
#include "core/sched_int.h"


/* Process-wide series, looked up once for every worker thread. */
static osara_metric_t *m_errors, *m_started;
static uv_once_t metrics_once = UV_ONCE_INIT;

static void metrics_init(void)
{
    m_errors = osara_metrics_counter("osara_lua_errors_total",
                                     "errors raised by user Lua code", NULL);
    m_started = osara_metrics_counter("osara_coroutines_started_total",
                                      "entries into user code", NULL);
}

static void count(osara_metric_t **m)
{
    uv_once(&metrics_once, metrics_init);
    osara_metric_add(*m, 1);
}

/* The pooled coroutine resumed on this thread (one worker per thread). */
_Thread_local osara_co_t *osara__running;

osara_co_t *osara_sched_running(void) { return osara__running; }

/* Time spent in Lua this turn, per entry label, for the watchdog: a turn
 * is often many short runs of one handler. A few labels are kept; a new
 * one replaces the least busy when they are all taken. */
#define TURN_LABELS 8

typedef struct {
    uint32_t hash;
    unsigned runs;
    uint64_t ns;
    char what[128];
} turn_label_t;

static _Thread_local turn_label_t turn[TURN_LABELS];

static uint32_t label_hash(const char *s)
{
    uint32_t h = 2166136261u;
    while (*s) {
        h = (h ^ (unsigned char)*s++) * 16777619u;
    }
    return h ? h : 1;
}

const char *osara_sched_turn_top(uint64_t *ns, unsigned *runs)
{
    turn_label_t *top = &turn[0];
    for (int i = 1; i < TURN_LABELS; i++) {
        top = turn[i].ns > top->ns ? &turn[i] : top;
    }
    *ns = top->ns;
    *runs = top->runs;
    return top->ns ? top->what : NULL;
}

void osara_sched_turn_reset(void)
{
    memset(turn, 0, sizeof(turn));
}

static void note_duration(osara_co_t *co, uint64_t ns)
{
    turn_label_t *slot = &turn[0];
    for (int i = 0; i < TURN_LABELS; i++) {
        if (turn[i].hash == co->what_hash) {
            slot = &turn[i];
            break;
        }
        slot = turn[i].ns < slot->ns ? &turn[i] : slot;
    }
    if (slot->hash != co->what_hash) {
        if (slot->ns > ns) {
            return; /* busier labels hold every slot */
        }
        *slot = (turn_label_t){.hash = co->what_hash};
        memcpy(slot->what, co->what, sizeof(slot->what));
    }
    slot->runs++;
    slot->ns += ns;
}
lua_State *osara_co_thread(osara_co_t *co) { return co->thread; }
void osara_co_set_user(osara_co_t *co, void *user) { co->user = user; }
void osara_co_set_task(osara_co_t *co) { co->task = 1; }
void *osara_co_user(osara_co_t *co) { return co->user; }
osara_vm_t *osara_co_vm(osara_co_t *co) { return co->vm; }
unsigned osara_co_seq(osara_co_t *co) { return co->seq; }
int osara_co_waiting(osara_co_t *co) { return co->waiting; }
int osara_co_failed(osara_co_t *co) { return co->failed; }

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
        co = osara_xcalloc(1, sizeof(*co));
        co->vm = vm;
        co->anchor_ref = LUA_NOREF;
        co->ctx_ref = LUA_NOREF;
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
    co->failed = 0;
    luaL_unref(vm->L, LUA_REGISTRYINDEX, co->ctx_ref); /* the next entry has its own */
    co->ctx_ref = LUA_NOREF;
    co->user = NULL;
    osara__limits_reset(co);
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
    count(&m_errors);
    char line[4096];
    int n = snprintf(line, sizeof(line), "error in %s: %s", co->what, msg);
    /* JSON lines: the entry, where the error was raised ("app.lua:5: ..."), the error */
    size_t wlen = strcspn(msg, ":");
    wlen += msg[wlen] == ':' ? 1 + strspn(msg + wlen + 1, "0123456789") : 0;
    int has_where = wlen > 0 && msg[wlen] == ':' && msg[wlen - 1] != ':';
    osara_log_field_t f[3] = {
        {.key = "handler", .val = co->what, .len = strlen(co->what)},
        {.key = "where", .val = msg, .len = wlen},
        {.key = "err", .val = msg, .len = strlen(msg)},
    };
    if (!has_where) {
        f[1] = f[2];
    }
    osara_log_fields(OSARA_LOG_ERROR, line, n < (int)sizeof(line) ? (size_t)n : sizeof(line) - 1,
                     f, has_where ? 3 : 2);
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
    if (vm->inflight == 0 && vm->on_idle) {
        vm->on_idle(vm);
    }
}


static void stop_deadline(osara_co_t *co)
{
    if (co->timer) {
        uv_timer_stop(co->timer);
    }
}

/* Ends a wait: its deadline stops and the waited-on object is released. */
static void end_wait(osara_co_t *co)
{
    stop_deadline(co);
    if (co->anchor_ref != LUA_NOREF) {
        luaL_unref(co->vm->L, LUA_REGISTRYINDEX, co->anchor_ref);
        co->anchor_ref = LUA_NOREF;
    }
    co->waiting = 0;
    co->cleanup = NULL;
    co->wait_data = NULL;
    co->on_timeout = NULL;
}

/* Cancels a wait: its cleanup detaches the completion, then end_wait. */
void osara__sched_cancel_wait(osara_co_t *co)
{
    if (co->waiting && co->cleanup) {
        co->cleanup(co->wait_data);
    }
    end_wait(co);
}

static int resume(osara_co_t *co, int nargs);

/* A run that is not nested in running Lua waits for a later turn once this
 * turn spent its budget (loop.h), except while a script loads: what its
 * main chunk spawns runs at once. */
static int must_wait_turn(osara_co_t *co)
{
    return !co->vm->loading && osara_inbox_turn_spent(co->vm->inbox);
}

/* Resumes now, or from the inbox when Lua runs (resume is not reentrant
 * for one thread's bookkeeping) or the turn's budget is spent. */
static void resume_in_turn(osara_co_t *co, int nret)
{
    if ((osara__running != NULL || must_wait_turn(co)) &&
        osara_sched_resume_later(co, nret) == 0) {
        return;
    }
    resume(co, nret);
}

/* The one caller of lua_resume. */
static int resume(osara_co_t *co, int nargs)
{
    osara_co_t *prev = osara__running;
    osara__running = co;
    end_wait(co);
    osara__limits_before_resume(co);
    uint64_t t0 = uv_hrtime();
    if (prev == NULL) {
        osara__limits_run_begin(co, t0); /* the runaway guard watches it */
    }
    int rc = lua_resume(co->thread, nargs);
    if (prev == NULL) {
        osara_runaway_leave();
    }
    osara__limits_after_resume(co);
    uint64_t ns = uv_hrtime() - t0;
    note_duration(co, ns);
    if (prev == NULL) {
        osara_inbox_turn_charge(co->vm->inbox, ns); /* nested runs count once */
    }
    osara__running = prev;
    if (rc == LUA_YIELD) {
        if (!co->waiting) {
            /* A bare coroutine.yield() from the entry function: treat as a
             * cooperative yield to the loop and continue on the next turn. */
            lua_settop(co->thread, 0);
            co->waiting = 1;
            co->seq++;
            (void)osara_sched_resume_later(co, 0); /* fails only at close */
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

int osara__sched_resume_now(osara_co_t *co, int nargs)
{
    return resume(co, nargs);
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
    co->what_hash = label_hash(co->what);
    co->vm->inflight++;
    count(&m_started);
    osara__limits_entry_started(co);
    if (osara__running == NULL && must_wait_turn(co)) {
        /* Started from the inbox once a later turn has budget left: a
         * deferred start is a wait like any other (cancellable). */
        co->waiting = 1;
        co->seq++;
        if (osara_sched_resume_later(co, nargs) == 0) {
            return 0;
        }
    }
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
    return osara__running && osara__running->thread == L ? osara__running : NULL;
}

static int push_timeout(lua_State *T, void *unused)
{
    (void)unused;
    lua_pushnil(T);
    lua_pushliteral(T, "timeout");
    return 2;
}

static void on_deadline(uv_timer_t *t)
{
    osara_co_t *co = t->data;
    if (!co->waiting) {
        return;
    }
    osara_push_fn push = co->on_timeout ? co->on_timeout : push_timeout;
    int n = push(co->thread, co->wait_data);
    if (co->cleanup) {
        co->cleanup(co->wait_data);
        co->cleanup = NULL;
    }
    resume_in_turn(co, n);
}

static void arm_deadline(osara_co_t *co, double timeout)
{
    uv_loop_t *loop = co->vm->loop;
    if (co->timer == NULL) {
        co->timer = osara_xmalloc(sizeof(*co->timer));
        OSARA_UV_MUST(uv_timer_init(loop, co->timer));
        co->timer->data = co;
    }
    uv_update_time(loop); /* measure from now, not from the turn's start */
    OSARA_UV_MUST(uv_timer_start(co->timer, on_deadline, (uint64_t)(timeout * 1000 + 0.5), 0));
}

int osara_sched_wait_for(lua_State *L, int anchor, double timeout,
                         osara_wait_cleanup_fn cleanup, void *data,
                         osara_push_fn on_timeout)
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
    if (anchor != 0) {
        lua_pushvalue(L, anchor);
        co->anchor_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    co->cleanup = cleanup;
    co->wait_data = data;
    co->on_timeout = on_timeout;
    co->waiting = 1;
    co->seq++;
    if (timeout >= 0) {
        arm_deadline(co, timeout);
    }
    return lua_yield(L, 0);
}

int osara_sched_wait(lua_State *L, int anchor, osara_wait_cleanup_fn cleanup,
                     void *data)
{
    return osara_sched_wait_for(L, anchor, -1, cleanup, data, NULL);
}

int osara_sched_resume(osara_co_t *co, int nret)
{
    if (!co->waiting) {
        lua_pop(co->thread, nret);
        return -1;
    }
    if (must_wait_turn(co) && osara_sched_resume_later(co, nret) == 0) {
        return 0;
    }
    return resume(co, nret);
}

/* arg2 carries the sequence number the wake-up was for: a coroutine that
 * was cancelled and reused since then is not resumed by it. */
static void on_resume_later(void *arg, void *seq)
{
    osara_co_t *co = arg;
    if (co->vm->closing || !co->waiting || co->seq != (unsigned)(uintptr_t)seq) {
        return;
    }
    int n = co->pending_nret;
    co->pending_nret = 0;
    resume(co, n);
}

int osara_sched_resume_later(osara_co_t *co, int nret)
{
    void *seq = (void *)(uintptr_t)co->seq;
    if (osara_inbox_post(co->vm->inbox, on_resume_later, co, seq) != 0) {
        return -1; /* the inbox closed: the caller decides */
    }
    co->pending_nret = nret;
    co->cleanup = NULL;
    stop_deadline(co); /* woken: the deadline must not resume it as well */
    return 0;
}

/* ---- waiters and futures ------------------------------------------------ */

int osara_sched_waiter_set(osara_sched_waiter_t *wt, lua_State *L)
{
    osara_co_t *co = osara_sched_current(L);
    if (co == NULL) {
        return -1;
    }
    wt->co = co;
    wt->seq = co->seq + 1; /* the seq its coming wait will have */
    return 0;
}

osara_co_t *osara_sched_waiter_current(const osara_sched_waiter_t *wt)
{
    osara_co_t *co = wt->co;
    return co && co->waiting && co->seq == wt->seq ? co : NULL;
}

void osara_sched_future_init(osara_sched_future_t *f,
                             void (*free_fn)(osara_sched_future_t *f))
{
    *f = (osara_sched_future_t){.refs = 1, .free = free_fn};
}

void osara_sched_future_ref(osara_sched_future_t *f)
{
    f->refs++;
}

void osara_sched_future_unref(osara_sched_future_t *f)
{
    if (--f->refs == 0 && f->free) {
        f->free(f);
    }
}

/* The wait's cleanup (timeout, cancel): detach and drop the wait's ref. */
static void future_detach(void *data)
{
    osara_sched_future_t *f = data;
    f->waiter.co = NULL;
    osara_sched_future_unref(f);
}

int osara_sched_future_wait(lua_State *L, osara_sched_future_t *f, int anchor,
                            double timeout)
{
    if (f->done) {
        return f->push(L, f->push_ud);
    }
    if (osara_sched_waiter_current(&f->waiter) != NULL) {
        return luaL_error(L, "wait(): another coroutine already waits on this");
    }
    if (anchor < 0) {
        anchor = lua_gettop(L) + anchor + 1;
    }
    osara_sched_future_ref(f); /* released by future_detach or complete */
    if (osara_sched_waiter_set(&f->waiter, L) != 0) {
        f->waiter.co = NULL;
    }
    return osara_sched_wait_for(L, anchor, timeout, future_detach, f, NULL);
}

void osara_sched_future_complete(osara_sched_future_t *f, osara_push_fn push,
                                 void *ud)
{
    if (f->done) {
        return;
    }
    f->done = 1;
    f->push = push;
    f->push_ud = ud;
    osara_co_t *co = osara_sched_waiter_current(&f->waiter);
    if (co == NULL) {
        return; /* nobody waits (a detached waiter dropped its ref already) */
    }
    f->waiter.co = NULL;
    int n = push(co->thread, ud);
    co->cleanup = NULL; /* completed, not cancelled */
    resume_in_turn(co, n);
    osara_sched_future_unref(f);
}

void osara_sched_cancel_all(osara_vm_t *vm)
{
    for (osara_co_t *co = vm->all; co; co = co->next_all) {
        int was_waiting = co->waiting;
        osara__sched_cancel_wait(co);
        if (was_waiting && co->done) {
            /* Report the abandoned entry so the owner can redeliver. */
            lua_pushliteral(co->thread, "cancelled: shutting down");
            co->done(co, 0, co->done_ud);
            co->done = NULL;
        }
    }
}

void osara_sched_cancel_load_tasks(osara_vm_t *vm)
{
    for (osara_co_t *co = vm->all; co; co = co->next_all) {
        if (!co->load_task || !co->waiting) {
            continue;
        }
        osara__sched_cancel_wait(co);
        co->load_task = 0;
        co->done = NULL;
        release(co, 1); /* suspended mid-function: the thread cannot be reused */
        vm->inflight--;
    }
}

static void timer_closed(uv_handle_t *h)
{
    free(h);
}

static int is_resume_of(const osara_event_t *ev, void *vm)
{
    return ev->fn == on_resume_later && ((osara_co_t *)ev->arg)->vm == vm;
}

void osara_sched_free(osara_vm_t *vm)
{
    osara__limits_free(vm);
    /* Queued wake-ups point at the coroutines freed here. */
    osara_inbox_cancel(vm->inbox, is_resume_of, vm);
    osara_co_t *co = vm->all;
    while (co) {
        osara_co_t *next = co->next_all;
        if (co->timer) {
            uv_close((uv_handle_t *)co->timer, timer_closed);
        }
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
    co->task = 1; /* a service: no handler limits */
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

/* Marks a coroutine parked by park(): wake() resumes only those. */
static void park_cleanup(void *unused)
{
    (void)unused;
}

/* park([timeout]) -> ... : waits until wake(token, seq, ...) passes values,
 * or returns nil, "timeout". */
static int l_sched_park(lua_State *L)
{
    double timeout = -1;
    if (!lua_isnoneornil(L, 1)) {
        timeout = luaL_checknumber(L, 1);
        timeout = timeout > 0 ? timeout : 0;
    }
    return osara_sched_wait_for(L, 0, timeout, park_cleanup, NULL, NULL);
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
    lua_xmove(L, co->thread, n);
    osara_sched_resume_later(co, n);
    lua_pushboolean(L, 1);
    return 1;
}

/* fail(): the running entry failed although its function returns (the
 * failure policy took the error): counted as failed, not handled. */
static int l_sched_fail(lua_State *L)
{
    osara_co_t *co = osara_sched_current(L);
    if (co != NULL) {
        co->failed = 1;
    }
    return 0;
}

/* error(): counts an error raised by user code and caught in Lua (a
 * handler's, a route's) in osara_lua_errors_total, as log_error does. */
static int l_sched_error(lua_State *L)
{
    (void)L;
    count(&m_errors);
    return 0;
}

/* set_context(t): the running entry's log context (topic, offset, route,
 * ...), kept until the entry ends. */
static int l_sched_set_context(lua_State *L)
{
    osara_co_t *co = osara_sched_current(L);
    if (co != NULL) {
        lua_settop(L, 1);
        luaL_unref(L, LUA_REGISTRYINDEX, co->ctx_ref);
        co->ctx_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    return 0;
}

/* context() -> the running entry's log context table, or nil. */
static int l_sched_context(lua_State *L)
{
    osara_co_t *co = osara_sched_current(L);
    if (co == NULL || co->ctx_ref == LUA_NOREF) {
        return 0;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, co->ctx_ref);
    return 1;
}

/* stats() -> {inflight=, idle=} for tests and metrics */
static int l_sched_stats(lua_State *L)
{
    osara_vm_t *vm = osara_vm_from_L(L);
    osara_lua_push_stats(L, (osara_lua_stat_t[]){
        {"inflight", vm->inflight}, {"idle", vm->nidle},
    }, 2);
    return 1;
}

int osara_sched_open(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"spawn", l_sched_spawn}, {"spawn_service", l_sched_spawn_service},
        {"yield", l_sched_yield},
        {"current", l_sched_current}, {"park", l_sched_park},
        {"wake", l_sched_wake}, {"stats", l_sched_stats},
        {"fail", l_sched_fail}, {"error", l_sched_error},
        {"set_context", l_sched_set_context}, {"context", l_sched_context},
        {"limit", osara__limits_l_limit},
        {"interrupted", osara__limits_l_interrupted},
        {NULL, NULL},
    };
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
