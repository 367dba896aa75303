/* worker.h - one thread: its libuv loop, its Lua VM, its inbox.
 *
 * The worker owns the loop and everything that must outlive a reload:
 * shared C resources (broker clients keyed by configuration), the file
 * watcher, signal handling and the shutdown sequence. `--workers N` would
 * create N of these, each on its own thread. */
#ifndef OSARA_WORKER_H
#define OSARA_WORKER_H

#include <lua.h>
#include <uv.h>

#include "core/loop.h"
#include "core/lvm.h"
#include "core/watchdog.h"

struct osara_vm_s;
struct osara_co_s;

typedef enum {
    OSARA_MODE_RUN = 0,
    OSARA_MODE_CHECK, /* load only; connect nothing */
    OSARA_MODE_TEST,  /* busted inside the host */
} osara_mode_t;

typedef struct {
    const char *script;      /* path as given by the user */
    const char *data_dir;    /* NULL: "<script dir>/.osara-data" */
    osara_mode_t mode;
    int watch;               /* reload when the script or its modules change */
    double grace;            /* seconds in-flight work may take at stop/reload */
    double load_timeout;     /* seconds a script's main chunk may run */
    unsigned loop_stall_ms;  /* watchdog threshold (run mode); 0: off */
    const char **test_paths; /* osara test */
    int ntest_paths;
    const char *test_output; /* busted output handler name */
} osara_worker_opts_t;

/* A C resource that survives reloads (a broker client, a store
 * environment, an HTTP listener), keyed by what identifies it (kind +
 * configuration). Every VM that got it holds one reference, released after
 * that VM's lua_close (its __gc's may still use the resource); the resource
 * closes when the last VM holding it has closed. So a reload that stops
 * naming a client leaves it open while the retiring VM's handlers and
 * receipts run, and closes it once they are done. */
typedef struct osara_shared_s {
    char *key;
    void *ptr;
    void (*close)(void *ptr);
    int refs; /* VMs holding it */
    struct osara_worker_s *w;
    struct osara_shared_s *next;
} osara_shared_t;

typedef struct osara_worker_s {
    int id;
    uv_loop_t loop;
    osara_inbox_t inbox;
    osara_worker_opts_t opts;
    char *script_path;  /* as given */
    char *script_dir;   /* folder of the script, for require and data */
    char *data_dir;
    struct osara_vm_s *vm;       /* serving */
    struct osara_vm_s *retiring; /* old VMs finishing their work */
    struct osara_vm_s *loading;  /* VM whose main chunk runs, else NULL */
    unsigned gen;                /* generation of the newest load */
    osara_shared_t *shared;
    int stopping;
    int stop_hooks_run;          /* osara.on_stop hooks started */
    int exit_code;
    uv_async_t stop_signal; /* woken by the first SIGINT/SIGTERM (signals.h) */
    uv_signal_t sighup;
    uv_timer_t stop_timer;
    osara_watchdog_t watchdog;
    uv_timer_t watch_timer;
    uv_fs_event_t *watchers;
    uv_fs_event_t *old_watchers; /* closing; freed on the next reload */
    int nwatchers;
    double reload_started;       /* the last file event, for the report */
    unsigned long long failed_sig; /* files' contents a reload failed on */
    uv_timer_t report_timer;     /* a failed reload's line, held a moment */
    char *pending_failure;       /* that line: a save in steps replaces it */
    unsigned long long reloads, reload_failures;
    osara_vm_host_t vm_host; /* what its VMs see of it */
} osara_worker_t;

/* Prepares the worker: loop, inbox, signals. 0 or negative (err set). */
int osara_worker_init(osara_worker_t *w, const osara_worker_opts_t *opts);

/* Loads the script (or the test runner), serves until stopped and returns
 * the process exit code (see README: 0 ok, 1 script error, ...). */
int osara_worker_run(osara_worker_t *w);

/* Releases what init allocated; after run returned. */
void osara_worker_free(osara_worker_t *w);

/* Begins the graceful stop: registrations stop, in-flight work finishes
 * within opts.grace, shared resources close, the loop ends. */
void osara_worker_stop(osara_worker_t *w, int exit_code);

/* Loads the script into a new VM and swaps on success; on failure logs the
 * error and keeps serving the old VM. Returns 0 or OSARA_ESCRIPT. */
int osara_worker_reload(osara_worker_t *w, const char *why);

/* Shared resources, for the VM whose Lua code calls (the running
 * coroutine's, or the one loading its script): get returns the resource
 * under key and makes that VM hold it; NULL if there is none. */
void *osara_worker_shared_get(osara_worker_t *w, const char *key);
/* Adds a resource (after get returned NULL), held by the calling VM. close
 * runs on the loop thread once no VM holds it any longer. */
void osara_worker_shared_put(osara_worker_t *w, const char *key, void *ptr,
                             void (*close)(void *ptr));

/* What a VM of w gets from it (filled from w's current fields; C tests
 * build a worker by hand and call this too). */
const osara_vm_host_t *osara_worker_vm_host(osara_worker_t *w);

/* The worker a Lua state belongs to. */
osara_worker_t *osara_worker_from_L(lua_State *L);

/* Seconds since an arbitrary point (monotonic). */
double osara_monotonic(void);
/* Wall clock in seconds since the epoch, sub-millisecond. */
double osara_now(void);

#endif
