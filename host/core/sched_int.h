/* sched_int.h - the scheduler's internals shared by sched.c and
 * sched_limits.c (not an interface: include sched.h). */
#ifndef OSARA_SCHED_INT_H
#define OSARA_SCHED_INT_H

#include <signal.h>
#include <stdint.h>
#include <uv.h>

#include "core/sched.h"

enum { OSARA__INTERRUPT_RUNAWAY = 1, OSARA__INTERRUPT_TIMEOUT = 2 };

struct osara_co_s {
    lua_State *thread;
    int ref;                 /* keeps the thread alive in vm->L's registry */
    osara_vm_t *vm;
    osara_co_done_fn done;
    void *done_ud;
    char what[128];
    uint32_t what_hash;      /* of what, for the watchdog's per-label sums */
    osara_wait_cleanup_fn cleanup;
    void *wait_data;
    int anchor_ref;          /* the object waited on, kept alive (registry) */
    uv_timer_t *timer;       /* the wait's deadline; allocated on first use */
    osara_push_fn on_timeout;
    unsigned seq;
    int waiting;
    int pending_nret;        /* for resume_later */
    int load_task;           /* spawned while the script loaded */
    int failed;              /* its entry failed though it returned (fail()) */
    int ctx_ref;             /* the entry's log context table (registry) */
    void *user;              /* the entry's owner data (e.g. a Kafka input) */
    /* limits (sched_limits.c) */
    uint64_t started_ns;     /* when the entry started; 0 in the pool */
    uint64_t deadline_ns;    /* handler_timeout's next expiry; 0: none */
    int task;                /* osara.spawn and the test runner: no limits */
    int warned;              /* logged as slow once */
    int ran;                 /* resumed at least once (a deferred start not) */
    volatile sig_atomic_t interrupt; /* OSARA__INTERRUPT_* to raise (set by a
                                      * signal handler for a runaway) */
    int interrupted;         /* raised: what dispatch reports it as */
    struct osara_co_s *next_idle;
    struct osara_co_s *next_all;
};

/* The pooled coroutine resumed on this thread (sched.c). */
extern _Thread_local osara_co_t *osara__running;

/* Resumes co now (sched.c's one lua_resume). */
int osara__sched_resume_now(osara_co_t *co, int nargs);
/* Cancels co's wait: runs its cleanup, ends the wait (sched.c). */
void osara__sched_cancel_wait(osara_co_t *co);

/* sched_limits.c: called by sched.c around an entry and a resume. */
void osara__limits_entry_started(osara_co_t *co);
void osara__limits_reset(osara_co_t *co); /* back in the pool */
void osara__limits_before_resume(osara_co_t *co);
/* A run that is not nested begins at t0 (the runaway guard's start). */
void osara__limits_run_begin(osara_co_t *co, uint64_t t0);
void osara__limits_after_resume(osara_co_t *co);
/* osara.sched_c.limit and .interrupted (sched_limits.c). */
int osara__limits_l_limit(lua_State *L);
int osara__limits_l_interrupted(lua_State *L);
/* Frees the VM's limits timer (osara_sched_free). */
void osara__limits_free(struct osara_vm_s *vm);

#endif
