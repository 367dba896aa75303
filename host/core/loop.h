/* loop.h - the one way into a worker's loop from another thread.
 *
 * osara_inbox_t is a mutexed MPSC queue of {fn, arg} events plus one
 * uv_async_t. Any thread posts; the loop thread drains everything queued
 * in one batch per wake-up (buffers are swapped under the lock, so the
 * events run without it). librdkafka and nats.c callbacks, the file
 * watcher and deferred coroutine resumes all come through here.
 *
 * The inbox also keeps the loop turn's budget: the scheduler charges the
 * time user Lua ran in this turn (osara_inbox_turn_charge); once a turn has
 * spent OSARA_TURN_BUDGET_MS, new Lua runs are deferred to the inbox and a
 * drain stops early, leaving the rest of its batch to the next turns, so
 * timers and sockets are served between them (the loop-stall watchdog's
 * 100 ms is then never reached by many short runs). */
#ifndef OSARA_LOOP_H
#define OSARA_LOOP_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

/* Lua time (or time draining the inbox) one loop turn may spend before
 * the rest waits for the next turn. */
#define OSARA_TURN_BUDGET_MS 20

/* Runs on the loop thread. Two arguments, so that a message and its
 * destination travel without a per-event allocation. */
typedef void (*osara_inbox_fn)(void *arg, void *arg2);

typedef struct {
    osara_inbox_fn fn;
    void *arg, *arg2;
} osara_event_t;

/* The batch a drain is running (drains may nest: an event may drain). */
typedef struct osara_drain_s {
    osara_event_t *batch;
    size_t next, len;
    struct osara_drain_s *outer;
} osara_drain_t;

typedef struct osara_inbox_s {
    uv_async_t async;
    uv_mutex_t mu;
    osara_event_t *queue; /* filled by posters */
    size_t len, cap;
    osara_event_t *batch; /* drained by the loop */
    size_t batch_cap;
    int closed;
    osara_drain_t *draining; /* innermost running drain, loop thread only */
    size_t drained_batches, drained_events; /* for tests and metrics */
    uv_prepare_t turn_end;   /* resets the budget before each poll */
    uint64_t turn_lua_ns;    /* Lua run time charged in this turn */
    uint64_t budget_ns;      /* OSARA_TURN_BUDGET_MS; tests may lower it */
    size_t deferred_drains;  /* drains stopped early by the budget */
} osara_inbox_t;

/* Initialises the inbox on `loop`. The async handle keeps the loop alive
 * until osara_inbox_close (the budget's prepare handle does not). Returns
 * 0 or a negative uv error. */
int osara_inbox_init(osara_inbox_t *inbox, uv_loop_t *loop);

/* Queues fn(arg, arg2) to run on the loop thread. Safe from any thread. Returns 0,
 * or OSARA_ECLOSED after close (the event is not queued; the caller keeps
 * ownership of arg). */
int osara_inbox_post(osara_inbox_t *inbox, osara_inbox_fn fn, void *arg, void *arg2);

/* Drops the events for which match(ev, ud) is true, queued or left in a
 * batch being drained: for a VM that closes while events that point into
 * it are pending. Loop thread only. */
void osara_inbox_cancel(osara_inbox_t *inbox,
                        int (*match)(const osara_event_t *ev, void *ud),
                        void *ud);

/* Adds `ns` of Lua run time to the current turn (the scheduler, for each
 * run that is not nested in another). Loop thread only. */
void osara_inbox_turn_charge(osara_inbox_t *inbox, uint64_t ns);

/* 1 once the current turn has run its budget of Lua: new runs wait for a
 * later turn. Loop thread only. */
int osara_inbox_turn_spent(const osara_inbox_t *inbox);

/* Runs whatever is queued now and what that posts, until the inbox is
 * empty, on the loop thread (shutdown and tests; the loop itself runs one
 * batch per wake-up). */
void osara_inbox_drain(osara_inbox_t *inbox);

/* Stops accepting events and closes the async handle (loop thread only).
 * Pending events are run first. */
void osara_inbox_close(osara_inbox_t *inbox);

#endif
