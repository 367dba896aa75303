/* metrics.h - counters, gauges and histograms kept in C.
 *
 * A series is (family name, label string) and lives until exit; callers
 * look it up once and keep the pointer. Updates are atomic, so any thread
 * (librdkafka, nats.c callbacks, workers) may update a series. Rendering
 * produces Prometheus text exposition format. */
#ifndef OSARA_METRICS_H
#define OSARA_METRICS_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    OSARA_METRIC_COUNTER = 0,
    OSARA_METRIC_GAUGE,
    OSARA_METRIC_HISTOGRAM,
} osara_metric_type_t;

typedef struct osara_metric_s osara_metric_t;

/* Finds or creates the series `name{labels}`. `labels` is Prometheus label
 * text without braces (`topic="a",partition="0"`) or NULL. The family's type
 * and help come from the first registration. Never returns NULL (aborts on
 * out-of-memory, since metrics are set up at start-up). */
osara_metric_t *osara_metrics_series(osara_metric_type_t type, const char *name,
                                     const char *help, const char *labels);

/* Shorthands. */
osara_metric_t *osara_metrics_counter(const char *name, const char *help,
                                      const char *labels);
osara_metric_t *osara_metrics_gauge(const char *name, const char *help,
                                    const char *labels);
osara_metric_t *osara_metrics_histogram(const char *name, const char *help,
                                        const char *labels);

void osara_metric_add(osara_metric_t *m, uint64_t n);  /* counters */
void osara_metric_set(osara_metric_t *m, double v);    /* gauges */
void osara_metric_gauge_add(osara_metric_t *m, double d);
void osara_metric_observe(osara_metric_t *m, double v); /* histograms */
double osara_metric_value(const osara_metric_t *m);    /* count for histograms */

/* Looks up an existing series; NULL if none. */
osara_metric_t *osara_metrics_find(const char *name, const char *labels);

/* Renders every series as Prometheus text into a malloc'ed string the caller
 * frees; *len receives its length. */
char *osara_metrics_render(size_t *len);

/* Registers the Lua binding table `osara.metrics_c`. */
struct lua_State;
int osara_metrics_open(struct lua_State *L);

#endif
