/* watchdog.h - the loop-stall watchdog.
 *
 * Everything a worker does runs on its loop thread: one callback that runs
 * long delays every message, timer and request behind it. The watchdog
 * measures each loop turn (from one prepare phase to the next, minus the
 * time libuv spent waiting in poll, as uv_metrics_idle_time reports it,
 * and minus the time the thread waited for a CPU, from Linux's
 * /proc/thread-self/schedstat: a machine with more runnable threads than
 * cores delays every turn, which is not a stall of the loop) and
 * logs one WARN line for a turn longer than the threshold, naming the
 * coroutine that ran longest in it:
 *
 *   loop stall: 312 ms in timer at app.lua:3
 *
 * and counts it in osara_loop_stalls_total. A turn that loaded or closed a
 * VM (a reload, measured in its own "reloaded ... in N ms" line) or that
 * runs while the worker stops is not counted. */
#ifndef OSARA_WATCHDOG_H
#define OSARA_WATCHDOG_H

#include <stdint.h>
#include <uv.h>

/* On by default: 100 ms, 1000 ms in a sanitizer build (which runs C code
 * several times slower). Many short Lua runs cannot add up to a stall: a
 * turn stops starting Lua once it spent its budget (loop.h). */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define OSARA_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define OSARA_SANITIZED 1
#endif
#endif
#ifdef OSARA_SANITIZED
#define OSARA_LOOP_STALL_DEFAULT_MS 1000
#else
#define OSARA_LOOP_STALL_DEFAULT_MS 100
#endif

typedef struct {
    uv_prepare_t prepare;
    uint64_t threshold_ns; /* 0: off */
    uint64_t turn_start;   /* uv_hrtime at this turn's start, 0 before the first */
    uint64_t idle_start;   /* uv_metrics_idle_time then */
    int skip;              /* this turn is not counted */
    int started;
    int schedstat_fd;      /* the loop thread's /proc schedstat, or -1 */
    uint64_t rq_sample;    /* its run-queue wait at rq_sampled (ns) */
    uint64_t rq_sampled;   /* uv_hrtime of that sample, at a turn's start */
} osara_watchdog_t;

/* The calling thread's /proc/thread-self/schedstat, opened (an fd any
 * thread may read), or -1. */
int osara_schedstat_open(void);
/* The time (ns) that thread has spent runnable but waiting for a CPU, the
 * second field of its schedstat; 0 when unknown (fd < 0). */
uint64_t osara_schedstat_runqueue_wait(int fd);

/* Enables libuv's idle-time metric on loop; call before the loop first
 * runs. Returns 0 or a negative uv error. */
int osara_watchdog_init(osara_watchdog_t *wd, uv_loop_t *loop,
                        unsigned threshold_ms);

/* Starts watching (the prepare handle does not keep the loop alive). Call
 * on the loop thread (it opens that thread's schedstat). */
void osara_watchdog_start(osara_watchdog_t *wd);

/* The current turn is expected to be long (a reload): do not count it. */
void osara_watchdog_skip_turn(osara_watchdog_t *wd);

/* Stops and closes the handle (loop thread). */
void osara_watchdog_close(osara_watchdog_t *wd);

#endif
