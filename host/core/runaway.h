/* runaway.h - the guard against Lua that never yields.
 *
 * A handler in an endless loop holds the loop thread: no timer, socket or
 * other handler runs again. The guard is a thread per worker that watches
 * the run the scheduler publishes (osara_runaway_enter/leave around every
 * lua_resume that is not nested). A run longer than its timeout (the VM's
 * osara.runaway_timeout; the time the loop thread waited for a CPU on a
 * loaded machine does not count, as for the stall watchdog) gets a signal
 * on the loop thread, whose handler
 * calls the interrupt function the worker gave: it sets a debug hook
 * (lua_sethook, which LuaJIT allows from a signal handler), and the hook
 * raises a "runaway" error in the running coroutine at its next
 * interpreted instruction.
 *
 * What a hook cannot reach: LuaJIT runs hot loops as compiled traces, and
 * a trace checks no hook. A loop compiled into a trace that never leaves
 * it (`while true do end`, a counter, a loop of calls to stitched C
 * functions) is not interrupted; a loop whose trace exits now and then (a
 * side exit on a branch it has not compiled, a table that grows, a GC
 * cycle reaching its atomic phase, a call the JIT cannot compile) is
 * interrupted at that exit, and so is interpreted code (jit.off()). When
 * the interrupt does not land within another timeout, the guard logs an
 * ERROR naming the run: the host is stuck, and a second SIGTERM or SIGINT
 * exits at once (signals.h). */
#ifndef OSARA_RUNAWAY_H
#define OSARA_RUNAWAY_H

#include <stdint.h>

/* The default of osara.runaway_timeout, in seconds (0 turns it off). */
#define OSARA_RUNAWAY_DEFAULT_S 5.0
/* The default of osara.slow_handler_warning (an entry in flight that long
 * is named in a warning; sched_limits.c). */
#define OSARA_SLOW_HANDLER_DEFAULT_S 60.0

typedef struct osara_runaway_s osara_runaway_t;

/* Interrupts the Lua running on the loop thread now; returns a label of
 * what runs (copied for the log), or NULL. Called from a signal handler on
 * the loop thread: async-signal-safe code only. */
typedef const char *(*osara_runaway_interrupt_fn)(void);

/* Starts guarding the calling (loop) thread. Returns NULL with the error
 * set when the thread cannot start. */
osara_runaway_t *osara_runaway_start(osara_runaway_interrupt_fn interrupt);

/* Stops the guard thread and frees it. Loop thread. */
void osara_runaway_stop(osara_runaway_t *g);

/* A run begins that may take `timeout_ns` (0: unlimited) / ends. No-ops on
 * a thread without a guard. Loop thread; cheap (a few atomic stores). */
void osara_runaway_enter(uint64_t now_ns, uint64_t timeout_ns);
void osara_runaway_leave(void);

/* The hook raised the interrupt (the loop thread was not stuck in a
 * compiled trace). */
void osara_runaway_delivered(void);

#endif
