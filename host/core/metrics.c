#include "core/metrics.h"

#include <lauxlib.h>
#include <lua.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

/* Latency-style buckets in seconds. */
static const double buckets[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                 0.05,   0.1,   0.25,   0.5,   1,     2.5,
                                 5,      10};
#define NBUCKETS (sizeof(buckets) / sizeof(buckets[0]))

struct osara_metric_s {
    struct osara_metric_s *next; /* next series of the family */
    char *labels;
    _Atomic uint64_t count;       /* counter value / histogram count */
    _Atomic uint64_t bits;        /* gauge value / histogram sum as double */
    _Atomic uint64_t bucket[NBUCKETS];
};

typedef struct family_s {
    struct family_s *next;
    char *name, *help;
    osara_metric_type_t type;
    osara_metric_t *series;
} family_t;

static family_t *families;
static uv_once_t once = UV_ONCE_INIT;
static uv_mutex_t mu;

static void init_mutex(void)
{
    uv_mutex_init(&mu);
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n, size);
    if (p == NULL) {
        abort();
    }
    return p;
}

static char *xstrdup(const char *s)
{
    char *p = strdup(s ? s : "");
    if (p == NULL) {
        abort();
    }
    return p;
}

static family_t *find_family(const char *name)
{
    for (family_t *f = families; f; f = f->next) {
        if (strcmp(f->name, name) == 0) {
            return f;
        }
    }
    return NULL;
}

static osara_metric_t *find_series(family_t *f, const char *labels)
{
    for (osara_metric_t *m = f->series; m; m = m->next) {
        if (strcmp(m->labels, labels ? labels : "") == 0) {
            return m;
        }
    }
    return NULL;
}

osara_metric_t *osara_metrics_series(osara_metric_type_t type, const char *name,
                                     const char *help, const char *labels)
{
    uv_once(&once, init_mutex);
    uv_mutex_lock(&mu);
    family_t *f = find_family(name);
    if (f == NULL) {
        f = xcalloc(1, sizeof(*f));
        f->name = xstrdup(name);
        f->help = xstrdup(help ? help : name);
        f->type = type;
        /* Append so rendering keeps registration order. */
        family_t **tail = &families;
        while (*tail) {
            tail = &(*tail)->next;
        }
        *tail = f;
    }
    osara_metric_t *m = find_series(f, labels);
    if (m == NULL) {
        m = xcalloc(1, sizeof(*m));
        m->labels = xstrdup(labels);
        osara_metric_t **tail = &f->series;
        while (*tail) {
            tail = &(*tail)->next;
        }
        *tail = m;
    }
    uv_mutex_unlock(&mu);
    return m;
}

osara_metric_t *osara_metrics_counter(const char *name, const char *help,
                                      const char *labels)
{
    return osara_metrics_series(OSARA_METRIC_COUNTER, name, help, labels);
}

osara_metric_t *osara_metrics_gauge(const char *name, const char *help,
                                    const char *labels)
{
    return osara_metrics_series(OSARA_METRIC_GAUGE, name, help, labels);
}

osara_metric_t *osara_metrics_histogram(const char *name, const char *help,
                                        const char *labels)
{
    return osara_metrics_series(OSARA_METRIC_HISTOGRAM, name, help, labels);
}

osara_metric_t *osara_metrics_find(const char *name, const char *labels)
{
    uv_once(&once, init_mutex);
    uv_mutex_lock(&mu);
    family_t *f = find_family(name);
    osara_metric_t *m = f ? find_series(f, labels) : NULL;
    uv_mutex_unlock(&mu);
    return m;
}

static double bits_to_double(uint64_t b)
{
    double d;
    memcpy(&d, &b, sizeof(d));
    return d;
}

static uint64_t double_to_bits(double d)
{
    uint64_t b;
    memcpy(&b, &d, sizeof(b));
    return b;
}

static void atomic_add_double(_Atomic uint64_t *p, double d)
{
    uint64_t old = atomic_load(p);
    while (!atomic_compare_exchange_weak(p, &old,
                                         double_to_bits(bits_to_double(old) + d))) {
    }
}

void osara_metric_add(osara_metric_t *m, uint64_t n)
{
    atomic_fetch_add_explicit(&m->count, n, memory_order_relaxed);
}

void osara_metric_set(osara_metric_t *m, double v)
{
    atomic_store(&m->bits, double_to_bits(v));
}

void osara_metric_gauge_add(osara_metric_t *m, double d)
{
    atomic_add_double(&m->bits, d);
}

void osara_metric_observe(osara_metric_t *m, double v)
{
    for (size_t i = 0; i < NBUCKETS; i++) {
        if (v <= buckets[i]) {
            atomic_fetch_add_explicit(&m->bucket[i], 1, memory_order_relaxed);
            break;
        }
    }
    atomic_fetch_add_explicit(&m->count, 1, memory_order_relaxed);
    atomic_add_double(&m->bits, v);
}

double osara_metric_value(const osara_metric_t *m)
{
    /* Counters and histograms report a count; gauges their value. */
    uint64_t c = atomic_load(&m->count);
    uint64_t b = atomic_load(&m->bits);
    return c ? (double)c : bits_to_double(b);
}

typedef struct {
    char *p;
    size_t len, cap;
} sbuf_t;

static void sb_printf(sbuf_t *sb, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void sb_printf(sbuf_t *sb, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        size_t room = sb->cap - sb->len;
        int n = vsnprintf(sb->p ? sb->p + sb->len : NULL, room, fmt, ap);
        va_end(ap);
        if (n >= 0 && (size_t)n < room) {
            sb->len += (size_t)n;
            return;
        }
        sb->cap = sb->cap ? sb->cap * 2 : 4096;
        if ((size_t)n >= sb->cap) {
            sb->cap = (size_t)n + 4096;
        }
        sb->p = realloc(sb->p, sb->cap);
        if (sb->p == NULL) {
            abort();
        }
    }
}

static void render_histogram(sbuf_t *sb, family_t *f, osara_metric_t *m)
{
    const char *sep = m->labels[0] ? "," : "";
    uint64_t cum = 0;
    for (size_t i = 0; i < NBUCKETS; i++) {
        cum += atomic_load(&m->bucket[i]);
        sb_printf(sb, "%s_bucket{%s%sle=\"%g\"} %llu\n", f->name, m->labels,
                  sep, buckets[i], (unsigned long long)cum);
    }
    uint64_t count = atomic_load(&m->count);
    sb_printf(sb, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", f->name, m->labels, sep,
              (unsigned long long)count);
    const char *ob = m->labels[0] ? "{" : "", *cb = m->labels[0] ? "}" : "";
    sb_printf(sb, "%s_sum%s%s%s %.9g\n", f->name, ob, m->labels, cb,
              bits_to_double(atomic_load(&m->bits)));
    sb_printf(sb, "%s_count%s%s%s %llu\n", f->name, ob, m->labels, cb,
              (unsigned long long)count);
}

char *osara_metrics_render(size_t *len)
{
    static const char *type_names[] = {"counter", "gauge", "histogram"};
    sbuf_t sb = {0};
    uv_once(&once, init_mutex);
    uv_mutex_lock(&mu);
    for (family_t *f = families; f; f = f->next) {
        sb_printf(&sb, "# HELP %s %s\n# TYPE %s %s\n", f->name, f->help,
                  f->name, type_names[f->type]);
        for (osara_metric_t *m = f->series; m; m = m->next) {
            const char *ob = m->labels[0] ? "{" : "", *cb = m->labels[0] ? "}" : "";
            if (f->type == OSARA_METRIC_COUNTER) {
                sb_printf(&sb, "%s%s%s%s %llu\n", f->name, ob, m->labels, cb,
                          (unsigned long long)atomic_load(&m->count));
            } else if (f->type == OSARA_METRIC_GAUGE) {
                sb_printf(&sb, "%s%s%s%s %.9g\n", f->name, ob, m->labels, cb,
                          bits_to_double(atomic_load(&m->bits)));
            } else {
                render_histogram(&sb, f, m);
            }
        }
    }
    uv_mutex_unlock(&mu);
    if (sb.p == NULL) {
        sb_printf(&sb, "%s", "");
    }
    *len = sb.len;
    return sb.p;
}

/* ---- Lua binding: osara.metrics_c ------------------------------------- */

/* Appends s to out (length len, capacity cap, kept NUL-terminated) if it
 * fits whole, so an escape is never cut in half; returns the new length. */
static size_t append(char *out, size_t len, size_t cap, const char *s)
{
    size_t n = strlen(s);
    if (len + n + 1 > cap) {
        return len;
    }
    memcpy(out + len, s, n + 1);
    return len + n;
}

/* Appends a label value escaped as the Prometheus text format requires:
 * backslash, double quote and newline as \\, \" and \n. */
static size_t append_label_value(char *out, size_t len, size_t cap, const char *v)
{
    for (; *v; v++) {
        char one[2] = {*v, '\0'};
        const char *esc = *v == '\\' ? "\\\\" : *v == '"' ? "\\\"" : *v == '\n' ? "\\n" : one;
        len = append(out, len, cap, esc);
    }
    return len;
}

/* Builds `k="v",...` label text from the table at index idx (sorted keys so
 * the same labels always name the same series). */
static void labels_from_table(lua_State *L, int idx, char *out, size_t cap)
{
    out[0] = '\0';
    if (lua_isnoneornil(L, idx)) {
        return;
    }
    if (lua_type(L, idx) == LUA_TSTRING) {
        snprintf(out, cap, "%s", lua_tostring(L, idx));
        return;
    }
    luaL_checktype(L, idx, LUA_TTABLE);
    const char *keys[32];
    int n = 0;
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        lua_pop(L, 1); /* [key] */
        if (n == 32) {
            lua_pop(L, 1);
            break;
        }
        if (lua_type(L, -1) == LUA_TSTRING) {
            keys[n++] = lua_tostring(L, -1);
        }
    }
    for (int i = 1; i < n; i++) { /* insertion sort: few labels */
        for (int j = i; j > 0 && strcmp(keys[j - 1], keys[j]) > 0; j--) {
            const char *t = keys[j];
            keys[j] = keys[j - 1];
            keys[j - 1] = t;
        }
    }
    size_t len = 0;
    for (int i = 0; i < n; i++) {
        lua_getfield(L, idx, keys[i]);
        const char *v = lua_isstring(L, -1) ? lua_tostring(L, -1)
                        : lua_isboolean(L, -1) ? (lua_toboolean(L, -1) ? "true" : "false")
                        : "?";
        char pair[512]; /* one whole label or none: never half of one */
        size_t k = append(pair, 0, sizeof(pair), i ? "," : "");
        k = append(pair, k, sizeof(pair), keys[i]);
        k = append(pair, k, sizeof(pair), "=\"");
        k = append_label_value(pair, k, sizeof(pair) - 1, v); /* room for the quote */
        k = append(pair, k, sizeof(pair), "\"");
        lua_pop(L, 1);
        size_t before = len;
        len = append(out, len, cap, pair);
        if (len == before || pair[k - 1] != '"') {
            out[before] = '\0';
            break;
        }
    }
}

static osara_metric_t *check_series(lua_State *L, osara_metric_type_t type)
{
    const char *name = luaL_checkstring(L, 1);
    char labels[1024];
    labels_from_table(L, 2, labels, sizeof(labels));
    const char *help = luaL_optstring(L, 3, name);
    return osara_metrics_series(type, name, help, labels);
}

/* metrics_c.add(name, labels, help, n): counter += n */
static int l_metrics_add(lua_State *L)
{
    osara_metric_t *m = check_series(L, OSARA_METRIC_COUNTER);
    osara_metric_add(m, (uint64_t)luaL_optnumber(L, 4, 1));
    return 0;
}

/* metrics_c.set(name, labels, help, v): gauge = v */
static int l_metrics_set(lua_State *L)
{
    osara_metric_t *m = check_series(L, OSARA_METRIC_GAUGE);
    osara_metric_set(m, luaL_checknumber(L, 4));
    return 0;
}

/* metrics_c.observe(name, labels, help, v): histogram sample */
static int l_metrics_observe(lua_State *L)
{
    osara_metric_t *m = check_series(L, OSARA_METRIC_HISTOGRAM);
    osara_metric_observe(m, luaL_checknumber(L, 4));
    return 0;
}

/* metrics_c.value(name, labels) -> number (0 if the series does not exist) */
static int l_metrics_value(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    char labels[1024];
    labels_from_table(L, 2, labels, sizeof(labels));
    osara_metric_t *m = osara_metrics_find(name, labels);
    lua_pushnumber(L, m ? osara_metric_value(m) : 0);
    return 1;
}

/* metrics_c.render() -> Prometheus text */
static int l_metrics_render(lua_State *L)
{
    size_t len;
    char *text = osara_metrics_render(&len);
    lua_pushlstring(L, text, len);
    free(text);
    return 1;
}

int osara_metrics_open(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"add", l_metrics_add},       {"set", l_metrics_set},
        {"observe", l_metrics_observe}, {"value", l_metrics_value},
        {"render", l_metrics_render}, {NULL, NULL},
    };
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
