/* The C unit test runner: `osara_ctest NAME` runs one test (ctest runs each
 * in its own process with a timeout); `osara_ctest` alone runs them all. */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "core/err.h"
#include "core/loop.h"
#include "core/metrics.h"
#include "transport/offsets.h"
#include "core/lvm.h"
#include "core/registry.h"
#include "core/sched.h"
#include "core/worker.h"
#include "transport/transport.h"

#include "check.h"

int osara_test_failures;

/* ---- inbox ---------------------------------------------------------------- */

static int seen;
static void count_event(void *arg, void *unused)
{
    (void)unused;
    seen += (int)(intptr_t)arg;
}

void test_inbox_drains_in_batches(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    osara_inbox_t inbox;
    CHECK(osara_inbox_init(&inbox, &loop) == 0);
    seen = 0;
    for (int i = 0; i < 1000; i++) {
        CHECK(osara_inbox_post(&inbox, count_event, (void *)(intptr_t)1, NULL) == 0);
    }
    uv_run(&loop, UV_RUN_NOWAIT);
    CHECK(seen == 1000);
    CHECK(inbox.drained_batches == 1); /* one wake-up, one batch */
    osara_inbox_close(&inbox);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&loop) == 0);
}

typedef struct {
    osara_inbox_t *inbox;
    int n;
} poster_t;

static void poster_main(void *arg)
{
    poster_t *p = arg;
    for (int i = 0; i < p->n; i++) {
        osara_inbox_post(p->inbox, count_event, (void *)(intptr_t)1, NULL);
    }
}

static void on_check_done(uv_timer_t *t)
{
    osara_inbox_t *inbox = t->data;
    if (seen == 4 * 50000) {
        uv_timer_stop(t);
        uv_close((uv_handle_t *)t, NULL);
        osara_inbox_close(inbox);
    }
}

void test_inbox_accepts_posts_from_threads(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    osara_inbox_t inbox;
    CHECK(osara_inbox_init(&inbox, &loop) == 0);
    seen = 0;
    uv_thread_t threads[4];
    poster_t p = {&inbox, 50000};
    for (int i = 0; i < 4; i++) {
        uv_thread_create(&threads[i], poster_main, &p);
    }
    uv_timer_t t;
    uv_timer_init(&loop, &t);
    t.data = &inbox;
    uv_timer_start(&t, on_check_done, 1, 1);
    uv_run(&loop, UV_RUN_DEFAULT);
    for (int i = 0; i < 4; i++) {
        uv_thread_join(&threads[i]);
    }
    CHECK(seen == 200000);
    CHECK(inbox.drained_batches < 200000); /* batched, not one per event */
    CHECK(uv_loop_close(&loop) == 0);
}

void test_inbox_rejects_after_close(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    osara_inbox_t inbox;
    CHECK(osara_inbox_init(&inbox, &loop) == 0);
    osara_inbox_close(&inbox);
    CHECK(osara_inbox_post(&inbox, count_event, NULL, NULL) == OSARA_ECLOSED);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&loop) == 0);
}

/* ---- metrics -------------------------------------------------------------- */

void test_metrics_render_prometheus_text(void)
{
    osara_metric_t *a = osara_metrics_counter("t_total", "a test", "topic=\"x\"");
    osara_metric_t *b = osara_metrics_counter("t_total", "a test", "topic=\"y\"");
    osara_metric_t *g = osara_metrics_gauge("t_gauge", "a gauge", NULL);
    CHECK(a != b);
    CHECK(osara_metrics_counter("t_total", NULL, "topic=\"x\"") == a);
    osara_metric_add(a, 3);
    osara_metric_add(b, 1);
    osara_metric_set(g, 2.5);
    size_t len;
    char *text = osara_metrics_render(&len);
    CHECK(strstr(text, "# HELP t_total a test\n# TYPE t_total counter\n") != NULL);
    CHECK(strstr(text, "t_total{topic=\"x\"} 3\n") != NULL);
    CHECK(strstr(text, "t_total{topic=\"y\"} 1\n") != NULL);
    CHECK(strstr(text, "t_gauge 2.5\n") != NULL);
    CHECK(strlen(text) == len);
    free(text);
}

void test_metrics_histogram_buckets(void)
{
    osara_metric_t *h = osara_metrics_histogram("t_seconds", "latency", "route=\"/\"");
    osara_metric_observe(h, 0.0004);
    osara_metric_observe(h, 0.3);
    osara_metric_observe(h, 20);
    size_t len;
    char *text = osara_metrics_render(&len);
    CHECK(strstr(text, "t_seconds_bucket{route=\"/\",le=\"0.0005\"} 1\n") != NULL);
    CHECK(strstr(text, "t_seconds_bucket{route=\"/\",le=\"0.5\"} 2\n") != NULL);
    CHECK(strstr(text, "t_seconds_bucket{route=\"/\",le=\"+Inf\"} 3\n") != NULL);
    CHECK(strstr(text, "t_seconds_count{route=\"/\"} 3\n") != NULL);
    free(text);
}

/* ---- registry ------------------------------------------------------------- */

static int started, stopped, adopted;
static int k_start(osara_reg_entry_t *e) { (void)e; started++; return 0; }
static void k_stop(osara_reg_entry_t *e) { (void)e; stopped++; }
static void k_adopt(osara_reg_entry_t *e, osara_reg_entry_t *o)
{
    e->impl = o->impl;
    adopted++;
}
static const osara_reg_kind_t kind = {"fake", k_start, k_adopt, k_stop, NULL};

void test_registry_diff_adopts_unchanged(void)
{
    osara_registry_t old = {0}, neu = {0};
    osara_registry_add(&old, &kind, "a", "1", "x:1", "", NULL, -1, -1);
    osara_registry_add(&old, &kind, "b", "1", "x:2", "", NULL, -1, -1);
    osara_registry_add(&old, &kind, "c", "1", "x:3", "", NULL, -1, -1);
    CHECK(osara_registry_start_all(&old) == 0);
    CHECK(started == 3);
    old.head->impl = (void *)&old;
    osara_registry_add(&neu, &kind, "a", "1", "x:1", "", NULL, -1, -1); /* kept */
    osara_registry_add(&neu, &kind, "b", "2", "x:2", "", NULL, -1, -1); /* changed */
    osara_registry_add(&neu, &kind, "d", "1", "x:4", "", NULL, -1, -1); /* added */
    osara_reg_diff_t d;
    CHECK(osara_registry_apply(&old, &neu, &d) == 0);
    CHECK(d.kept == 1 && d.started == 1 && d.stopped == 1 && d.restarted == 1);
    CHECK(adopted == 1 && neu.head->impl == (void *)&old);
    CHECK(stopped == 2);      /* b (changed) and c (removed) */
    CHECK(started == 3 + 2);  /* b again and d */
    osara_registry_stop_all(&old); /* nothing active left in old */
    CHECK(stopped == 2);
    osara_registry_free(&old);
    osara_registry_free(&neu);
}

void test_registry_rejects_duplicate_keys(void)
{
    osara_registry_t reg = {0};
    CHECK(osara_registry_add(&reg, &kind, "a", "", "x:1", "", NULL, -1, -1));
    CHECK(osara_registry_add(&reg, &kind, "a", "", "x:9", "", NULL, -1, -1) == NULL);
    CHECK(strstr(osara_err_msg(), "already registered at x:1") != NULL);
    osara_registry_free(&reg);
}

void test_err_records_message(void)
{
    CHECK(osara_err_set(OSARA_EINVAL, "bad %s %d", "thing", 7) == OSARA_EINVAL);
    CHECK(strcmp(osara_err_msg(), "bad thing 7") == 0);
}

/* ---- offsets -------------------------------------------------------------- */

static int released;
static void count_release(osara_input_t *in)
{
    (void)in;
    released++;
}

void test_offsets_commit_contiguous_prefix(void)
{
    osara_offsets_t o = {.committable = -1};
    osara_input_t in[4] = {{.offset = 10}, {.offset = 11}, {.offset = 12}, {.offset = 13}};
    for (int i = 0; i < 4; i++) {
        osara_offsets_push(&o, &in[i]);
    }
    in[1].handler_done = 1; /* done out of order: nothing committable */
    CHECK(osara_offsets_advance(&o, count_release) == 0);
    CHECK(o.committable == -1);
    in[0].handler_done = 1;
    in[0].outputs_pending = 1; /* handler done, output not acknowledged */
    CHECK(osara_offsets_advance(&o, count_release) == 0);
    in[0].outputs_pending = 0;
    CHECK(osara_offsets_advance(&o, count_release) == 1);
    CHECK(o.committable == 12 && released == 2 && o.count == 2);
    in[2].handler_done = 1;
    in[2].blocked = 1; /* a failed output holds the position */
    in[3].handler_done = 1;
    CHECK(osara_offsets_advance(&o, count_release) == 0);
    CHECK(o.committable == 12);
}

/* Offsets need not be contiguous (compacted topics, transactions): the
 * position is one past the last done input; an emptied list refills. */
void test_offsets_advance_past_gaps_and_refill_after_empty(void)
{
    osara_offsets_t o = {.committable = -1};
    osara_input_t a = {.offset = 5}, b = {.offset = 9}, c = {.offset = 20};
    osara_offsets_push(&o, &a);
    osara_offsets_push(&o, &b);
    a.handler_done = b.handler_done = 1;
    released = 0;
    CHECK(osara_offsets_advance(&o, count_release) == 1);
    CHECK(o.committable == 10 && o.count == 0 && !o.head && !o.tail);
    CHECK(released == 2);
    CHECK(osara_offsets_advance(&o, count_release) == 0); /* nothing new */
    osara_offsets_push(&o, &c);
    CHECK(o.head == &c && o.tail == &c);
    c.handler_done = 1;
    CHECK(osara_offsets_advance(&o, NULL) == 1 && o.committable == 21);
}

/* ---- transport lanes ------------------------------------------------------ */

/* A real VM runs the handlers: `park(id)` parks the coroutine until the
 * test resumes it with "ok" or "fail" (the handler then raises). */
typedef struct {
    osara_delivery_t d; /* first: the lane's pointer is the message's */
    int id;
    int settled;
    osara_settle_t how;
} tmsg_t;

static struct {
    osara_worker_t w;
    osara_vm_t *vm;
    osara_reg_entry_t entry;
    osara_co_t *parked[512]; /* by message id */
    int started[512], nstarted;
    int running, max_running;
    int pauses, resumes, defers;
    int settled[512], nsettled;
} lt;

static int l_park(lua_State *L)
{
    int id = (int)luaL_checkinteger(L, 1);
    lt.parked[id] = osara_sched_current(L);
    return osara_sched_wait(L, 0, NULL, NULL);
}

static void t_push_message(lua_State *T, osara_delivery_t *d)
{
    tmsg_t *m = (tmsg_t *)d;
    lua_pushinteger(T, m->id);
    lt.started[lt.nstarted++] = m->id;
    if (++lt.running > lt.max_running) {
        lt.max_running = lt.running;
    }
}

static void t_finished(osara_delivery_t *d, int ok)
{
    (void)d;
    (void)ok;
    lt.running--;
}

static void t_settle(osara_delivery_t *d, osara_settle_t how)
{
    tmsg_t *m = (tmsg_t *)d;
    m->settled++;
    m->how = how;
    lt.settled[lt.nsettled++] = m->id;
}

static void t_pause(osara_lane_t *lane, int pause)
{
    (void)lane;
    if (pause) {
        lt.pauses++;
    } else {
        lt.resumes++;
    }
}

static const osara_transport_t test_tp = {
    .name = "test", .push_message = t_push_message, .finished = t_finished,
    .settle = t_settle, .pause = t_pause,
};

static int lane_setup(void)
{
    memset(&lt, 0, sizeof(lt));
    uv_loop_init(&lt.w.loop);
    osara_inbox_init(&lt.w.inbox, &lt.w.loop);
    lt.w.script_dir = ".";
    lt.vm = osara_vm_new(osara_worker_vm_host(&lt.w), 1);
    if (lt.vm == NULL) {
        fprintf(stderr, "vm: %s\n", osara_err_msg());
        return -1;
    }
    lt.w.vm = lt.vm;
    lua_State *L = lt.vm->L;
    if (luaL_loadstring(L, "local park = ...\n"
                           "return function(id)\n"
                           "  if park(id) == 'fail' then error('refused') end\n"
                           "end") != 0) {
        return -1;
    }
    lua_pushcfunction(L, l_park);
    lua_call(L, 1, 1); /* [handler] */
    lt.entry.vm = lt.vm;
    lt.entry.where = "test.lua:1";
    lt.entry.fnref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

static void lane_loop_close(void)
{
    osara_inbox_close(&lt.w.inbox);
    uv_run(&lt.w.loop, UV_RUN_DEFAULT);
    uv_loop_close(&lt.w.loop);
}

static void lane_teardown(void)
{
    osara_vm_close(lt.vm);
    lane_loop_close();
}

/* Ends the parked handler of message id with "ok" or "fail". */
static void finish_msg(int id, const char *how)
{
    osara_co_t *co = lt.parked[id];
    lt.parked[id] = NULL;
    lua_pushstring(osara_co_thread(co), how);
    osara_sched_resume(co, 1);
}

static void push_msgs(osara_lane_t *lane, tmsg_t *m, int n)
{
    for (int i = 0; i < n; i++) {
        m[i].id = i + 1;
        osara_lane_push(lane, &m[i].d);
    }
}

void test_lane_ordered_runs_one_at_a_time_in_order(void)
{
    CHECK(lane_setup() == 0);
    osara_lane_t lane;
    tmsg_t m[3] = {0};
    osara_lane_init(&lane, &test_tp, NULL, "orders", 1, 8, 100);
    push_msgs(&lane, m, 3); /* no entry yet: all stay queued */
    CHECK(lt.nstarted == 0);
    osara_lane_set_entry(&lane, &lt.entry);
    CHECK(lt.nstarted == 1 && lt.parked[1] && !lt.parked[2]);
    finish_msg(1, "ok");
    CHECK(lt.nstarted == 2 && lt.parked[2] && !lt.parked[3]);
    finish_msg(2, "ok");
    finish_msg(3, "ok");
    CHECK(lt.nstarted == 3 && lt.max_running == 1);
    CHECK(lt.started[0] == 1 && lt.started[1] == 2 && lt.started[2] == 3);
    CHECK(lt.nsettled == 3 && m[2].how == OSARA_SETTLE_ACK && lane.held == 0);
    CHECK(strcmp(lane.label, "test handler orders (test.lua:1)") == 0);
    lane_teardown();
}

void test_lane_unordered_bounds_running(void)
{
    CHECK(lane_setup() == 0);
    osara_lane_t lane;
    tmsg_t m[5] = {0};
    osara_lane_init(&lane, &test_tp, NULL, "subj", 0, 2, 100);
    osara_lane_set_entry(&lane, &lt.entry);
    push_msgs(&lane, m, 5);
    CHECK(lt.nstarted == 2 && lane.running == 2);
    finish_msg(2, "ok"); /* out of order is fine here */
    CHECK(lt.nstarted == 3 && lane.running == 2);
    finish_msg(1, "ok");
    finish_msg(3, "ok");
    finish_msg(4, "ok");
    finish_msg(5, "ok");
    CHECK(lt.max_running == 2 && lt.nsettled == 5 && lane.held == 0);
    lane_teardown();
}

void test_lane_pauses_at_max_held_and_resumes_at_half(void)
{
    CHECK(lane_setup() == 0);
    osara_lane_t lane;
    tmsg_t m[4] = {0};
    osara_lane_init(&lane, &test_tp, NULL, "p", 1, 1, 4);
    osara_lane_set_entry(&lane, &lt.entry);
    push_msgs(&lane, m, 3);
    CHECK(lt.pauses == 0);
    m[3].id = 4;
    osara_lane_push(&lane, &m[3].d);
    CHECK(lt.pauses == 1 && lane.paused);
    finish_msg(1, "ok"); /* held 3 */
    CHECK(lt.resumes == 0);
    finish_msg(2, "ok"); /* held 2: half */
    CHECK(lt.resumes == 1 && !lane.paused && lt.pauses == 1);
    finish_msg(3, "ok");
    finish_msg(4, "ok");
    CHECK(lt.resumes == 1);
    lane_teardown();
}

void test_lane_settles_after_handler_and_outputs(void)
{
    CHECK(lane_setup() == 0);
    osara_lane_t lane;
    tmsg_t m[1] = {0};
    osara_lane_init(&lane, &test_tp, NULL, "o", 1, 1, 10);
    osara_lane_set_entry(&lane, &lt.entry);
    push_msgs(&lane, m, 1);
    osara_delivery_t *d = osara_delivery_of(lt.parked[1]);
    CHECK(d == &m[0].d);
    osara_delivery_output_begin(d); /* sent while the handler runs */
    osara_delivery_output_begin(d);
    osara_delivery_output_end(d, 1); /* acknowledged before it returns */
    CHECK(m[0].settled == 0);
    finish_msg(1, "ok");
    CHECK(m[0].settled == 0 && lane.held == 1); /* one output still pending */
    osara_delivery_output_end(d, 1);
    CHECK(m[0].settled == 1 && m[0].how == OSARA_SETTLE_ACK && lane.held == 0);
    lane_teardown();
}

void test_lane_failed_output_settles_retry(void)
{
    CHECK(lane_setup() == 0);
    osara_lane_t lane;
    tmsg_t m[2] = {0};
    osara_lane_init(&lane, &test_tp, NULL, "r", 1, 1, 10);
    osara_lane_set_entry(&lane, &lt.entry);
    push_msgs(&lane, m, 2);
    osara_delivery_t *d = osara_delivery_of(lt.parked[1]);
    osara_delivery_output_begin(d);
    finish_msg(1, "ok");
    osara_delivery_output_end(d, 0);
    CHECK(m[0].settled == 1 && m[0].how == OSARA_SETTLE_RETRY);
    /* a raising handler settles RETRY too; the broker may requeue it,
     * ahead of what was pushed after it */
    lane.hold = 1;
    finish_msg(2, "fail");
    CHECK(m[1].settled == 1 && m[1].how == OSARA_SETTLE_RETRY);
    osara_lane_requeue(&lane, &m[1].d);
    osara_lane_requeue(&lane, &m[0].d);
    CHECK(lane.held == 2 && lt.nstarted == 2); /* held back */
    lane.hold = 0;
    osara_lane_pump(&lane);
    CHECK(lt.nstarted == 3 && lt.started[2] == 1 && m[0].d.attempt == 2);
    finish_msg(1, "ok");
    finish_msg(2, "ok");
    CHECK(m[0].how == OSARA_SETTLE_ACK && m[1].how == OSARA_SETTLE_ACK);
    CHECK(lane.held == 0);
    lane_teardown();
}

static void t_defer(osara_lane_t *lane)
{
    (void)lane;
    lt.defers++;
}

static const osara_transport_t deferring_tp = {
    .name = "test", .push_message = t_push_message, .finished = t_finished,
    .settle = t_settle, .defer = t_defer,
};

void test_lane_defers_a_long_queue_to_later_turns(void)
{
    CHECK(lane_setup() == 0);
    osara_lane_t lane;
    static tmsg_t m[300];
    memset(m, 0, sizeof(m));
    osara_lane_init(&lane, &deferring_tp, NULL, "backlog", 0, 1000, 1000);
    push_msgs(&lane, m, 300); /* no entry yet: a backlog */
    osara_lane_set_entry(&lane, &lt.entry);
    CHECK(lt.nstarted >= 1 && lt.nstarted <= OSARA_LANE_STARTS_PER_PUMP && lt.defers == 1);
    for (int turn = 0; turn < 300 && lt.nstarted < 300; turn++) {
        uv_update_time(&lt.w.loop); /* the broker's next turn */
        osara_lane_pump(&lane);
    }
    CHECK(lt.nstarted == 300);
    for (int i = 1; i <= 300; i++) {
        finish_msg(i, "ok");
    }
    CHECK(lt.nsettled == 300 && lane.held == 0);
    lane_teardown();
}

void test_lane_stop_and_vm_close_settle_cancelled(void)
{
    CHECK(lane_setup() == 0);
    osara_lane_t lane;
    tmsg_t m[3] = {0};
    osara_lane_init(&lane, &test_tp, NULL, "s", 1, 1, 10);
    osara_lane_set_entry(&lane, &lt.entry);
    push_msgs(&lane, m, 3);
    osara_lane_stop(&lane); /* the two queued ones */
    CHECK(m[1].how == OSARA_SETTLE_CANCELLED && m[2].how == OSARA_SETTLE_CANCELLED);
    CHECK(m[0].settled == 0);
    osara_vm_close(lt.vm); /* the running one: cancelled, not failed */
    CHECK(m[0].settled == 1 && m[0].how == OSARA_SETTLE_CANCELLED);
    CHECK(lane.held == 0);
    lane_loop_close();
}

/* ---- runner ----------------------------------------------------------------- */

static const struct {
    const char *name;
    void (*fn)(void);
} tests[] = {
#define OSARA_TEST(name) {#name, test_##name},
#include "tests.h"
#undef OSARA_TEST
};

int main(int argc, char **argv)
{
    int ran = 0;
    for (size_t i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
        if (argc > 1 && strcmp(argv[1], tests[i].name) != 0) {
            continue;
        }
        int before = osara_test_failures;
        tests[i].fn();
        printf("%s %s\n", osara_test_failures == before ? "ok" : "FAIL", tests[i].name);
        ran++;
    }
    if (ran == 0) {
        fprintf(stderr, "no test named %s\n", argc > 1 ? argv[1] : "?");
        return 2;
    }
    return osara_test_failures ? 1 : 0;
}
