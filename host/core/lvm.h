/* lvm.h - Lua states: creation, embedded modules, script loading, retiring.
 *
 * A VM is one lua_State with its coroutine pool, what its script registered
 * and the C resources it owns. A worker serves from one VM at a time; a
 * reload builds a new VM beside the old one, swaps on success, and retires
 * the old one: it accepts no new entries, its in-flight coroutines finish
 * (bounded by the grace period), then it is closed. */
#ifndef OSARA_LVM_H
#define OSARA_LVM_H

#include <lauxlib.h>
#include <lua.h>
#include <stddef.h>
#include <uv.h>

#include "core/registry.h"

struct osara_worker_s;
struct osara_co_s;

/* What a VM gets from the worker that owns it. The VM never includes
 * worker.h (calls in core go down: worker -> lvm -> sched -> loop); it
 * reads these fields and reports back through the callbacks. */
typedef struct osara_vm_host_s {
    struct osara_worker_s *w;    /* opaque here; areas reach it by vm->w */
    uv_loop_t *loop;
    struct osara_inbox_s *inbox;
    const char *mode;            /* "run", "check" or "test" */
    const char *script_path;     /* "" in test mode */
    const char *script_dir, *data_dir;
    /* osara.vm_c.stop(code): begins the worker's graceful stop. */
    void (*stop)(struct osara_worker_s *w, int exit_code);
    /* osara.vm_c.stats(): the worker's reload counters, and whether it
     * stops. */
    void (*stats)(struct osara_worker_s *w, double *reloads, double *failures,
                  int *stopping);
} osara_vm_host_t;

/* A C resource owned by a VM: closed (close(ptr)) when the VM closes unless
 * disowned first. */
typedef struct osara_own_s {
    void (*close)(void *ptr);
    void *ptr;
    struct osara_own_s *prev, *next;
} osara_own_t;

typedef struct osara_vm_s {
    lua_State *L;
    struct osara_worker_s *w;     /* host->w */
    const osara_vm_host_t *host;  /* the worker's; outlives the VM */
    uv_loop_t *loop;              /* the worker's, for the VM's handles */
    struct osara_inbox_s *inbox;  /* the worker's, for deferred resumes */
    /* Set by the worker: called when inflight drops to zero, and when the
     * VM closes (before it is freed). The VM never calls the worker. */
    void (*on_idle)(struct osara_vm_s *vm);
    void (*on_close)(struct osara_vm_s *vm);
    unsigned gen;          /* worker generation this VM was loaded as */
    int accepting;         /* new entries may start */
    int loading;           /* the main chunk is running */
    double load_deadline, load_timeout; /* its time limit (monotonic s) */
    int inflight;          /* coroutines started and not finished */
    int closing;
    osara_registry_t reg;  /* what the script registered */
    struct osara_co_s *idle;  /* coroutine pool */
    struct osara_co_s *all;
    int nidle;
    osara_own_t *owned;
    osara_own_t *owned_late; /* released after lua_close */
    char **files;          /* script and user modules it loaded */
    unsigned long long *file_hashes;
    int nfiles;
    uv_timer_t *grace_timer;
    /* Limits of its handlers (osara.runaway_timeout, osara.handler_timeout,
     * osara.slow_handler_warning; seconds, 0: off) and the timer that
     * checks the last two (sched_limits.c). */
    double runaway_timeout, handler_timeout, slow_warning;
    uv_timer_t *limits_timer;
    struct osara_vm_s *next_retiring;
} osara_vm_t;

/* Creates a VM for the worker described by host (which must outlive the
 * VM): standard libraries, cjson, the embedded osara modules in
 * package.preload, package.path rooted at the script folder. Returns NULL
 * with osara_err_msg() set. */
osara_vm_t *osara_vm_new(const osara_vm_host_t *host, unsigned gen);

/* Loads and runs the script's main chunk under a time limit. On failure
 * returns OSARA_ESCRIPT with the one-line message (file:line) in
 * osara_err_msg(). Registrations land in vm->reg. */
int osara_vm_load_script(osara_vm_t *vm, const char *path, double timeout);

/* Runs `fn` (a Lua function on top of vm->L) in a coroutine; for `osara
 * test`, which runs busted as the VM's task. */

/* Records a resource closed with the VM. */
osara_own_t *osara_vm_own(osara_vm_t *vm, void (*close)(void *), void *ptr);
/* Forgets a resource (the caller closed it). */
void osara_vm_disown(osara_vm_t *vm, osara_own_t *own);
/* Records a resource released after the VM's lua_close, once its __gc's
 * ran (a reference to a shared client those __gc's may still use). */
void osara_vm_own_late(osara_vm_t *vm, void (*close)(void *), void *ptr);
/* 1 if vm already holds (close, ptr) that way. */
int osara_vm_owns_late(osara_vm_t *vm, void (*close)(void *), void *ptr);

/* Stops new entries and cancels the tasks its script started at load;
 * closes the VM now if nothing is in flight, else after `grace` seconds
 * unless the worker's on_idle closes it first. Returns 1 if it closed. */
int osara_vm_retire(osara_vm_t *vm, double grace);

/* Closes now: cancels waits, closes owned resources, lua_close. */
void osara_vm_close(osara_vm_t *vm);

/* The VM a lua_State (or any of its threads) belongs to. */
osara_vm_t *osara_vm_from_L(lua_State *L);

/* Formats "file:line" of the Lua function at stack level `level` of L
 * (1 = the caller of the C function) into buf. */
const char *osara_vm_where(lua_State *L, int level, char *buf, size_t cap);

/* Re-hashes the VM's files; returns 1 if any changed since load. */
int osara_vm_files_changed(osara_vm_t *vm);

/* A hash of the current contents of every file the VM loaded. */
unsigned long long osara_vm_files_signature(osara_vm_t *vm);

/* Registers metatable `name` for a C type's userdata: __gc = gc, and the
 * methods table (empty when methods is NULL) in its "methods" field, which
 * is also its __index unless `index` is given (a function that answers
 * fields and falls back to "methods"). Leaves the stack as it was. */
void osara_lua_newclass(lua_State *L, const char *name, const luaL_Reg *methods,
                        lua_CFunction gc, lua_CFunction index);

/* Pushes a new userdata of `size` bytes with metatable `mt` (registered by
 * osara_lua_newclass) and returns it; the caller fills it. */
void *osara_lua_newobject(lua_State *L, size_t size, const char *mt);

/* A named number of a stats() table. */
typedef struct {
    const char *name;
    double value;
} osara_lua_stat_t;

/* Pushes {name = value, ...} for the n stats: what every stats() binding
 * returns. Fields the caller adds afterwards go on the table on top. */
void osara_lua_push_stats(lua_State *L, const osara_lua_stat_t *stats, int n);

/* Lua binding `osara.vm_c`: mode, script, paths, register, exepath. */
int osara_vm_open(lua_State *L);

#endif
