#include "sys/timer.h"

#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "core/err.h"
#include "core/log.h"
#include "core/lvm.h"
#include "core/mem.h"
#include "core/metrics.h"
#include "core/registry.h"
#include "core/sched.h"
#include "core/worker.h"

#define TIMER_MT "osara.timer"

typedef struct osara_timer_s {
    uv_timer_t *handle;      /* NULL once stopped or handed to another timer */
    osara_worker_t *w;
    double interval;
    int repeat;
    osara_reg_entry_t *entry; /* registered: call entry->vm / entry->fnref */
    osara_vm_t *vm;           /* runtime: call vm / fnref */
    int fnref;
    osara_own_t *own;
    int refs;                 /* handle userdata + running tick + owner */
    int running;
    char what[128];
} osara_timer_t;

typedef struct {
    osara_timer_t *t;
} timer_ud_t;

static osara_metric_t *m_skipped; /* process-wide, set once */
static uv_once_t metrics_once = UV_ONCE_INIT;

static void metrics_init(void)
{
    m_skipped = osara_metrics_counter(
        "osara_timer_ticks_skipped_total",
        "timer ticks skipped because the previous tick still ran", NULL);
}

static void timer_unref(osara_timer_t *t)
{
    if (--t->refs == 0) {
        free(t);
    }
}

static void handle_closed(uv_handle_t *h)
{
    free(h);
}

/* Stops the libuv timer; the struct lives on while references remain. */
static void timer_stop(osara_timer_t *t)
{
    if (t->handle) {
        uv_timer_stop(t->handle);
        uv_close((uv_handle_t *)t->handle, handle_closed);
        t->handle = NULL;
    }
}

static void tick_done(osara_co_t *co, int ok, void *ud)
{
    (void)co;
    (void)ok;
    osara_timer_t *t = ud;
    t->running = 0;
    if (!t->repeat) {
        timer_stop(t);
    }
    timer_unref(t);
}

static void on_tick(uv_timer_t *h)
{
    osara_timer_t *t = h->data;
    if (t->running) {
        uv_once(&metrics_once, metrics_init);
        osara_metric_add(m_skipped, 1);
        return;
    }
    osara_vm_t *vm = t->entry ? t->entry->vm : t->vm;
    int fnref = t->entry ? t->entry->fnref : t->fnref;
    osara_co_t *co;
    lua_State *T = osara_sched_acquire(vm, 0, &co);
    if (T == NULL) {
        return;
    }
    lua_rawgeti(T, LUA_REGISTRYINDEX, fnref); /* T: [fn] */
    t->running = 1;
    t->refs++;
    osara_sched_run(co, 0, tick_done, t, t->what);
}

static void timer_arm(osara_timer_t *t)
{
    t->handle = osara_xmalloc(sizeof(*t->handle));
    OSARA_UV_MUST(uv_timer_init(&t->w->loop, t->handle));
    t->handle->data = t;
    uint64_t ms = (uint64_t)(t->interval * 1000 + 0.5);
    /* The loop's cached time may be stale after a long callback: a timer
     * armed now must measure from now. */
    uv_update_time(&t->w->loop);
    OSARA_UV_MUST(uv_timer_start(t->handle, on_tick, ms, t->repeat ? (ms ? ms : 1) : 0));
}

/* ---- registry kind "timer" ------------------------------------------- */

static int kind_start(osara_reg_entry_t *e)
{
    osara_timer_t *t = e->impl;
    t->entry = e;
    timer_arm(t);
    return 0;
}

static void kind_adopt(osara_reg_entry_t *e, osara_reg_entry_t *old)
{
    osara_timer_t *t = e->impl, *o = old->impl;
    /* Keep the running libuv timer (and its phase): hand it over. An
     * `after` that already fired has none: it does not fire again. */
    t->handle = o->handle;
    if (t->handle) {
        t->handle->data = t;
    }
    t->entry = e;
    o->handle = NULL;
}

static void kind_stop(osara_reg_entry_t *e)
{
    timer_stop(e->impl);
}

static void kind_release(osara_reg_entry_t *e)
{
    osara_timer_t *t = e->impl;
    if (t) {
        timer_stop(t);
        if (t->entry == e) {
            t->entry = NULL;
        }
        e->impl = NULL;
        timer_unref(t);
    }
}

static const osara_reg_kind_t timer_kind = {
    .name = "timer", .start = kind_start, .adopt = kind_adopt,
    .stop = kind_stop, .release = kind_release,
};

/* ---- runtime timers ----------------------------------------------------- */

static void runtime_close(void *ptr)
{
    osara_timer_t *t = ptr;
    t->own = NULL;
    timer_stop(t);
    timer_unref(t);
}

/* new(seconds, fn, repeat, key|nil, where) -> handle
 * With a key while the script loads: a registration (started after load).
 * Otherwise: a runtime timer owned by the VM. */
static int l_timer_new(lua_State *L)
{
    double secs = luaL_checknumber(L, 1);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    int repeat = lua_toboolean(L, 3);
    const char *key = luaL_optstring(L, 4, NULL);
    const char *where = luaL_optstring(L, 5, "?");
    if (secs < 0 || secs != secs) {
        return luaL_argerror(L, 1, "seconds must be >= 0");
    }
    osara_vm_t *vm = osara_vm_from_L(L);
    osara_timer_t *t = osara_xcalloc(1, sizeof(*t));
    t->w = vm->w;
    t->interval = secs;
    t->repeat = repeat;
    t->fnref = LUA_NOREF;
    t->refs = 1; /* the handle userdata */
    snprintf(t->what, sizeof(t->what), "%s at %s", repeat ? "timer" : "after", where);
    lua_pushvalue(L, 2);
    int fnref = luaL_ref(L, LUA_REGISTRYINDEX);
    if (vm->loading && key != NULL) {
        char sig[64];
        snprintf(sig, sizeof(sig), "%s %.17g", repeat ? "every" : "after", secs);
        osara_reg_entry_t *e = osara_registry_add(
            &vm->reg, &timer_kind, key, sig, where, sig, vm, fnref, LUA_NOREF);
        if (e == NULL) {
            free(t);
            return luaL_error(L, "%s", osara_err_msg());
        }
        e->impl = t;
        t->entry = e;
        t->refs++; /* the entry */
    } else {
        t->vm = vm;
        t->fnref = fnref;
        t->refs++; /* the VM's ownership */
        t->own = osara_vm_own(vm, runtime_close, t);
        timer_arm(t);
    }
    timer_ud_t *ud = osara_lua_newobject(L, sizeof(*ud), TIMER_MT);
    ud->t = t;
    return 1;
}

static timer_ud_t *check_timer(lua_State *L)
{
    return luaL_checkudata(L, 1, TIMER_MT);
}

/* handle:cancel() -> true if it was still armed */
static int l_timer_cancel(lua_State *L)
{
    timer_ud_t *ud = check_timer(L);
    osara_timer_t *t = ud->t;
    int armed = t && t->handle != NULL;
    if (t) {
        timer_stop(t);
        if (t->entry) {
            t->entry->active = 0;
        }
    }
    lua_pushboolean(L, armed);
    return 1;
}

static int l_timer_gc(lua_State *L)
{
    timer_ud_t *ud = check_timer(L);
    if (ud->t) {
        timer_unref(ud->t);
        ud->t = NULL;
    }
    return 0;
}

/* ---- sleep ------------------------------------------------------------- */

static int push_nothing(lua_State *L, void *unused)
{
    (void)L;
    (void)unused;
    return 0;
}

/* sleep(seconds): yields the running coroutine for that long. */
static int l_timer_sleep(lua_State *L)
{
    double secs = luaL_checknumber(L, 1);
    if (osara_sched_current(L) == NULL) {
        return luaL_error(L, "osara.sleep: cannot wait here: only inside a "
                             "handler, timer or task");
    }
    return osara_sched_wait_for(L, 0, secs > 0 ? secs : 0, NULL, NULL,
                                push_nothing);
}

static int l_timer_now(lua_State *L)
{
    lua_pushnumber(L, osara_now());
    return 1;
}

static int l_timer_monotonic(lua_State *L)
{
    lua_pushnumber(L, osara_monotonic());
    return 1;
}

int osara_timer_open(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"cancel", l_timer_cancel}, {NULL, NULL},
    };
    static const luaL_Reg fns[] = {
        {"new", l_timer_new},   {"sleep", l_timer_sleep},
        {"now", l_timer_now},   {"monotonic", l_timer_monotonic},
        {NULL, NULL},
    };
    osara_registry_kind(&timer_kind);
    osara_lua_newclass(L, TIMER_MT, methods, l_timer_gc, NULL);
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
