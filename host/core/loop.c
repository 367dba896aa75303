#include "core/loop.h"

#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/mem.h"

static int drain_batch(osara_inbox_t *inbox, int budgeted);

/* One batch per wake-up: what was queued when the loop woke runs now; what
 * those events post (a task that yields re-posts itself) waits for the next
 * turn, after timers and I/O. Draining until empty let one yielding task
 * starve every timer and socket of the worker. A batch that outlasts the
 * turn's budget leaves its rest to the next turns. */
static void on_async(uv_async_t *async)
{
    osara_inbox_t *inbox = async->data;
    if (drain_batch(inbox, 1) && !inbox->closed) {
        uv_async_send(&inbox->async);
    }
}

/* Right before libuv polls: the turn that ends here spent its budget. */
static void on_turn_end(uv_prepare_t *h)
{
    osara_inbox_t *inbox = h->data;
    inbox->turn_lua_ns = 0;
}

void osara_inbox_turn_charge(osara_inbox_t *inbox, uint64_t ns)
{
    inbox->turn_lua_ns += ns;
}

int osara_inbox_turn_spent(const osara_inbox_t *inbox)
{
    return inbox->turn_lua_ns >= inbox->budget_ns;
}

int osara_inbox_init(osara_inbox_t *inbox, uv_loop_t *loop)
{
    *inbox = (osara_inbox_t){0};
    int rc = uv_mutex_init(&inbox->mu);
    if (rc != 0) {
        return rc;
    }
    rc = uv_async_init(loop, &inbox->async, on_async);
    if (rc != 0) {
        uv_mutex_destroy(&inbox->mu);
        return rc;
    }
    inbox->async.data = inbox;
    inbox->budget_ns = (uint64_t)OSARA_TURN_BUDGET_MS * 1000000;
    OSARA_UV_MUST(uv_prepare_init(loop, &inbox->turn_end));
    inbox->turn_end.data = inbox;
    uv_prepare_start(&inbox->turn_end, on_turn_end);
    uv_unref((uv_handle_t *)&inbox->turn_end);
    return 0;
}

static void grow(osara_inbox_t *inbox)
{
    size_t cap = inbox->cap ? inbox->cap * 2 : 256;
    inbox->queue = osara_xrealloc(inbox->queue, cap * sizeof(*inbox->queue));
    inbox->cap = cap;
}

int osara_inbox_post(osara_inbox_t *inbox, osara_inbox_fn fn, void *arg, void *arg2)
{
    uv_mutex_lock(&inbox->mu);
    if (inbox->closed) {
        uv_mutex_unlock(&inbox->mu);
        return OSARA_ECLOSED;
    }
    if (inbox->len == inbox->cap) {
        grow(inbox);
    }
    inbox->queue[inbox->len++] = (osara_event_t){fn, arg, arg2};
    int first = inbox->len == 1;
    uv_mutex_unlock(&inbox->mu);
    /* uv_async_send coalesces; only the first event of a batch needs it. */
    if (first) {
        uv_async_send(&inbox->async);
    }
    return 0;
}

/* Puts the events a budgeted drain did not run back at the head of the
 * queue, before those posted meanwhile: the order of events is kept. */
static void requeue_rest(osara_inbox_t *inbox, const osara_event_t *rest,
                         size_t n)
{
    uv_mutex_lock(&inbox->mu);
    while (inbox->cap < inbox->len + n) {
        grow(inbox);
    }
    memmove(inbox->queue + n, inbox->queue, inbox->len * sizeof(*rest));
    memcpy(inbox->queue, rest, n * sizeof(*rest));
    inbox->len += n;
    uv_mutex_unlock(&inbox->mu);
}

/* A budgeted drain stops, after one event at least, once the turn's Lua
 * or the drain itself took the budget. */
static int drain_spent(const osara_inbox_t *inbox, uint64_t t0)
{
    return osara_inbox_turn_spent(inbox) ||
           uv_hrtime() - t0 >= inbox->budget_ns;
}

/* Runs the events queued now (or, budgeted, as many as the turn's budget
 * allows); returns 1 if events are left or were posted meanwhile. */
static int drain_batch(osara_inbox_t *inbox, int budgeted)
{
    uv_mutex_lock(&inbox->mu);
    size_t n = inbox->len;
    if (n == 0) {
        uv_mutex_unlock(&inbox->mu);
        return 0;
    }
    /* Swap: the posters get the old batch array as their new queue.
     * A nested drain (an event that drains) must not hand out the
     * array the outer drain still reads: it takes the queue alone. */
    int nested = inbox->draining != NULL;
    osara_event_t *batch = inbox->queue;
    size_t cap = inbox->cap;
    inbox->queue = nested ? NULL : inbox->batch;
    inbox->cap = nested ? 0 : inbox->batch_cap;
    inbox->len = 0;
    if (!nested) {
        inbox->batch = batch;
        inbox->batch_cap = cap;
    }
    uv_mutex_unlock(&inbox->mu);
    inbox->drained_batches++;
    osara_drain_t d = {batch, 0, n, inbox->draining};
    inbox->draining = &d;
    uint64_t t0 = budgeted ? uv_hrtime() : 0;
    while (d.next < d.len) {
        osara_event_t *ev = &batch[d.next++];
        ev->fn(ev->arg, ev->arg2);
        if (budgeted && d.next < d.len && drain_spent(inbox, t0)) {
            break;
        }
    }
    inbox->draining = d.outer;
    inbox->drained_events += d.next;
    if (d.next < d.len) {
        inbox->deferred_drains++;
        requeue_rest(inbox, batch + d.next, d.len - d.next);
    }
    if (nested) {
        free(batch);
    }
    uv_mutex_lock(&inbox->mu);
    int more = inbox->len > 0;
    uv_mutex_unlock(&inbox->mu);
    return more;
}

void osara_inbox_drain(osara_inbox_t *inbox)
{
    while (drain_batch(inbox, 0)) {
    }
}

static void dropped(void *arg, void *arg2)
{
    (void)arg;
    (void)arg2;
}

static void drop_matching(osara_event_t *evs, size_t from, size_t to,
                          int (*match)(const osara_event_t *, void *), void *ud)
{
    for (size_t i = from; i < to; i++) {
        if (evs[i].fn != dropped && match(&evs[i], ud)) {
            evs[i].fn = dropped;
        }
    }
}

void osara_inbox_cancel(osara_inbox_t *inbox,
                        int (*match)(const osara_event_t *ev, void *ud),
                        void *ud)
{
    for (osara_drain_t *d = inbox->draining; d; d = d->outer) {
        drop_matching(d->batch, d->next, d->len, match, ud);
    }
    uv_mutex_lock(&inbox->mu);
    drop_matching(inbox->queue, 0, inbox->len, match, ud);
    uv_mutex_unlock(&inbox->mu);
}

static void on_closed(uv_handle_t *h)
{
    osara_inbox_t *inbox = h->data;
    free(inbox->queue);
    free(inbox->batch);
    inbox->queue = inbox->batch = NULL;
    uv_mutex_destroy(&inbox->mu);
}

void osara_inbox_close(osara_inbox_t *inbox)
{
    osara_inbox_drain(inbox);
    uv_mutex_lock(&inbox->mu);
    inbox->closed = 1;
    uv_mutex_unlock(&inbox->mu);
    uv_close((uv_handle_t *)&inbox->turn_end, NULL);
    uv_close((uv_handle_t *)&inbox->async, on_closed);
}
