/* loop.h - the one way into a worker's loop from another thread.
 *
 * osara_inbox_t is a mutexed MPSC queue of {fn, arg} events plus one
 * uv_async_t. Any thread posts; the loop thread drains everything queued
 * in one batch per wake-up (buffers are swapped under the lock, so the
 * events run without it). librdkafka and nats.c callbacks, the file
 * watcher and deferred coroutine resumes all come through here. */
#ifndef OSARA_LOOP_H
#define OSARA_LOOP_H

#include <stddef.h>
#include <uv.h>

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
} osara_inbox_t;

/* Initialises the inbox on `loop`. The async handle keeps the loop alive
 * until osara_inbox_close. Returns 0 or a negative uv error. */
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

/* Runs whatever is queued now and what that posts, until the inbox is
 * empty, on the loop thread (shutdown and tests; the loop itself runs one
 * batch per wake-up). */
void osara_inbox_drain(osara_inbox_t *inbox);

/* Stops accepting events and closes the async handle (loop thread only).
 * Pending events are run first. */
void osara_inbox_close(osara_inbox_t *inbox);

#endif
