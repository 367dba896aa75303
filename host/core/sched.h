/* sched.h - the coroutine pool and the one yield/resume path.
 *
 * Every entry into user Lua (timer tick, message, request) runs in a
 * coroutine taken from its VM's pool. A host call that must wait records a
 * cleanup on the running coroutine with osara_sched_wait() and yields; the
 * completion (on the loop thread) pushes its results onto the coroutine's
 * thread and calls osara_sched_resume(), the only place lua_resume is
 * called. Errors in user code are caught here: logged once with file:line
 * (traceback at debug level), counted, and reported to the entry's done
 * callback; they never stop the host. (OpenResty's run_thread pattern.) */
#ifndef OSARA_SCHED_H
#define OSARA_SCHED_H

#include <lua.h>
#include <stdint.h>

struct osara_vm_s;
typedef struct osara_co_s osara_co_t;

/* Called once when the coroutine's function returns (ok=1, its results are
 * on the coroutine thread's stack: indices 1..lua_gettop) or raises (ok=0,
 * the message is on top). The callback must not keep the thread. */
typedef void (*osara_co_done_fn)(osara_co_t *co, int ok, void *ud);

/* Cancels a pending wait: stop timers, detach callbacks. The coroutine is
 * never resumed afterwards. */
typedef void (*osara_wait_cleanup_fn)(void *data);

/* Takes a pooled coroutine of `vm` for a new entry; the caller pushes the
 * function and its arguments onto the returned thread and then calls
 * osara_sched_run. Returns NULL when the VM no longer accepts new entries
 * (retiring after a reload, or shutting down) unless `force` is set (used
 * for work spawned by code that is already running). */
lua_State *osara_sched_acquire(struct osara_vm_s *vm, int force,
                               osara_co_t **co);

/* Runs the function pushed on the coroutine with `nargs` arguments until it
 * finishes or waits. `what` names the entry in error logs ("timer at
 * app.lua:3") and is copied. done may be NULL. Returns 0 if the coroutine
 * finished or is waiting, -1 if it failed (already logged and reported). */
int osara_sched_run(osara_co_t *co, int nargs, osara_co_done_fn done,
                    void *ud, const char *what);

/* Convenience: the function and nargs arguments are on top of vm->L. Pops
 * them. Returns -2 (and pops) if the VM does not accept new entries. */
int osara_sched_spawn(struct osara_vm_s *vm, int nargs, int force,
                      osara_co_done_fn done, void *ud, const char *what);

/* The pooled coroutine currently running on L, or NULL when L is not one
 * (the main thread, or a coroutine the user created). */
osara_co_t *osara_sched_current(lua_State *L);

/* 1 when the entry's Lua code marked it failed (sched_c.fail(): the
 * failure policy took an error) although its function returned. */
int osara_co_failed(osara_co_t *co);

/* The pooled coroutine resumed on this thread now, whatever its state; NULL
 * when no Lua code runs from the scheduler. */
osara_co_t *osara_sched_running(void);

/* For the loop-stall watchdog: the entry label (a handler, a timer) whose
 * coroutines ran longest in total on this thread since the last reset
 * (NULL if no Lua ran), with that total in *ns and how many resumes it took
 * in *runs. */
const char *osara_sched_turn_top(uint64_t *ns, unsigned *runs);
void osara_sched_turn_reset(void);

/* Pushes the results of a wait onto L; returns how many it pushed. */
typedef int (*osara_push_fn)(lua_State *L, void *ud);

/* Parks the running coroutine: records cleanup/data and yields. Use as
 * `return osara_sched_wait(L, anchor, cleanup, data);` from a lua_CFunction
 * after starting the asynchronous work. Raises a Lua error if L cannot
 * yield (cleanup has run then).
 *
 * anchor is the stack index of the object waited on (the receipt, the
 * process handle), or 0. lua_yield drops the C function's stack, so an
 * object reachable only from there (`topic:send(v):wait()`) could be
 * collected mid-wait and its __gc would detach the waiter: the coroutine
 * holds a registry reference to the anchor until it resumes or is
 * cancelled. */
int osara_sched_wait(lua_State *L, int anchor, osara_wait_cleanup_fn cleanup,
                     void *data);

/* osara_sched_wait with a deadline: after `timeout` seconds (< 0: none) the
 * cleanup runs and the coroutine resumes with what on_timeout(T, data)
 * pushes, or with nil, "timeout" when on_timeout is NULL. The timer is the
 * coroutine's own (one per pooled coroutine, reused). */
int osara_sched_wait_for(lua_State *L, int anchor, double timeout,
                         osara_wait_cleanup_fn cleanup, void *data,
                         osara_push_fn on_timeout);

/* ---- futures: one-shot completions a coroutine can wait on ---------------
 *
 * The completion primitive of Kafka receipts, JetStream publish acks, NATS
 * requests and process exits: the owner embeds an osara_sched_future_t in its own struct,
 * inits it with refs = 1 and a free function, takes a reference per holder
 * (the Lua handle, the in-flight operation), and calls complete once from
 * the loop thread. Waiting holds a reference of its own, so the struct
 * lives while a coroutine waits on it. complete resumes the waiter only if
 * it still waits for this future (same sequence number); a waiter that
 * timed out or was cancelled is left alone.
 *
 * The waiter on its own (osara_sched_waiter_t) serves waits that are not
 * one-shot, like a process's next output line: it records the running
 * coroutine and later yields it only if it still waits with that sequence
 * number. */
typedef struct {
    osara_co_t *co; /* NULL if none */
    unsigned seq;   /* co's sequence number while it waits here */
} osara_sched_waiter_t;

/* Records the coroutine running on L as about to wait (call right before
 * osara_sched_wait). Returns -1 if L is not a pooled coroutine. */
int osara_sched_waiter_set(osara_sched_waiter_t *wt, lua_State *L);
/* The recorded coroutine if it still waits as recorded, else NULL. */
osara_co_t *osara_sched_waiter_current(const osara_sched_waiter_t *wt);

typedef struct osara_sched_future_s {
    osara_sched_waiter_t waiter;
    int refs;
    int done;
    osara_push_fn push;  /* set by complete: pushes the results */
    void *push_ud;       /* must live as long as the future */
    void (*free)(struct osara_sched_future_s *f); /* at refs == 0 */
} osara_sched_future_t;

void osara_sched_future_init(osara_sched_future_t *f,
                             void (*free_fn)(osara_sched_future_t *f));
void osara_sched_future_ref(osara_sched_future_t *f);
/* Drops a reference; the last one calls f->free (which frees the owner). */
void osara_sched_future_unref(osara_sched_future_t *f);

/* Returns the results at once when f is done; otherwise waits (as
 * osara_sched_wait_for, anchoring the object at `anchor`) until complete or
 * timeout (< 0: none; then nil, "timeout"). Raises when another coroutine
 * already waits on f. Use as `return osara_sched_future_wait(...)`. */
int osara_sched_future_wait(lua_State *L, osara_sched_future_t *f, int anchor,
                            double timeout);

/* Marks f done with results push(L, ud) and resumes its waiter if any (now
 * when no Lua code runs, else from the next inbox drain). Loop thread only;
 * the caller holds a reference across the call. A second call is ignored. */
void osara_sched_future_complete(osara_sched_future_t *f, osara_push_fn push,
                                 void *ud);

/* Resumes a waiting coroutine with `nret` values already pushed onto its
 * thread (osara_co_thread). Loop thread only, and not from inside running
 * Lua code (use resume_later there). The wait's cleanup does not run: the
 * completion detaches itself. When this loop turn has spent its Lua budget
 * (loop.h) the coroutine resumes from the inbox instead, on a later turn;
 * new entries (osara_sched_run) and deadlines wait the same way. */
int osara_sched_resume(osara_co_t *co, int nret);

/* Like osara_sched_resume but from the next drain of the worker's inbox;
 * for wake-ups issued while other Lua code is running. Returns 0, or -1
 * when the inbox is closed (nothing queued; the values stay pushed). */
int osara_sched_resume_later(osara_co_t *co, int nret);

lua_State *osara_co_thread(osara_co_t *co);
/* Data the entry's owner attaches to the coroutine for its lifetime (a
 * Kafka input, so outputs sent from the handler are counted against it).
 * Cleared when the coroutine returns to the pool. */
void osara_co_set_user(osara_co_t *co, void *user);
/* Marks the entry a service (a task, the test runner) rather than a
 * handler: osara.handler_timeout and the slow-handler warning skip it.
 * Call before osara_sched_run. */
void osara_co_set_task(osara_co_t *co);
void *osara_co_user(osara_co_t *co);
struct osara_vm_s *osara_co_vm(osara_co_t *co);
/* Increments on every wait; a completion compares it to detect staleness. */
unsigned osara_co_seq(osara_co_t *co);
int osara_co_waiting(osara_co_t *co);

/* Cancels every waiting coroutine of vm (cleanups run) before lua_close. */
void osara_sched_cancel_all(struct osara_vm_s *vm);

/* Cancels the waiting tasks that were spawned while vm's script loaded:
 * they belong to that version of the script (called when it retires).
 * Does not close the VM; the caller checks vm->inflight. */
void osara_sched_cancel_load_tasks(struct osara_vm_s *vm);

/* Frees the pool's bookkeeping of vm (lua_close frees the threads). */
void osara_sched_free(struct osara_vm_s *vm);

/* The runaway guard's interrupt (runaway.h): makes the Lua running on this
 * thread raise a "runaway" error at its next interpreted instruction.
 * Async-signal-safe; returns the entry's label or NULL. */
const char *osara_sched_interrupt_running(void);

/* Lua binding `osara.sched_c`: spawn, yield, current, park, wake. */
int osara_sched_open(lua_State *L);

#endif
