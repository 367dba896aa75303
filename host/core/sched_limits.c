/* sched_limits.c - how long a handler may run.
 *
 * Three limits per VM (seconds, 0: off), set by the script:
 *   osara.runaway_timeout (default 5): Lua that runs that long without
 *     yielding is interrupted: the runaway guard (runaway.h) signals the
 *     loop thread, whose handler sets a count hook that raises a
 *     "runaway" error at the next interpreted instruction;
 *   osara.handler_timeout (off by default): an entry that is still in
 *     flight after that long while it waits is cancelled: its wait's
 *     cleanup runs and it resumes into a hook that raises "timeout" where
 *     it waited, so the error takes the handler's failure path;
 *   osara.slow_handler_warning (default 60): an entry in flight that long
 *     is named in one warning.
 * Tasks (osara.spawn) and the test runner are services, not handlers: only
 * the runaway limit applies to them. */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/log.h"
#include "core/lvm.h"
#include "core/mem.h"
#include "core/metrics.h"
#include "core/runaway.h"
#include "core/sched_int.h"

/* When the current outermost run began (for the runaway message). */
static _Thread_local uint64_t run_t0;

static uint64_t secs_ns(double s)
{
    return s > 0 ? (uint64_t)(s * 1e9) : 0;
}

static void count_interrupt(const char *kind)
{
    char labels[32];
    snprintf(labels, sizeof(labels), "kind=\"%s\"", kind);
    osara_metric_add(osara_metrics_counter("osara_handler_interrupts_total",
                                           "handler runs interrupted by "
                                           "osara.runaway_timeout or "
                                           "osara.handler_timeout", labels), 1);
}

/* Raises the pending interrupt of the running entry as a Lua error. */
static void interrupt_hook(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    lua_sethook(L, NULL, 0, 0);
    osara_co_t *co = osara__running;
    if (co == NULL || co->interrupt == 0) {
        return; /* the run it was meant for ended first */
    }
    int kind = co->interrupt;
    co->interrupt = 0;
    co->interrupted = kind;
    char at[160], msg[320];
    osara_vm_where(L, 0, at, sizeof(at));
    osara_vm_t *vm = co->vm;
    if (kind == OSARA__INTERRUPT_RUNAWAY) {
        double secs = (double)(uv_hrtime() - run_t0) / 1e9;
        osara_runaway_delivered();
        count_interrupt("runaway");
        OSARA_WARN("runaway: %s ran %.1f s without yielding; interrupted at %s "
                   "(osara.runaway_timeout is %gs)", co->what, secs, at,
                   vm->runaway_timeout);
        snprintf(msg, sizeof(msg), "%s: runaway: ran %.1f s without yielding "
                 "(osara.runaway_timeout)", at, secs);
    } else {
        double secs = (double)(uv_hrtime() - co->started_ns) / 1e9;
        count_interrupt("timeout");
        OSARA_WARN("timeout: %s ran %.1f s, past osara.handler_timeout (%gs); "
                   "cancelled at %s", co->what, secs, vm->handler_timeout, at);
        snprintf(msg, sizeof(msg), "%s: timeout: the handler ran %.1f s "
                 "(osara.handler_timeout)", at, secs);
    }
    lua_pushstring(L, msg);
    lua_error(L);
}

const char *osara_sched_interrupt_running(void)
{
    osara_co_t *co = osara__running;
    if (co == NULL) {
        return NULL;
    }
    co->interrupt = OSARA__INTERRUPT_RUNAWAY;
    lua_sethook(co->thread, interrupt_hook, LUA_MASKCOUNT, 1);
    return co->what;
}

void osara__limits_before_resume(osara_co_t *co)
{
    co->ran = 1;
    if (co->interrupt) {
        lua_sethook(co->thread, interrupt_hook, LUA_MASKCOUNT, 1);
    }
}

void osara__limits_run_begin(osara_co_t *co, uint64_t t0)
{
    run_t0 = t0;
    if (!co->vm->loading) { /* the load has its own limit (--load-timeout) */
        osara_runaway_enter(t0, secs_ns(co->vm->runaway_timeout));
    }
}

void osara__limits_after_resume(osara_co_t *co)
{
    if (co->interrupt) { /* signalled as it finished or yielded */
        co->interrupt = 0;
        lua_sethook(co->thread, NULL, 0, 0);
    }
}

void osara__limits_reset(osara_co_t *co)
{
    co->started_ns = co->deadline_ns = 0;
    co->task = co->warned = co->ran = co->interrupted = 0;
    co->interrupt = 0;
}

/* ---- the VM's limits timer: slow entries and handler_timeout ------------- */

static void warn_if_slow(osara_co_t *co, uint64_t now)
{
    uint64_t after = secs_ns(co->vm->slow_warning);
    if (co->warned || after == 0 || now - co->started_ns < after) {
        return;
    }
    co->warned = 1;
    OSARA_WARN("slow handler: %s has run for %.1f s and is still in flight "
               "(osara.slow_handler_warning is %gs)", co->what,
               (double)(now - co->started_ns) / 1e9, co->vm->slow_warning);
}

/* Cancels co's wait and resumes it (from the inbox) into the timeout. */
static void expire(osara_co_t *co, uint64_t now)
{
    co->deadline_ns = now + secs_ns(co->vm->handler_timeout); /* the next attempt's */
    osara__sched_cancel_wait(co);
    lua_settop(co->thread, 0); /* values a completion had pushed */
    co->interrupt = OSARA__INTERRUPT_TIMEOUT;
    co->waiting = 1;
    co->seq++;
    (void)osara_sched_resume_later(co, 0); /* fails only at close */
}

static void on_limits_tick(uv_timer_t *t)
{
    osara_vm_t *vm = t->data;
    uint64_t now = uv_hrtime();
    for (osara_co_t *co = vm->all; co && !vm->closing; co = co->next_all) {
        if (co->started_ns == 0 || co->task) {
            continue;
        }
        warn_if_slow(co, now);
        if (co->deadline_ns && now >= co->deadline_ns && co->waiting && co->ran &&
            !co->interrupt) {
            expire(co, now);
        }
    }
}

/* A tenth of the shortest limit, within 10 ms .. 1 s. */
static uint64_t tick_ms(osara_vm_t *vm)
{
    double s = 1.0;
    if (vm->handler_timeout > 0 && vm->handler_timeout / 10 < s) {
        s = vm->handler_timeout / 10;
    }
    if (vm->slow_warning > 0 && vm->slow_warning / 10 < s) {
        s = vm->slow_warning / 10;
    }
    return s < 0.01 ? 10 : (uint64_t)(s * 1000);
}

static void timer_closed(uv_handle_t *h)
{
    free(h);
}

/* Starts, restarts or stops the timer after a limit changed. */
static void arm_timer(osara_vm_t *vm)
{
    if (vm->handler_timeout <= 0 && vm->slow_warning <= 0) {
        if (vm->limits_timer) {
            uv_timer_stop(vm->limits_timer);
        }
        return;
    }
    if (vm->limits_timer == NULL) {
        vm->limits_timer = osara_xmalloc(sizeof(*vm->limits_timer));
        OSARA_UV_MUST(uv_timer_init(vm->loop, vm->limits_timer));
        vm->limits_timer->data = vm;
        uv_unref((uv_handle_t *)vm->limits_timer);
    }
    uint64_t ms = tick_ms(vm);
    OSARA_UV_MUST(uv_timer_start(vm->limits_timer, on_limits_tick, ms, ms));
}

void osara__limits_entry_started(osara_co_t *co)
{
    osara_vm_t *vm = co->vm;
    co->started_ns = uv_hrtime();
    co->warned = 0;
    co->deadline_ns = 0;
    if (co->task) {
        return;
    }
    if (vm->handler_timeout > 0) {
        co->deadline_ns = co->started_ns + secs_ns(vm->handler_timeout);
    }
    if (vm->limits_timer == NULL) {
        arm_timer(vm);
    }
}

void osara__limits_free(osara_vm_t *vm)
{
    if (vm->limits_timer) {
        uv_close((uv_handle_t *)vm->limits_timer, timer_closed);
        vm->limits_timer = NULL;
    }
}

/* ---- Lua: osara.sched_c.limit / interrupted ------------------------------ */

static double *limit_field(osara_vm_t *vm, const char *name)
{
    if (strcmp(name, "runaway_timeout") == 0) {
        return &vm->runaway_timeout;
    }
    if (strcmp(name, "handler_timeout") == 0) {
        return &vm->handler_timeout;
    }
    if (strcmp(name, "slow_handler_warning") == 0) {
        return &vm->slow_warning;
    }
    return NULL;
}

/* limit(name [, seconds]) -> seconds: reads or sets a limit of this VM
 * (0: off). osara.lua checks the value. */
int osara__limits_l_limit(lua_State *L)
{
    osara_vm_t *vm = osara_vm_from_L(L);
    const char *name = luaL_checkstring(L, 1);
    double *field = limit_field(vm, name);
    if (field == NULL) {
        return luaL_error(L, "unknown limit '%s'", name);
    }
    if (!lua_isnoneornil(L, 2)) {
        double v = luaL_checknumber(L, 2);
        *field = v > 0 ? v : 0;
        if (field != &vm->runaway_timeout) {
            arm_timer(vm);
        }
    }
    lua_pushnumber(L, *field);
    return 1;
}

/* interrupted() -> "runaway" | "timeout" | nil: why the running entry's
 * last error was raised by a limit (read once). */
int osara__limits_l_interrupted(lua_State *L)
{
    osara_co_t *co = osara_sched_current(L);
    int kind = co ? co->interrupted : 0;
    if (co) {
        co->interrupted = 0;
    }
    if (kind == 0) {
        lua_pushnil(L);
    } else {
        lua_pushstring(L, kind == OSARA__INTERRUPT_RUNAWAY ? "runaway" : "timeout");
    }
    return 1;
}
