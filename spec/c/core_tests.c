/* C unit tests of the core: the scheduler (waits, deadlines, futures, stale
 * wake-ups, cancellation), the inbox's cancellation, shared resources held
 * per VM, the registry's all-or-nothing apply, and timers across a reload.
 * Each test builds a real worker loop and real VMs, without signals or a
 * script unless it needs one. */
#include <lauxlib.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "check.h"
#include "core/err.h"
#include "core/loop.h"
#include "core/lvm.h"
#include "core/registry.h"
#include "core/sched.h"
#include "core/worker.h"

/* ---- fixture: a worker's loop and inbox, VMs, entries ---------------------- */

static struct {
    int cleanups; /* wait cleanups run */
    int dones;    /* entries finished */
    int last_ok;
    char last[64]; /* last finished entry's top value, as a string */
} fx;

static void fx_init(osara_worker_t *w)
{
    memset(&fx, 0, sizeof(fx));
    memset(w, 0, sizeof(*w));
    uv_loop_init(&w->loop);
    osara_inbox_init(&w->inbox, &w->loop);
    w->script_dir = ".";
    w->data_dir = "/tmp";
}

/* Closes what is left and checks no libuv handle leaked. */
static int fx_free(osara_worker_t *w)
{
    osara_inbox_close(&w->inbox);
    uv_run(&w->loop, UV_RUN_DEFAULT);
    return uv_loop_close(&w->loop);
}

static osara_sched_future_t fut;
static int fut_freed;

static void fut_free(osara_sched_future_t *f)
{
    (void)f;
    fut_freed++;
}

/* A worker's loop and inbox with one VM (NULL if it cannot be made), and a
 * fresh future for the tests that wait on one. */
static osara_vm_t *fx_vm(osara_worker_t *w)
{
    fx_init(w);
    fut_freed = 0;
    osara_sched_future_init(&fut, fut_free);
    return osara_vm_new(osara_worker_vm_host(w), 1);
}

/* Closes the VM and the loop; 0 if no libuv handle leaked. */
static int fx_done(osara_worker_t *w, osara_vm_t *vm)
{
    osara_vm_close(vm);
    return fx_free(w);
}

static void count_cleanup(void *data)
{
    (void)data;
    fx.cleanups++;
}

/* wait() -> what the completion pushes */
static int l_wait(lua_State *L)
{
    return osara_sched_wait(L, 0, count_cleanup, NULL);
}

/* wait_for(seconds) -> nil, "timeout" unless resumed first */
static int l_wait_for(lua_State *L)
{
    return osara_sched_wait_for(L, 0, luaL_checknumber(L, 1), count_cleanup,
                                NULL, NULL);
}

/* future_wait([timeout]) -> the future's results */
static int l_future_wait(lua_State *L)
{
    return osara_sched_future_wait(L, &fut, 0, luaL_optnumber(L, 1, -1));
}

static int push_string(lua_State *L, void *s)
{
    lua_pushstring(L, s);
    return 1;
}

/* Compiles `return function(...) <body> end` with wait, wait_for and
 * future_wait as upvalues; returns its registry reference. */
static int entry_fn(osara_vm_t *vm, const char *body)
{
    lua_State *L = vm->L;
    char src[512];
    snprintf(src, sizeof(src),
             "local wait, wait_for, future_wait = ...\n"
             "return function(...) %s end", body);
    if (luaL_loadstring(L, src) != 0) {
        fprintf(stderr, "%s\n", lua_tostring(L, -1));
        abort();
    }
    lua_pushcfunction(L, l_wait);
    lua_pushcfunction(L, l_wait_for);
    lua_pushcfunction(L, l_future_wait);
    lua_call(L, 3, 1);
    return luaL_ref(L, LUA_REGISTRYINDEX);
}

static void on_done(osara_co_t *co, int ok, void *ud)
{
    (void)ud;
    lua_State *T = osara_co_thread(co);
    const char *top = lua_gettop(T) > 0 ? lua_tostring(T, -1) : NULL;
    fx.dones++;
    fx.last_ok = ok;
    snprintf(fx.last, sizeof(fx.last), "%s", top ? top : "(none)");
}

static osara_co_t *run_entry(osara_vm_t *vm, int fnref)
{
    osara_co_t *co;
    lua_State *T = osara_sched_acquire(vm, 1, &co);
    lua_rawgeti(T, LUA_REGISTRYINDEX, fnref); /* T: [fn] */
    osara_sched_run(co, 0, on_done, NULL, "test entry");
    return co;
}

/* Runs the loop until fx.dones reaches n (bounded by the ctest timeout). */
static void run_until_done(osara_worker_t *w, int n)
{
    while (fx.dones < n) {
        uv_run(&w->loop, UV_RUN_ONCE);
    }
}

/* ---- scheduler -------------------------------------------------------------- */

/* gh_12: a wake-up queued for one wait must not resume the coroutine's next
 * wait (it was resumed another way meanwhile, finished and was reused). */
void test_sched_ignores_a_stale_queued_resume(void)
{
    osara_worker_t w;
    osara_vm_t *vm = fx_vm(&w);
    CHECK(vm != NULL);
    int fn = entry_fn(vm, "return wait()");
    osara_co_t *a = run_entry(vm, fn);
    CHECK(osara_co_waiting(a));
    osara_sched_resume_later(a, 0); /* queued for this wait */
    lua_pushliteral(osara_co_thread(a), "direct");
    CHECK(osara_sched_resume(a, 1) == 0); /* another completion won */
    CHECK(fx.dones == 1 && strcmp(fx.last, "direct") == 0);
    osara_co_t *b = run_entry(vm, fn);
    CHECK(b == a && osara_co_waiting(b)); /* the pooled coroutine, reused */
    osara_inbox_drain(&w.inbox);          /* delivers the stale wake-up */
    CHECK(osara_co_waiting(b) && fx.dones == 1);
    CHECK(fx_done(&w, vm) == 0);
}

void test_sched_cancel_runs_cleanup_and_reports(void)
{
    osara_worker_t w;
    osara_vm_t *vm = fx_vm(&w);
    CHECK(vm != NULL);
    int fn = entry_fn(vm, "return wait()");
    osara_co_t *waiting = run_entry(vm, fn), *woken = run_entry(vm, fn);
    CHECK(osara_co_waiting(waiting) && osara_co_waiting(woken));
    /* Woken: its completion detached itself, the wake-up is queued. */
    osara_sched_resume_later(woken, 0);
    osara_vm_close(vm);
    CHECK(fx.cleanups == 1); /* the one still attached to its wait */
    CHECK(fx.dones == 2 && !fx.last_ok && strstr(fx.last, "cancelled"));
    CHECK(fx_free(&w) == 0); /* the queued wake-up was dropped, not run */
}

void test_sched_deadline_resumes_with_timeout(void)
{
    osara_worker_t w;
    osara_vm_t *vm = fx_vm(&w);
    CHECK(vm != NULL);
    int fn = entry_fn(vm, "local v, err = wait_for(0.01) return err");
    run_entry(vm, fn);
    run_until_done(&w, 1);
    CHECK(fx.last_ok && strcmp(fx.last, "timeout") == 0 && fx.cleanups == 1);
    /* Woken before its deadline: the deadline never fires afterwards. */
    osara_co_t *co = run_entry(vm, entry_fn(vm, "return wait_for(0.01)"));
    lua_pushliteral(osara_co_thread(co), "woken");
    osara_sched_resume_later(co, 1);
    run_until_done(&w, 2);
    CHECK(strcmp(fx.last, "woken") == 0 && fx.cleanups == 1);
    CHECK(fx_done(&w, vm) == 0);
}

void test_sched_future_completes_once_and_frees_at_last_ref(void)
{
    osara_worker_t w;
    osara_vm_t *vm = fx_vm(&w);
    CHECK(vm != NULL);
    int fn = entry_fn(vm, "return future_wait()");
    run_entry(vm, fn);
    CHECK(fut.refs == 2 && fx.dones == 0); /* the waiter holds one */
    osara_sched_future_complete(&fut, push_string, "42");
    CHECK(fx.dones == 1 && strcmp(fx.last, "42") == 0 && fut.refs == 1);
    osara_sched_future_complete(&fut, push_string, "43"); /* ignored */
    run_entry(vm, fn); /* done: returns at once */
    CHECK(fx.dones == 2 && strcmp(fx.last, "42") == 0);
    osara_sched_future_unref(&fut);
    CHECK(fut_freed == 1);
    CHECK(fx_done(&w, vm) == 0);
}

void test_sched_future_timeout_detaches_the_waiter(void)
{
    osara_worker_t w;
    osara_vm_t *vm = fx_vm(&w);
    CHECK(vm != NULL);
    run_entry(vm, entry_fn(vm, "local v, err = future_wait(0.01) return err"));
    run_until_done(&w, 1);
    CHECK(strcmp(fx.last, "timeout") == 0 && fut.refs == 1);
    osara_sched_future_complete(&fut, push_string, "late"); /* no waiter */
    CHECK(fx.dones == 1 && fut.done);
    osara_sched_future_unref(&fut);
    CHECK(fut_freed == 1);
    CHECK(fx_done(&w, vm) == 0);
}

/* ---- inbox cancellation ------------------------------------------------------ */

static int ran[4];
static osara_inbox_t *cancel_inbox;

static int is_marked(const osara_event_t *ev, void *mark)
{
    return ev->arg2 == mark;
}

static void record(void *arg, void *mark)
{
    (void)mark;
    ran[(intptr_t)arg]++;
}

/* Event 0 queues event 3, then cancels the marked ones: 2 (later in its own
 * batch) and 3 (queued) never run. */
static void cancel_marked(void *arg, void *mark)
{
    record(arg, NULL);
    osara_inbox_post(cancel_inbox, record, (void *)3, mark);
    osara_inbox_cancel(cancel_inbox, is_marked, mark);
}

void test_inbox_cancel_drops_batched_and_queued_events(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    osara_inbox_t inbox;
    CHECK(osara_inbox_init(&inbox, &loop) == 0);
    cancel_inbox = &inbox;
    memset(ran, 0, sizeof(ran));
    static int mark;
    osara_inbox_post(&inbox, cancel_marked, (void *)0, &mark);
    osara_inbox_post(&inbox, record, (void *)1, NULL);
    osara_inbox_post(&inbox, record, (void *)2, &mark);
    osara_inbox_drain(&inbox);
    CHECK(ran[0] == 1 && ran[1] == 1 && ran[2] == 0 && ran[3] == 0);
    osara_inbox_close(&inbox);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&loop) == 0);
}

/* ---- the loop turn's budget ------------------------------------------------ */

static int budget_order[16], budget_ran;
static osara_inbox_t *budget_inbox;

/* Each event stands for Lua that ran 0.4 ms of the turn's 1 ms budget. */
static void charge_event(void *arg, void *unused)
{
    (void)unused;
    budget_order[budget_ran++] = (int)(intptr_t)arg;
    osara_inbox_turn_charge(budget_inbox, 400000);
}

/* gh_12: a batch that outlasts the turn's budget leaves its rest to the
 * next turns (timers and sockets run between), in order, ahead of what was
 * posted meanwhile. */
void test_inbox_drain_stops_at_the_turn_budget(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    osara_inbox_t inbox;
    CHECK(osara_inbox_init(&inbox, &loop) == 0);
    inbox.budget_ns = 1000000;
    budget_inbox = &inbox;
    budget_ran = 0;
    for (intptr_t i = 0; i < 8; i++) {
        osara_inbox_post(&inbox, charge_event, (void *)i, NULL);
    }
    uv_run(&loop, UV_RUN_NOWAIT);
    CHECK(budget_ran == 3 && inbox.deferred_drains == 1); /* 1.2 ms > 1 ms */
    osara_inbox_post(&inbox, charge_event, (void *)8, NULL);
    while (budget_ran < 9) {
        uv_run(&loop, UV_RUN_NOWAIT);
    }
    for (int i = 0; i < 9; i++) {
        CHECK(budget_order[i] == i);
    }
    CHECK(inbox.drained_events == 9);
    osara_inbox_close(&inbox);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&loop) == 0);
}

/* gh_12: once a turn spent its Lua budget, a new entry, a resume and a
 * future's completion wait for the next turn instead of running now. */
void test_sched_defers_runs_past_the_turn_budget(void)
{
    osara_worker_t w;
    osara_vm_t *vm = fx_vm(&w);
    CHECK(vm != NULL);
    osara_co_t *waiting = run_entry(vm, entry_fn(vm, "return wait()"));
    osara_co_t *on_future = run_entry(vm, entry_fn(vm, "return future_wait()"));
    osara_inbox_turn_charge(&w.inbox, w.inbox.budget_ns); /* spent */
    run_entry(vm, entry_fn(vm, "return 'started'"));
    lua_pushliteral(osara_co_thread(waiting), "resumed");
    CHECK(osara_sched_resume(waiting, 1) == 0);
    osara_sched_future_complete(&fut, push_string, "completed");
    CHECK(fx.dones == 0 && osara_co_waiting(waiting) && osara_co_waiting(on_future));
    run_until_done(&w, 3); /* the next turn has budget again */
    CHECK(fx.dones == 3 && fx.last_ok && strcmp(fx.last, "completed") == 0);
    osara_sched_future_unref(&fut);
    CHECK(fx_done(&w, vm) == 0);
}

/* ---- handler limits ---------------------------------------------------------- */

/* gh_13: an entry still waiting past osara.handler_timeout is cancelled where
 * it waits (its wait's cleanup runs) and raises there; a task is exempt. */
void test_sched_handler_timeout_raises_where_it_waits(void)
{
    osara_worker_t w;
    osara_vm_t *vm = fx_vm(&w);
    CHECK(vm != NULL);
    vm->handler_timeout = 0.02;
    vm->slow_warning = 0;
    osara_co_t *task;
    lua_State *T = osara_sched_acquire(vm, 1, &task);
    lua_rawgeti(T, LUA_REGISTRYINDEX, entry_fn(vm, "return wait()")); /* T: [fn] */
    osara_co_set_task(task);
    osara_sched_run(task, 0, on_done, NULL, "test task");
    run_entry(vm, entry_fn(vm, "local ok, err = pcall(function() local v = wait() return v end) "
                                  "return err:match('osara.handler_timeout')"));
    run_until_done(&w, 1);
    CHECK(fx.last_ok && strcmp(fx.last, "osara.handler_timeout") == 0); /* by pcall */
    CHECK(fx.cleanups == 1 && osara_co_waiting(task)); /* the task still waits */
    CHECK(fx_done(&w, vm) == 0);
}

/* ---- shared resources ------------------------------------------------------- */

static int res_closed;

static void close_res(void *ptr)
{
    (void)ptr;
    res_closed++;
}

/* Makes vm the caller (as while its script loads) and gets or adds "k". */
static void *hold_as(osara_worker_t *w, osara_vm_t *vm, void *res)
{
    w->loading = vm;
    void *got = osara_worker_shared_get(w, "k");
    if (got == NULL) {
        osara_worker_shared_put(w, "k", res, close_res);
        got = res;
    }
    w->loading = NULL;
    return got;
}

/* gh_12: a client the new version stops naming stays open while the
 * retiring VM (whose __gc's use it) lives, whichever closes first. */
void test_shared_resource_lives_until_its_last_vm_closes(void)
{
    static int res;
    osara_worker_t w;
    fx_init(&w);
    for (int order = 0; order < 2; order++) {
        res_closed = 0;
        osara_vm_t *old = osara_vm_new(osara_worker_vm_host(&w), 1),
                   *neu = osara_vm_new(osara_worker_vm_host(&w), 2);
        CHECK(old && neu);
        CHECK(hold_as(&w, old, &res) == &res);
        CHECK(hold_as(&w, neu, NULL) == &res);
        CHECK(hold_as(&w, neu, NULL) == &res); /* one reference per VM */
        osara_vm_close(order ? old : neu);
        CHECK(res_closed == 0);
        osara_vm_close(order ? neu : old);
        CHECK(res_closed == 1 && w.shared == NULL);
    }
    CHECK(fx_free(&w) == 0);
}

/* ---- registry: all or nothing ----------------------------------------------- */

static int k_started, k_stopped;

static int k_start(osara_reg_entry_t *e)
{
    if (strcmp(e->key, "raises") == 0) {
        return luaL_error(e->vm->L, "boom in start");
    }
    if (strcmp(e->key, "fails") == 0) {
        return osara_err_set(OSARA_EINVAL, "refused");
    }
    k_started++;
    e->impl = e->impl ? e->impl : e;
    return 0;
}

static void k_stop(osara_reg_entry_t *e)
{
    (void)e;
    k_stopped++;
}

static void k_adopt(osara_reg_entry_t *e, osara_reg_entry_t *old)
{
    e->impl = old->impl;
    old->impl = NULL;
}

static const osara_reg_kind_t fake = {"fake", k_start, k_adopt, k_stop, NULL};

static void add(osara_registry_t *reg, const char *key, const char *sig,
                osara_vm_t *vm)
{
    osara_registry_add(reg, &fake, key, sig, "t.lua:1", "", vm, -1, -1);
}

void test_registry_apply_rolls_back_when_a_start_fails(void)
{
    osara_worker_t w;
    osara_vm_t *vm = fx_vm(&w);
    CHECK(vm != NULL);
    const char *bad[] = {"fails", "raises"};
    for (int i = 0; i < 2; i++) {
        osara_registry_t old = {0}, neu = {0};
        add(&old, "kept", "1", vm);
        add(&old, "changed", "1", vm);
        add(&old, "removed", "1", vm);
        CHECK(osara_registry_start_all(&old) == 0);
        void *kept_impl = old.head->impl;
        add(&neu, "kept", "1", vm);
        add(&neu, "changed", "2", vm);
        add(&neu, bad[i], "1", vm);
        k_started = k_stopped = 0;
        CHECK(osara_registry_apply(&old, &neu, NULL) != 0);
        CHECK(strstr(osara_err_msg(), i ? "boom in start" : "refused"));
        CHECK(strstr(osara_err_msg(), bad[i]) != NULL);
        for (osara_reg_entry_t *e = old.head; e; e = e->next) {
            CHECK(e->active); /* served as before */
        }
        for (osara_reg_entry_t *e = neu.head; e; e = e->next) {
            CHECK(!e->active);
        }
        CHECK(old.head->impl == kept_impl);
        /* changed+removed stopped, new changed started and stopped again,
         * then changed+removed started again. */
        CHECK(k_stopped == 3 && k_started == 3);
        osara_registry_stop_all(&old);
        osara_registry_free(&old);
        osara_registry_free(&neu);
    }
    CHECK(fx_done(&w, vm) == 0);
}

/* ---- timers across a reload ------------------------------------------------- */

static int ticks[3]; /* by VM generation */
static int fired;

static int l_tick(lua_State *L)
{
    ticks[osara_vm_from_L(L)->gen]++;
    return 0;
}

static int l_fired(lua_State *L)
{
    (void)L;
    fired++;
    return 0;
}

static int open_ctest(lua_State *L)
{
    lua_newtable(L);
    lua_pushcfunction(L, l_tick);
    lua_setfield(L, -2, "tick");
    lua_pushcfunction(L, l_fired);
    lua_setfield(L, -2, "fired");
    return 1;
}

static osara_vm_t *load(osara_worker_t *w, unsigned gen, const char *path)
{
    osara_vm_t *vm = osara_vm_new(osara_worker_vm_host(w), gen);
    if (vm == NULL) {
        return NULL;
    }
    lua_getglobal(vm->L, "package");
    lua_getfield(vm->L, -1, "preload");
    lua_pushcfunction(vm->L, open_ctest);
    lua_setfield(vm->L, -2, "ctest");
    lua_pop(vm->L, 2);
    if (osara_vm_load_script(vm, path, 5) != 0) {
        fprintf(stderr, "load: %s\n", osara_err_msg());
        osara_vm_close(vm);
        return NULL;
    }
    return vm;
}

/* An unchanged `every` is adopted by the new VM: the same libuv timer
 * keeps its phase and from then on calls the new version's function. An
 * `after` that already fired is kept too and does not fire again. */
void test_timer_is_adopted_across_a_reload(void)
{
    char path[64];
    snprintf(path, sizeof(path), "/tmp/osara-ctest-%d.lua", (int)getpid());
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    fputs("local osara = require 'osara'\nlocal ct = require 'ctest'\n"
          "osara.every(0.002, function() ct.tick() end)\n"
          "osara.after(0, function() ct.fired() end)\n", f);
    fclose(f);
    osara_worker_t w;
    fx_init(&w);
    memset(ticks, 0, sizeof(ticks));
    fired = 0;
    osara_vm_t *old = load(&w, 1, path);
    CHECK(old != NULL);
    w.vm = old;
    CHECK(osara_registry_start_all(&old->reg) == 0);
    while (ticks[1] < 2) {
        uv_run(&w.loop, UV_RUN_ONCE);
    }
    osara_vm_t *neu = load(&w, 2, path);
    CHECK(neu != NULL);
    osara_reg_diff_t d;
    CHECK(osara_registry_apply(&old->reg, &neu->reg, &d) == 0);
    CHECK(d.kept == 2 && d.started == 0 && d.stopped == 0 && fired == 1);
    w.vm = neu;
    osara_vm_close(old);
    int before = ticks[1];
    while (ticks[2] < 2) {
        uv_run(&w.loop, UV_RUN_ONCE);
    }
    CHECK(ticks[1] == before && fired == 1);
    osara_vm_close(neu);
    unlink(path);
    CHECK(fx_free(&w) == 0);
}

/* ---- a reload that cannot start ------------------------------------------------ */

static int nope_start(osara_reg_entry_t *e)
{
    return strcmp(e->key, "bad") == 0 ? osara_err_set(OSARA_EINVAL, "no way") : 0;
}

static const osara_reg_kind_t nope = {"ctest-nope", nope_start, NULL, NULL, NULL};

static struct {
    char path[64];
    int rc;
    osara_vm_t *before, *after;
    int active_after;
} rl;

static void write_script(const char *keys)
{
    FILE *f = fopen(rl.path, "w");
    fprintf(f, "local vm_c = require 'osara.vm_c'\n"
               "for _, k in ipairs { %s } do vm_c.register('ctest-nope', k, '1') end\n",
            keys);
    fclose(f);
}

static void reload_then_stop(uv_timer_t *t)
{
    osara_worker_t *w = t->data;
    rl.before = w->vm;
    write_script("'good', 'bad'");
    rl.rc = osara_worker_reload(w, "test");
    rl.after = w->vm;
    rl.active_after = w->vm && w->vm->reg.head && w->vm->reg.head->active;
    uv_close((uv_handle_t *)t, NULL);
    osara_worker_stop(w, 0);
}

/* gh_12: a new version whose registration fails to start is not swapped
 * in: the reload fails and the old version keeps serving, active. */
void test_worker_reload_that_cannot_start_keeps_the_old_version(void)
{
    osara_registry_kind(&nope);
    snprintf(rl.path, sizeof(rl.path), "/tmp/osara-ctest-%d.lua", (int)getpid());
    write_script("'good'");
    osara_worker_opts_t opts = {.script = rl.path, .data_dir = "/tmp",
                                .mode = OSARA_MODE_RUN, .grace = 1,
                                .load_timeout = 5};
    osara_worker_t w;
    CHECK(osara_worker_init(&w, &opts) == 0);
    uv_timer_t t;
    uv_timer_init(&w.loop, &t);
    t.data = &w;
    uv_timer_start(&t, reload_then_stop, 1, 0);
    CHECK(osara_worker_run(&w) == 0);
    unlink(rl.path);
    CHECK(rl.rc == OSARA_ESCRIPT && rl.before != NULL && rl.after == rl.before);
    CHECK(rl.active_after && w.reload_failures == 1 && w.reloads == 0);
    osara_worker_free(&w);
}
