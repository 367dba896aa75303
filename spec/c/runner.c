/* The C unit test runner: `osara_ctest NAME` runs one test (ctest runs each
 * in its own process with a timeout); `osara_ctest` alone runs them all. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "core/err.h"
#include "core/loop.h"
#include "core/metrics.h"
#include "transport/offsets.h"
#include "core/registry.h"

static int failures;

#define CHECK(cond)                                                        \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, \
                    #cond);                                                \
            failures++;                                                    \
            return;                                                        \
        }                                                                  \
    } while (0)

/* ---- inbox ---------------------------------------------------------------- */

static int seen;
static void count_event(void *arg, void *unused)
{
    (void)unused;
    seen += (int)(intptr_t)arg;
}

static void test_inbox_drains_in_batches(void)
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

static void test_inbox_accepts_posts_from_threads(void)
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

static void test_inbox_rejects_after_close(void)
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

static void test_metrics_render_prometheus_text(void)
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

static void test_metrics_histogram_buckets(void)
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

static void test_registry_diff_adopts_unchanged(void)
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

static void test_registry_rejects_duplicate_keys(void)
{
    osara_registry_t reg = {0};
    CHECK(osara_registry_add(&reg, &kind, "a", "", "x:1", "", NULL, -1, -1));
    CHECK(osara_registry_add(&reg, &kind, "a", "", "x:9", "", NULL, -1, -1) == NULL);
    CHECK(strstr(osara_err_msg(), "already registered at x:1") != NULL);
    osara_registry_free(&reg);
}

static void test_err_records_message(void)
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

static void test_offsets_commit_contiguous_prefix(void)
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
        int before = failures;
        tests[i].fn();
        printf("%s %s\n", failures == before ? "ok" : "FAIL", tests[i].name);
        ran++;
    }
    if (ran == 0) {
        fprintf(stderr, "no test named %s\n", argc > 1 ? argv[1] : "?");
        return 2;
    }
    return failures ? 1 : 0;
}
