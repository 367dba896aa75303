#include "core/worker.h"

#include <errno.h>
#include <lauxlib.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include "core/err.h"
#include "core/log.h"
#include "core/lvm.h"
#include "core/mem.h"
#include "core/metrics.h"
#include "core/registry.h"
#include "core/runaway.h"
#include "core/sched.h"
#include "core/signals.h"

/* Debounce for file events: editors write in several steps. */
#define WATCH_DEBOUNCE_MS 15
/* A reload that failed on a file change is reported after this long,
 * unless a later write (the rest of a save made in steps) replaces it. */
#define FAILURE_REPORT_MS 150

double osara_monotonic(void)
{
    return (double)uv_hrtime() / 1e9;
}

double osara_now(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
}

osara_worker_t *osara_worker_from_L(lua_State *L)
{
    osara_vm_t *vm = osara_vm_from_L(L);
    return vm ? vm->w : NULL;
}

/* ---- shared resources --------------------------------------------------- */

/* The VM whose Lua code is calling into C now. */
static osara_vm_t *calling_vm(osara_worker_t *w)
{
    osara_co_t *co = osara_sched_running();
    if (co != NULL && osara_co_vm(co)->w == w) {
        return osara_co_vm(co);
    }
    return w->loading ? w->loading : w->vm;
}

static void shared_close(osara_shared_t *s)
{
    osara_worker_t *w = s->w;
    for (osara_shared_t **p = &w->shared; *p; p = &(*p)->next) {
        if (*p == s) {
            *p = s->next;
            break;
        }
    }
    if (s->close) {
        s->close(s->ptr);
    }
    free(s->key);
    free(s);
}

/* A VM's reference, dropped after its lua_close (osara_vm_own_late). */
static void shared_release(void *ptr)
{
    osara_shared_t *s = ptr;
    if (--s->refs == 0) {
        shared_close(s);
    }
}

/* One reference per VM, however often the VM asks. */
static void shared_hold(osara_shared_t *s, osara_vm_t *vm)
{
    if (vm == NULL || osara_vm_owns_late(vm, shared_release, s)) {
        return;
    }
    s->refs++;
    osara_vm_own_late(vm, shared_release, s);
}

void *osara_worker_shared_get(osara_worker_t *w, const char *key)
{
    for (osara_shared_t *s = w->shared; s; s = s->next) {
        if (strcmp(s->key, key) == 0) {
            shared_hold(s, calling_vm(w));
            return s->ptr;
        }
    }
    return NULL;
}

void osara_worker_shared_put(osara_worker_t *w, const char *key, void *ptr,
                             void (*close)(void *ptr))
{
    osara_shared_t *s = osara_xcalloc(1, sizeof(*s));
    s->key = osara_xstrdup(key);
    s->ptr = ptr;
    s->close = close;
    s->w = w;
    s->next = w->shared;
    w->shared = s;
    osara_vm_t *vm = calling_vm(w);
    if (vm == NULL) {
        /* Not reachable from Lua: the worker holds it until it stops. */
        s->refs = 1;
        return;
    }
    shared_hold(s, vm);
}

/* At stop, after every VM closed: what no VM held (see put). */
static void shared_close_all(osara_worker_t *w)
{
    while (w->shared) {
        shared_close(w->shared);
    }
}

/* ---- paths -------------------------------------------------------------- */

static char *dir_of(const char *path)
{
    char *copy = osara_xstrdup(path);
    char *slash = strrchr(copy, '/');
    if (slash == NULL) {
        free(copy);
        return osara_xstrdup(".");
    }
    if (slash == copy) {
        slash[1] = '\0';
    } else {
        *slash = '\0';
    }
    return copy;
}

/* Creates path and its missing parents, as mkdir -p does. */
static int ensure_dir(const char *path)
{
    char buf[PATH_MAX];
    if (snprintf(buf, sizeof(buf), "%s", path) >= (int)sizeof(buf)) {
        return osara_err_set(-ENAMETOOLONG, "cannot create data folder %s: %s", path,
                             strerror(ENAMETOOLONG));
    }
    for (char *p = buf + 1; ; p++) {
        if (*p != '/' && *p != '\0') {
            continue;
        }
        char c = *p;
        *p = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) {
            return osara_err_set(-errno, "cannot create data folder %s: %s", buf,
                                 strerror(errno));
        }
        *p = c;
        if (c == '\0') {
            return 0;
        }
    }
}

/* ---- signals ------------------------------------------------------------- */

/* The first SIGINT/SIGTERM (the second exits in the handler: signals.c). */
static void on_stop_signal(uv_async_t *h)
{
    osara_worker_t *w = h->data;
    int signum = osara_signals_received();
    OSARA_INFO("%s received: stopping (grace %gs)",
               signum == SIGINT ? "SIGINT" : "SIGTERM", w->opts.grace);
    osara_worker_stop(w, 0);
}

static void on_sighup(uv_signal_t *h, int signum)
{
    (void)signum;
    osara_worker_reload(h->data, "SIGHUP");
}

/* Signals and the worker's own timers. 0 or a negative uv error. */
static int init_handles(osara_worker_t *w)
{
    int rc = uv_async_init(&w->loop, &w->stop_signal, on_stop_signal);
    if (rc == 0) {
        w->stop_signal.data = w;
        rc = osara_signals_watch(&w->stop_signal);
    }
    if (rc == 0) {
        rc = uv_signal_init(&w->loop, &w->sighup);
    }
    if (rc == 0) {
        w->sighup.data = w;
        rc = uv_signal_start(&w->sighup, on_sighup, SIGHUP);
    }
    if (rc == 0) {
        rc = uv_timer_init(&w->loop, &w->stop_timer);
    }
    if (rc == 0) {
        rc = uv_timer_init(&w->loop, &w->watch_timer);
    }
    if (rc == 0) {
        rc = uv_timer_init(&w->loop, &w->report_timer);
    }
    w->stop_timer.data = w->watch_timer.data = w->report_timer.data = w;
    return rc;
}

int osara_worker_init(osara_worker_t *w, const osara_worker_opts_t *opts)
{
    memset(w, 0, sizeof(*w));
    w->opts = *opts;
    int rc = uv_loop_init(&w->loop);
    if (rc != 0) {
        return osara_err_set(rc, "cannot start the event loop: %s", uv_strerror(rc));
    }
    rc = osara_inbox_init(&w->inbox, &w->loop);
    if (rc != 0) {
        return osara_err_set(rc, "cannot start the inbox: %s", uv_strerror(rc));
    }
    unsigned stall_ms = opts->mode == OSARA_MODE_RUN ? opts->loop_stall_ms : 0;
    rc = osara_watchdog_init(&w->watchdog, &w->loop, stall_ms);
    if (rc != 0) {
        return osara_err_set(rc, "cannot start the watchdog: %s", uv_strerror(rc));
    }
    if (opts->script) {
        w->script_path = osara_xstrdup(opts->script);
        w->script_dir = dir_of(opts->script);
    } else {
        char cwd[PATH_MAX];
        w->script_dir = osara_xstrdup(getcwd(cwd, sizeof(cwd)) ? cwd : ".");
    }
    if (opts->data_dir) {
        w->data_dir = osara_xstrdup(opts->data_dir);
    } else {
        size_t n = strlen(w->script_dir) + 32;
        w->data_dir = osara_xmalloc(n);
        snprintf(w->data_dir, n, "%s/.osara-data", w->script_dir);
    }
    rc = init_handles(w);
    if (rc != 0) {
        return osara_err_set(rc, "cannot watch signals: %s", uv_strerror(rc));
    }
    return 0;
}

/* ---- watching ------------------------------------------------------------- */

/* Reloads when the files' contents differ from the serving version's
 * and from the contents the last reload failed on (reported once). */
static void on_watch_debounced(uv_timer_t *t)
{
    osara_worker_t *w = t->data;
    if (w->vm && !w->stopping && osara_vm_files_changed(w->vm) &&
        osara_vm_files_signature(w->vm) != w->failed_sig) {
        osara_worker_reload(w, "file changed");
    }
    w->reload_started = 0;
}

static void on_fs_event(uv_fs_event_t *h, const char *filename, int events,
                        int status)
{
    (void)filename;
    (void)events;
    (void)status;
    osara_worker_t *w = h->data;
    w->reload_started = osara_monotonic(); /* timed from the last write */
    OSARA_UV_MUST(uv_timer_start(&w->watch_timer, on_watch_debounced, WATCH_DEBOUNCE_MS, 0));
}

static void watcher_closed(uv_handle_t *h)
{
    (void)h;
}

static void unwatch(osara_worker_t *w)
{
    for (int i = 0; i < w->nwatchers; i++) {
        uv_close((uv_handle_t *)&w->watchers[i], watcher_closed);
    }
    /* Freed after the close callbacks ran (next loop turn). */
    w->nwatchers = 0;
}

/* Watches the folders of the VM's files: editors replace files by rename,
 * which a watch on the file itself would miss. */
static void watch_files(osara_worker_t *w)
{
    if (!w->opts.watch || w->vm == NULL) {
        return;
    }
    unwatch(w);
    free(w->old_watchers); /* closed a reload ago: their callbacks ran */
    w->old_watchers = w->watchers;
    w->watchers = osara_xcalloc((size_t)w->vm->nfiles, sizeof(uv_fs_event_t));
    for (int i = 0; i < w->vm->nfiles; i++) {
        char *dir = dir_of(w->vm->files[i]);
        int seen = 0;
        for (int j = 0; j < i && !seen; j++) {
            char *other = dir_of(w->vm->files[j]);
            seen = strcmp(other, dir) == 0;
            free(other);
        }
        if (!seen) {
            uv_fs_event_t *h = &w->watchers[w->nwatchers];
            OSARA_UV_MUST(uv_fs_event_init(&w->loop, h));
            h->data = w;
            if (uv_fs_event_start(h, on_fs_event, dir, 0) == 0) {
                w->nwatchers++;
            } else {
                uv_close((uv_handle_t *)h, watcher_closed);
            }
        }
        free(dir);
    }
    /* A change written between loading and watching raised no event. */
    if (osara_vm_files_changed(w->vm)) {
        OSARA_UV_MUST(uv_timer_start(&w->watch_timer, on_watch_debounced, WATCH_DEBOUNCE_MS, 0));
    }
}

/* ---- load / reload --------------------------------------------------------- */

/* A VM with nothing in flight: a retired one closes, a stop continues. */
static void vm_idle(osara_vm_t *vm)
{
    osara_worker_t *w = vm->w;
    if (vm->closing) {
        return;
    }
    if (!vm->accepting && vm != w->vm) {
        osara_vm_close(vm);
        return;
    }
    if (w->stopping) {
        osara_worker_stop(w, w->exit_code);
    }
}

static void vm_closed(osara_vm_t *vm)
{
    osara_worker_t *w = vm->w;
    osara_watchdog_skip_turn(&w->watchdog); /* lua_close of a whole state */
    for (osara_vm_t **p = &w->retiring; *p; p = &(*p)->next_retiring) {
        if (*p == vm) {
            *p = vm->next_retiring;
            break;
        }
    }
    if (w->vm == vm) {
        w->vm = NULL;
    }
}

static void host_stats(osara_worker_t *w, double *reloads, double *failures,
                       int *stopping)
{
    *reloads = (double)w->reloads;
    *failures = (double)w->reload_failures;
    *stopping = w->stopping;
}

const osara_vm_host_t *osara_worker_vm_host(osara_worker_t *w)
{
    static const char *modes[] = {"run", "check", "test"};
    w->vm_host = (osara_vm_host_t){
        .w = w, .loop = &w->loop, .inbox = &w->inbox, .mode = modes[w->opts.mode],
        .script_path = w->script_path ? w->script_path : "",
        .script_dir = w->script_dir, .data_dir = w->data_dir,
        .stop = osara_worker_stop, .stats = host_stats,
    };
    return &w->vm_host;
}

static osara_vm_t *load_new_vm(osara_worker_t *w)
{
    w->gen++;
    osara_vm_t *vm = osara_vm_new(osara_worker_vm_host(w), w->gen);
    if (vm == NULL) {
        return NULL;
    }
    vm->on_idle = vm_idle;
    vm->on_close = vm_closed;
    if (w->opts.mode == OSARA_MODE_TEST) {
        return vm;
    }
    w->loading = vm;
    int rc = osara_vm_load_script(vm, w->script_path, w->opts.load_timeout);
    w->loading = NULL;
    if (rc != 0) {
        char msg[1024];
        snprintf(msg, sizeof(msg), "%s", osara_err_msg());
        vm->accepting = 0;
        osara_vm_close(vm); /* releases what only it held */
        osara_err_set(OSARA_ESCRIPT, "%s", msg);
        return NULL;
    }
    return vm;
}

/* Prints the held "reload failed" line, if any. */
static void report_failure_now(osara_worker_t *w)
{
    uv_timer_stop(&w->report_timer);
    if (w->pending_failure) {
        OSARA_ERROR("%s", w->pending_failure);
        free(w->pending_failure);
        w->pending_failure = NULL;
    }
}

static void on_report_timer(uv_timer_t *t)
{
    report_failure_now(t->data);
}

/* A failed reload: on a file change the line waits FAILURE_REPORT_MS, so
 * that an editor's save in several steps reports only its end result. */
static void report_failure(osara_worker_t *w, const char *why)
{
    char line[1200];
    snprintf(line, sizeof(line), "reload failed (%s), still running the previous version: %s",
             why, osara_err_msg());
    free(w->pending_failure);
    w->pending_failure = osara_xstrdup(line);
    if (strcmp(why, "file changed") != 0) {
        report_failure_now(w);
        return;
    }
    OSARA_UV_MUST(uv_timer_start(&w->report_timer, on_report_timer, FAILURE_REPORT_MS, 0));
}

/* A later reload replaces a failure not reported yet. */
static void drop_pending_failure(osara_worker_t *w)
{
    uv_timer_stop(&w->report_timer);
    free(w->pending_failure);
    w->pending_failure = NULL;
}

int osara_worker_reload(osara_worker_t *w, const char *why)
{
    if (w->stopping || w->opts.mode != OSARA_MODE_RUN) {
        return 0;
    }
    double t0 = w->reload_started ? w->reload_started : osara_monotonic();
    w->reload_started = 0;
    osara_watchdog_skip_turn(&w->watchdog); /* timed in the "reloaded" line */
    osara_vm_t *old = w->vm;
    osara_vm_t *vm = load_new_vm(w);
    osara_reg_diff_t diff;
    if (vm != NULL) {
        w->vm = vm;
        if (osara_registry_apply(&old->reg, &vm->reg, &diff) != 0) {
            /* Rolled back: the old version serves as before. */
            char msg[1024];
            snprintf(msg, sizeof(msg), "%s", osara_err_msg());
            w->vm = old;
            vm->accepting = 0;
            osara_vm_close(vm);
            osara_err_set(OSARA_ESCRIPT, "%s", msg);
            vm = NULL;
        }
    }
    if (vm == NULL) {
        w->reload_failures++;
        osara_metric_add(osara_metrics_counter("osara_reload_failures_total",
                                               "reloads that failed to load", NULL), 1);
        w->failed_sig = osara_vm_files_signature(w->vm);
        report_failure(w, why);
        watch_files(w); /* keep watching the files of the serving VM */
        return OSARA_ESCRIPT;
    }
    drop_pending_failure(w);
    w->failed_sig = 0;
    /* What the new version stopped naming closes with the old VM. */
    old->next_retiring = w->retiring;
    w->retiring = old;
    osara_vm_retire(old, w->opts.grace);
    w->reloads++;
    osara_metric_add(osara_metrics_counter("osara_reloads_total",
                                           "successful reloads", NULL), 1);
    OSARA_INFO("reloaded %s (%s) in %.1f ms: %d kept, %d added, %d removed, "
               "%d restarted, %d updated%s",
               w->script_path, why, (osara_monotonic() - t0) * 1000, diff.kept,
               diff.started, diff.stopped, diff.restarted, diff.updated, diff.what);
    watch_files(w);
    return 0;
}

/* ---- stop ------------------------------------------------------------------ */

static void close_walk(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h)) {
        uv_close(h, NULL);
    }
}

static void finish_stop(osara_worker_t *w)
{
    uv_timer_stop(&w->stop_timer);
    osara_watchdog_close(&w->watchdog); /* closing clients may take a while */
    while (w->retiring) {
        osara_vm_close(w->retiring);
    }
    if (w->vm) {
        osara_vm_close(w->vm);
    }
    shared_close_all(w);
    unwatch(w);
    osara_inbox_close(&w->inbox);
    osara_signals_unwatch(&w->stop_signal);
    uv_close((uv_handle_t *)&w->stop_signal, NULL);
    uv_close((uv_handle_t *)&w->sighup, NULL);
    report_failure_now(w);
    uv_close((uv_handle_t *)&w->stop_timer, NULL);
    uv_close((uv_handle_t *)&w->watch_timer, NULL);
    uv_close((uv_handle_t *)&w->report_timer, NULL);
}

static int all_idle(osara_worker_t *w)
{
    if (w->vm && w->vm->inflight > 0) {
        return 0;
    }
    return w->retiring == NULL;
}

static void on_stop_grace(uv_timer_t *t)
{
    osara_worker_t *w = t->data;
    OSARA_WARN("%d coroutine(s) still running after the %gs grace period; "
               "cancelling them", w->vm ? w->vm->inflight : 0, w->opts.grace);
    finish_stop(w);
}

/* Spawns osara.lifecycle.<fn>() as a task of vm; done runs when it ends. */
static void spawn_lifecycle(osara_worker_t *w, const char *fn, osara_co_done_fn done,
                            const char *what)
{
    lua_State *L = w->vm->L;
    lua_getglobal(L, "require");
    lua_pushliteral(L, "osara.lifecycle");
    lua_call(L, 1, 1);
    lua_getfield(L, -1, fn);
    lua_remove(L, -2); /* [fn] */
    osara_sched_spawn(w->vm, 0, 1, done, w, what);
}

/* The on_start hooks returned: the registrations start (consumers
 * subscribe, timers run, routes answer). A hook that raised (logged by
 * the scheduler) stops the host with status 1. */
static void on_started(struct osara_co_s *co, int ok, void *ud)
{
    (void)co;
    osara_worker_t *w = ud;
    if (w->stopping) {
        return;
    }
    if (!ok) {
        OSARA_ERROR("an on_start hook failed: stopping");
        osara_worker_stop(w, 1);
    } else if (osara_registry_start_all(&w->vm->reg) != 0) {
        osara_worker_stop(w, 1);
    } else {
        OSARA_INFO("running %s (pid %d): Ctrl-C or SIGTERM stops it, SIGHUP reloads it%s",
                   w->script_path, (int)getpid(), w->opts.watch ? ", and so does saving it" : "");
    }
}

static void on_stop_hooks_done(struct osara_co_s *co, int ok, void *ud)
{
    (void)co;
    (void)ok;
    (void)ud; /* the VM going idle continues the stop */
}

void osara_worker_stop(osara_worker_t *w, int exit_code)
{
    if (!w->stopping) {
        w->stopping = 1;
        w->exit_code = exit_code;
        /* Stopping every registration (consumers leave their groups) is
         * the shutdown's work, not a stall (watchdog.h). */
        osara_watchdog_skip_turn(&w->watchdog);
        if (w->vm) {
            osara_registry_stop_all(&w->vm->reg);
            w->vm->accepting = 0;
            /* Service loops started at load would never finish by
             * themselves; handlers in flight get the grace period. */
            osara_sched_cancel_load_tasks(w->vm);
        }
        OSARA_UV_MUST(uv_timer_start(&w->stop_timer, on_stop_grace,
                                     (uint64_t)(w->opts.grace * 1000), 0));
    }
    if (w->stopping == 1 && all_idle(w) && w->vm && !w->stop_hooks_run &&
        w->opts.mode == OSARA_MODE_RUN) {
        /* Consumers stopped and the handlers in flight finished: the
         * on_stop hooks run before the clients close, within the grace. */
        w->stop_hooks_run = 1;
        spawn_lifecycle(w, "run_stop", on_stop_hooks_done, "on_stop");
    }
    if (w->stopping == 1 && all_idle(w)) {
        w->stopping = 2;
        finish_stop(w);
    }
}

static void test_done(struct osara_co_s *co, int ok, void *ud)
{
    (void)co;
    if (!ok) {
        osara_worker_stop(ud, 1);
    }
}

/* osara test: busted runs as the VM's one task; it stops the worker. */
static void start_tests(osara_worker_t *w)
{
    lua_State *L = w->vm->L;
    lua_getglobal(L, "require");
    lua_pushliteral(L, "osara.testrun");
    lua_call(L, 1, 1);
    lua_getfield(L, -1, "run");
    lua_remove(L, -2); /* [run] */
    lua_createtable(L, w->opts.ntest_paths, 0);
    for (int i = 0; i < w->opts.ntest_paths; i++) {
        lua_pushstring(L, w->opts.test_paths[i]);
        lua_rawseti(L, -2, i + 1);
    }
    if (w->opts.test_output) {
        lua_pushstring(L, w->opts.test_output);
    } else {
        lua_pushnil(L);
    } /* [run, paths, output] */
    osara_co_t *co;
    lua_State *T = osara_sched_acquire(w->vm, 0, &co);
    if (T == NULL) {
        lua_pop(L, 3);
        osara_worker_stop(w, 1);
        return;
    }
    lua_xmove(L, T, 3); /* T: [run, paths, output] */
    osara_co_set_task(co); /* runs for the whole suite */
    osara_sched_run(co, 2, test_done, w, "osara test");
}

int osara_worker_run(osara_worker_t *w)
{
    if (w->opts.mode == OSARA_MODE_RUN && ensure_dir(w->data_dir) != 0) {
        OSARA_ERROR("%s", osara_err_msg());
        return 3;
    }
    osara_vm_t *vm = load_new_vm(w);
    if (vm == NULL) {
        OSARA_ERROR("%s", osara_err_msg());
        finish_stop(w);
        uv_run(&w->loop, UV_RUN_DEFAULT);
        return 1;
    }
    w->vm = vm;
    if (w->opts.mode == OSARA_MODE_CHECK) {
        finish_stop(w);
        uv_run(&w->loop, UV_RUN_DEFAULT);
        return 0;
    }
    if (w->opts.mode == OSARA_MODE_TEST) {
        start_tests(w);
    } else {
        spawn_lifecycle(w, "run_start", on_started, "on_start");
    }
    watch_files(w);
    osara_watchdog_start(&w->watchdog);
    /* Run mode only, as the stall watchdog: `osara test` runs its suite
     * in one long task that may block in C (io.popen) for good reasons. */
    osara_runaway_t *guard = NULL;
    if (w->opts.mode == OSARA_MODE_RUN &&
        (guard = osara_runaway_start(osara_sched_interrupt_running)) == NULL) {
        OSARA_WARN("%s; handlers that never yield will not be interrupted",
                   osara_err_msg());
    }
    uv_run(&w->loop, UV_RUN_DEFAULT);
    if (guard) {
        osara_runaway_stop(guard);
    }
    uv_walk(&w->loop, close_walk, NULL);
    uv_run(&w->loop, UV_RUN_DEFAULT);
    free(w->watchers);
    free(w->old_watchers);
    w->watchers = w->old_watchers = NULL;
    if (w->opts.mode == OSARA_MODE_RUN) {
        OSARA_INFO("stopped %s (exit status %d)", w->script_path, w->exit_code);
    }
    return w->exit_code;
}

void osara_worker_free(osara_worker_t *w)
{
    uv_loop_close(&w->loop);
    free(w->script_path);
    free(w->script_dir);
    free(w->data_dir);
    free(w->watchers);
    free(w->old_watchers);
    w->script_path = w->script_dir = w->data_dir = NULL;
    w->watchers = w->old_watchers = NULL;
}
