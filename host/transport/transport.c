/* transport.c - lanes: queue, start, bound and settle deliveries (see
 * transport.h). Loop thread only. */
#include "transport/transport.h"

#include <lauxlib.h>
#include <stdio.h>

#include "core/lvm.h"
#include "core/registry.h"
#include "core/sched.h"
#include "core/worker.h"

void osara_lane_init(osara_lane_t *lane, const osara_transport_t *tp,
                     void *owner, const char *name, int ordered,
                     int max_running, int max_held)
{
    *lane = (osara_lane_t){
        .tp = tp,
        .owner = owner,
        .name = name,
        .ordered = ordered,
        .max_running = ordered || max_running < 1 ? 1 : max_running,
        .max_held = max_held < 1 ? 1 : max_held,
    };
}

static void enqueue_tail(osara_lane_t *lane, osara_delivery_t *d)
{
    d->next = NULL;
    if (lane->tail) {
        lane->tail->next = d;
    } else {
        lane->head = d;
    }
    lane->tail = d;
}

static osara_delivery_t *dequeue(osara_lane_t *lane)
{
    osara_delivery_t *d = lane->head;
    lane->head = d->next;
    if (lane->head == NULL) {
        lane->tail = NULL;
    }
    d->next = NULL;
    return d;
}

static void count_held(osara_lane_t *lane)
{
    lane->held++;
    if (!lane->paused && lane->held >= lane->max_held) {
        lane->paused = 1;
        if (lane->tp->pause) {
            lane->tp->pause(lane, 1);
        }
    }
}

static void reset_attempt(osara_delivery_t *d)
{
    d->failed = 0;
    d->taken = 0;
    d->cancelled = 0;
    d->in.handler_done = 0;
    d->in.outputs_pending = 0;
}

void osara_lane_push(osara_lane_t *lane, osara_delivery_t *d)
{
    d->lane = lane;
    d->attempt = 1;
    d->output_error = NULL;
    reset_attempt(d);
    enqueue_tail(lane, d);
    count_held(lane);
    osara_lane_pump(lane);
}

void osara_lane_requeue(osara_lane_t *lane, osara_delivery_t *d)
{
    d->lane = lane;
    d->attempt++;
    reset_attempt(d);
    d->next = lane->head;
    lane->head = d;
    if (lane->tail == NULL) {
        lane->tail = d;
    }
    count_held(lane);
}

/* Settles d once its handler finished and no output is pending. */
static void maybe_settle(osara_delivery_t *d)
{
    if (!d->in.handler_done || d->in.outputs_pending > 0) {
        return;
    }
    osara_lane_t *lane = d->lane;
    osara_settle_t how = d->cancelled ? OSARA_SETTLE_CANCELLED
                         : d->failed  ? OSARA_SETTLE_RETRY
                                      : OSARA_SETTLE_ACK;
    lane->held--;
    lane->tp->settle(d, how); /* d belongs to the broker from here on */
    if (lane->paused && lane->held <= lane->max_held / 2) {
        lane->paused = 0;
        if (lane->tp->pause) {
            lane->tp->pause(lane, 0);
        }
    }
}

static void on_handler_done(osara_co_t *co, int ok, void *ud)
{
    osara_delivery_t *d = ud;
    osara_lane_t *lane = d->lane;
    lane->running--;
    d->in.handler_done = 1;
    if (!ok) {
        d->failed = 1;
        /* Cancelled by the VM closing (reload grace, shutdown), not failed
         * by its own code: the broker consumes it again. */
        d->cancelled = osara_co_vm(co)->closing;
    }
    d->taken = ok && osara_co_failed(co);
    if (lane->tp->finished) {
        lane->tp->finished(d, ok);
    }
    maybe_settle(d);
    osara_lane_pump(lane);
}

/* "<transport> handler <name> (<where>)", formatted once per entry. */
static const char *lane_label(osara_lane_t *lane)
{
    if (lane->label_entry != lane->entry) {
        snprintf(lane->label, sizeof(lane->label), "%s handler %s (%s)",
                 lane->tp->name, lane->name ? lane->name : "?",
                 lane->entry->where ? lane->entry->where : "?");
        lane->label_entry = lane->entry;
    }
    return lane->label;
}

static int may_start(const osara_lane_t *lane)
{
    return lane->head && lane->entry && !lane->stopped && !lane->hold &&
           lane->running < lane->max_running;
}

/* Starts one delivery: 0, or -1 when the VM takes no new entries now
 * (retiring or stopping: the next set_entry pumps again). */
static int start_one(osara_lane_t *lane)
{
    osara_co_t *co;
    lua_State *T = osara_sched_acquire(lane->entry->vm, lane->force, &co);
    if (T == NULL) {
        return -1;
    }
    osara_delivery_t *d = dequeue(lane);
    lane->running++;
    lua_rawgeti(T, LUA_REGISTRYINDEX, lane->entry->fnref);
    lane->tp->push_message(T, d); /* T: [fn, msg] */
    osara_co_set_user(co, d);
    osara_sched_run(co, 1, on_handler_done, d, lane_label(lane));
    return 0;
}

/* A pump's share of a loop turn: OSARA_LANE_STARTS_PER_PUMP starts, or
 * OSARA_LANE_TURN_MS since the turn began (the loop's cached time is taken
 * at its start), whichever comes first; every pump starts one at least,
 * so every lane progresses. */
static int over_budget(uv_loop_t *loop, int started)
{
    if (started >= OSARA_LANE_STARTS_PER_PUMP) {
        return 1;
    }
    int64_t elapsed = (int64_t)(uv_hrtime() / 1000000) - (int64_t)uv_now(loop);
    return elapsed >= OSARA_LANE_TURN_MS;
}

void osara_lane_pump(osara_lane_t *lane)
{
    /* A handler that finishes without waiting pumps again from its done
     * callback; the outer loop continues instead of recursing once per
     * queued delivery. */
    if (lane->pumping) {
        return;
    }
    lane->pumping = 1;
    int started = 0, over = 0;
    /* Taken now: a handler that stops the host clears lane->entry while
     * this loop still runs. */
    uv_loop_t *loop = lane->entry ? &lane->entry->vm->w->loop : NULL;
    while (may_start(lane) && start_one(lane) == 0) {
        if (lane->tp->defer && over_budget(loop, ++started)) {
            over = 1;
            break;
        }
    }
    lane->pumping = 0;
    if (over && may_start(lane)) {
        lane->tp->defer(lane); /* the rest on a later turn */
    }
}

void osara_lane_set_entry(osara_lane_t *lane, struct osara_reg_entry_s *e)
{
    lane->entry = e;
    osara_lane_pump(lane);
}

osara_delivery_t *osara_delivery_of(struct osara_co_s *co)
{
    return co ? osara_co_user(co) : NULL;
}

void osara_delivery_output_begin(osara_delivery_t *d)
{
    d->in.outputs_pending++;
}

void osara_delivery_output_end(osara_delivery_t *d, int ok)
{
    d->in.outputs_pending--;
    if (!ok) {
        d->failed = 1;
    }
    maybe_settle(d);
}

void osara_lane_stop(osara_lane_t *lane)
{
    lane->stopped = 1;
    while (lane->head) {
        osara_delivery_t *d = dequeue(lane);
        lane->held--;
        d->cancelled = 1;
        lane->tp->settle(d, OSARA_SETTLE_CANCELLED);
    }
}
