#include "core/log.h"

#include "core/mem.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

static const char *level_names[] = {"DEBUG", "INFO", "WARN", "ERROR", "OFF"};
static const char *level_lower[] = {"debug", "info", "warn", "error", "off"};

static struct {
    atomic_int level;
    osara_log_format_t format;
    int running;
    uv_thread_t thread;
    uv_mutex_t mu;
    uv_cond_t cond;
    char *buf;
    size_t len, cap;
    size_t dropped;
    int stop;
    /* --log-file: written by the writer thread only (stderr until set) */
    int fd;
    char *path;
    uint64_t max_bytes; /* rotate past this size; 0: never */
    uint64_t written;   /* bytes in the current file */
    volatile sig_atomic_t reopen; /* SIGUSR1: logrotate moved the file */
} lg = {.level = OSARA_LOG_INFO, .fd = STDERR_FILENO};

#define LOG_FILES_KEPT 5 /* path.1 ... path.5 after size rotations */

int osara_log_parse_level(const char *s)
{
    for (int i = 0; i <= OSARA_LOG_OFF; i++) {
        if (strcmp(s, level_lower[i]) == 0) {
            return i;
        }
    }
    if (strcmp(s, "warning") == 0) {
        return OSARA_LOG_WARN;
    }
    return -1;
}

int osara_log_parse_format(const char *s)
{
    if (strcmp(s, "text") == 0) {
        return OSARA_LOG_TEXT;
    }
    if (strcmp(s, "json") == 0) {
        return OSARA_LOG_JSON;
    }
    return -1;
}

void osara_log_set_level(osara_log_level_t level)
{
    atomic_store(&lg.level, (int)level);
}

osara_log_level_t osara_log_get_level(void)
{
    return (osara_log_level_t)atomic_load(&lg.level);
}

int osara_log_enabled(osara_log_level_t level)
{
    return (int)level >= atomic_load(&lg.level);
}

static void write_all(const char *p, size_t n)
{
    lg.written += n;
    while (n > 0) {
        ssize_t w = write(lg.fd, p, n);
        if (w <= 0) {
            return; /* nowhere to report a broken stderr */
        }
        p += w;
        n -= (size_t)w;
    }
}

static int open_log_file(const char *path)
{
    return open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
}

/* Opens path again (after logrotate moved it, or after a size rotation
 * shifted path -> path.1 -> ... -> path.5). On failure the old descriptor
 * stays: lines keep going somewhere rather than nowhere. */
static void reopen_log_file(int shift)
{
    if (shift) {
        char from[4096], to[4096];
        for (int k = LOG_FILES_KEPT; k >= 1; k--) {
            snprintf(to, sizeof(to), "%s.%d", lg.path, k);
            if (k == 1) {
                snprintf(from, sizeof(from), "%s", lg.path);
            } else {
                snprintf(from, sizeof(from), "%s.%d", lg.path, k - 1);
            }
            rename(from, to); /* a missing older file is fine */
        }
    }
    int fd = open_log_file(lg.path);
    if (fd < 0) {
        return;
    }
    close(lg.fd);
    lg.fd = fd;
    struct stat st;
    lg.written = fstat(fd, &st) == 0 ? (uint64_t)st.st_size : 0;
}

/* Before writing n bytes: honour a SIGUSR1, or rotate by size. */
static void maybe_rotate(size_t n)
{
    if (!lg.path) {
        return;
    }
    if (lg.reopen) {
        lg.reopen = 0;
        reopen_log_file(0);
    }
    if (lg.max_bytes && lg.written > 0 && lg.written + n > lg.max_bytes) {
        reopen_log_file(1);
    }
}

static void on_sigusr1(int sig)
{
    (void)sig;
    lg.reopen = 1;
}

int osara_log_set_file(const char *path, uint64_t max_bytes)
{
    int fd = open_log_file(path);
    if (fd < 0) {
        return -errno;
    }
    struct stat st;
    lg.written = fstat(fd, &st) == 0 ? (uint64_t)st.st_size : 0;
    lg.fd = fd;
    lg.path = osara_xstrdup(path);
    lg.max_bytes = max_bytes;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_sigusr1;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    return 0;
}

static void writer_main(void *arg)
{
    (void)arg;
    char *out = NULL;
    size_t out_cap = 0;
    uv_mutex_lock(&lg.mu);
    for (;;) {
        while (lg.len == 0 && !lg.stop) {
            uv_cond_wait(&lg.cond, &lg.mu);
        }
        if (lg.len == 0 && lg.stop) {
            break;
        }
        /* Swap buffers so formatting threads never wait on write(). */
        char *tmp = out;
        size_t tmp_cap = out_cap, n = lg.len;
        out = lg.buf;
        out_cap = lg.cap;
        lg.buf = tmp;
        lg.cap = tmp_cap;
        lg.len = 0;
        size_t dropped = lg.dropped;
        lg.dropped = 0;
        uv_mutex_unlock(&lg.mu);
        maybe_rotate(n);
        write_all(out, n);
        if (dropped > 0) {
            char note[96];
            int k = snprintf(note, sizeof(note),
                             "osara: %zu log lines dropped (stderr too slow)\n",
                             dropped);
            write_all(note, (size_t)k);
        }
        uv_mutex_lock(&lg.mu);
    }
    uv_mutex_unlock(&lg.mu);
    free(out);
}

void osara_log_init(osara_log_level_t level, osara_log_format_t format)
{
    osara_log_set_level(level);
    lg.format = format;
    if (lg.running) {
        return;
    }
    uv_mutex_init(&lg.mu);
    uv_cond_init(&lg.cond);
    lg.stop = 0;
    if (uv_thread_create(&lg.thread, writer_main, NULL) == 0) {
        lg.running = 1;
    }
    static int at_exit;
    if (!at_exit) {
        /* os.exit() in a script: the lines written before it still go out */
        atexit(osara_log_shutdown);
        at_exit = 1;
    }
}

void osara_log_shutdown(void)
{
    if (!lg.running) {
        return;
    }
    uv_mutex_lock(&lg.mu);
    lg.stop = 1;
    uv_cond_signal(&lg.cond);
    uv_mutex_unlock(&lg.mu);
    uv_thread_join(&lg.thread);
    lg.running = 0;
    free(lg.buf);
    lg.buf = NULL;
    lg.len = lg.cap = 0;
    uv_cond_destroy(&lg.cond);
    uv_mutex_destroy(&lg.mu);
    if (lg.path) {
        close(lg.fd);
        lg.fd = STDERR_FILENO;
        free(lg.path);
        lg.path = NULL;
    }
}

static size_t format_time(char *dst, size_t cap)
{
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    size_t n = strftime(dst, cap, "%Y-%m-%dT%H:%M:%S", &tm);
    n += (size_t)snprintf(dst + n, cap - n, ".%03dZ", (int)(tv.tv_usec / 1000));
    return n;
}

/* Appends s as a JSON string body (no quotes) to dst; returns bytes used. */
static size_t json_escape(char *dst, size_t cap, const char *s, size_t len)
{
    size_t n = 0;
    for (size_t i = 0; i < len && n + 7 < cap; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            dst[n++] = '\\';
            dst[n++] = (char)c;
        } else if (c == '\n') {
            dst[n++] = '\\';
            dst[n++] = 'n';
        } else if (c == '\t') {
            dst[n++] = '\\';
            dst[n++] = 't';
        } else if (c < 0x20) {
            n += (size_t)snprintf(dst + n, cap - n, "\\u%04x", c);
        } else {
            dst[n++] = (char)c;
        }
    }
    return n;
}

static void enqueue(const char *line, size_t n)
{
    if (!lg.running) {
        write_all(line, n);
        return;
    }
    uv_mutex_lock(&lg.mu);
    if (lg.len + n > OSARA_LOG_MAX_BUFFER) {
        lg.dropped++;
    } else {
        if (lg.len + n > lg.cap) {
            size_t cap = lg.cap ? lg.cap : 16384;
            while (cap < lg.len + n) {
                cap *= 2;
            }
            lg.buf = osara_xrealloc(lg.buf, cap);
            lg.cap = cap;
        }
        memcpy(lg.buf + lg.len, line, n);
        lg.len += n;
        uv_cond_signal(&lg.cond);
    }
    uv_mutex_unlock(&lg.mu);
}

/* Room kept at the end of a line for what closes it. */
#define LINE_TAIL 4

/* Appends `,"key":value` (JSON) to line at n; returns the new length. */
static size_t json_field(char *line, size_t n, size_t cap, const osara_log_field_t *f)
{
    if (n + strlen(f->key) + 8 + LINE_TAIL >= cap) {
        return n;
    }
    line[n++] = ',';
    line[n++] = '"';
    n += json_escape(line + n, cap - n - LINE_TAIL, f->key, strlen(f->key));
    line[n++] = '"';
    line[n++] = ':';
    if (f->number) {
        size_t k = f->len < cap - n - LINE_TAIL ? f->len : cap - n - LINE_TAIL;
        memcpy(line + n, f->val, k);
        return n + k;
    }
    line[n++] = '"';
    n += json_escape(line + n, cap - n - LINE_TAIL - 1, f->val, f->len);
    line[n++] = '"';
    return n;
}

/* A text value needs quotes when it is empty or holds a space, a quote,
 * an equals sign or a control character. */
static int needs_quotes(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c <= ' ' || c == '"' || c == '=') {
            return 1;
        }
    }
    return len == 0;
}

/* Appends ` key=value` (text) to line at n; returns the new length. */
static size_t text_field(char *line, size_t n, size_t cap, const osara_log_field_t *f)
{
    size_t klen = strlen(f->key);
    if (n + klen + 4 + LINE_TAIL >= cap) {
        return n;
    }
    line[n++] = ' ';
    memcpy(line + n, f->key, klen);
    n += klen;
    line[n++] = '=';
    if (!f->number && needs_quotes(f->val, f->len)) {
        line[n++] = '"';
        n += json_escape(line + n, cap - n - LINE_TAIL - 1, f->val, f->len);
        line[n++] = '"';
        return n;
    }
    size_t k = f->len < cap - n - LINE_TAIL ? f->len : cap - n - LINE_TAIL;
    memcpy(line + n, f->val, k);
    return n + k;
}

static void format_and_enqueue(osara_log_level_t level, const char *msg, size_t len,
                               const osara_log_field_t *fields, int nfields);

void osara_log_fields(osara_log_level_t level, const char *msg, size_t len,
                      const osara_log_field_t *fields, int nfields)
{
    if (!osara_log_enabled(level) || level >= OSARA_LOG_OFF) {
        return;
    }
    format_and_enqueue(level, msg, len, fields, nfields);
}

static void format_and_enqueue(osara_log_level_t level, const char *msg, size_t len,
                               const osara_log_field_t *fields, int nfields)
{
    char line[8192];
    char ts[40];
    format_time(ts, sizeof(ts));
    size_t n;
    if (lg.format == OSARA_LOG_JSON) {
        n = (size_t)snprintf(line, sizeof(line),
                             "{\"ts\":\"%s\",\"level\":\"%s\",\"msg\":\"", ts,
                             level_lower[level]);
        n += json_escape(line + n, sizeof(line) - n - LINE_TAIL - 1, msg, len);
        line[n++] = '"';
        for (int i = 0; i < nfields; i++) {
            n = json_field(line, n, sizeof(line), &fields[i]);
        }
        memcpy(line + n, "}\n", 2);
        n += 2;
    } else {
        n = (size_t)snprintf(line, sizeof(line), "%s %-5s ", ts,
                             level_names[level]);
        size_t room = sizeof(line) - n - LINE_TAIL;
        size_t k = len < room ? len : room;
        memcpy(line + n, msg, k);
        n += k;
        for (int i = 0; i < nfields; i++) {
            n = fields[i].text ? text_field(line, n, sizeof(line), &fields[i]) : n;
        }
        line[n++] = '\n';
    }
    enqueue(line, n);
}

void osara_log_write(osara_log_level_t level, const char *msg, size_t len)
{
    osara_log_fields(level, msg, len, NULL, 0);
}

void osara_log(osara_log_level_t level, const char *fmt, ...)
{
    if (!osara_log_enabled(level)) {
        return;
    }
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (n < 0) {
        return;
    }
    osara_log_write(level, msg, (size_t)n < sizeof(msg) ? (size_t)n : sizeof(msg) - 1);
}

/* ---- Lua binding: osara.log_c ------------------------------------------ */

#include <lauxlib.h>
#include <lua.h>

#define MAX_FIELDS 32

/* Known fields first, in this order; the others after them by name. */
static int field_rank(const char *key)
{
    static const char *known[] = {"handler", "topic", "partition", "offset", "subject",
                                  "route", "request_id", "where", "err", NULL};
    for (int i = 0; known[i]; i++) {
        if (strcmp(key, known[i]) == 0) {
            return i;
        }
    }
    return 100;
}

static int field_cmp(const void *a, const void *b)
{
    const osara_log_field_t *x = a, *y = b;
    int rx = field_rank(x->key), ry = field_rank(y->key);
    return rx != ry ? rx - ry : strcmp(x->key, y->key);
}

static int has_field(const osara_log_field_t *f, int n, const char *key)
{
    for (int i = 0; i < n; i++) {
        if (strcmp(f[i].key, key) == 0) {
            return 1;
        }
    }
    return 0;
}

/* Adds the string-keyed string, number and boolean fields of the table at
 * idx (if it is one) to f; a key already there is skipped. Keys and string
 * values live in the table; numbers are formatted into num[n]. */
static int collect_fields(lua_State *L, int idx, osara_log_field_t *f, int n, int text,
                          char (*num)[32])
{
    if (!lua_istable(L, idx)) {
        return n;
    }
    lua_pushnil(L);
    while (n < MAX_FIELDS && lua_next(L, idx) != 0) { /* [k, v] */
        int t = lua_type(L, -1);
        const char *key = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
        if (key && !has_field(f, n, key) &&
            (t == LUA_TSTRING || t == LUA_TNUMBER || t == LUA_TBOOLEAN)) {
            f[n] = (osara_log_field_t){.key = key, .text = text, .number = t != LUA_TSTRING};
            if (t == LUA_TBOOLEAN) {
                f[n].val = lua_toboolean(L, -1) ? "true" : "false";
                f[n].len = strlen(f[n].val);
            } else if (t == LUA_TNUMBER) {
                double v = lua_tonumber(L, -1);
                int k = snprintf(num[n], sizeof(num[n]), "%.14g", v);
                f[n].number = v == v && v - v == 0; /* NaN and inf: strings */
                f[n].val = num[n];
                f[n].len = (size_t)k;
            } else {
                f[n].val = lua_tolstring(L, -1, &f[n].len);
            }
            n++;
        }
        lua_pop(L, 1);
    }
    return n;
}

/* Adds `key` = the string at idx (if it is one) to f, unless there. */
static int string_field(lua_State *L, int idx, const char *key, osara_log_field_t *f, int n)
{
    if (n < MAX_FIELDS && lua_type(L, idx) == LUA_TSTRING && !has_field(f, n, key)) {
        f[n] = (osara_log_field_t){.key = key};
        f[n].val = lua_tolstring(L, idx, &f[n].len);
        n++;
    }
    return n;
}

/* write(level, msg [, fields [, context [, where [, err]]]]): level is
 * "debug"|"info"|"warn"|"error"; fields are shown in text and JSON lines;
 * context (the running handler's topic, offset, route...), where
 * ("app.lua:12") and err only in JSON lines, where the text has them. */
static int l_log_write(lua_State *L)
{
    int level = osara_log_parse_level(luaL_checkstring(L, 1));
    if (level < 0) {
        return luaL_argerror(L, 1, "unknown level");
    }
    size_t len;
    const char *msg = luaL_checklstring(L, 2, &len);
    /* 7th argument: a named logger whose own level lets this line through
     * although the process-wide level would not (osara.log.get) */
    int forced = lua_toboolean(L, 7) && level < OSARA_LOG_OFF;
    if (!forced && !osara_log_enabled((osara_log_level_t)level)) {
        return 0;
    }
    osara_log_field_t f[MAX_FIELDS];
    char num[MAX_FIELDS][32];
    int n = collect_fields(L, 3, f, 0, 1, num);
    if (lg.format == OSARA_LOG_JSON) {
        n = string_field(L, 5, "where", f, n);
        n = string_field(L, 6, "err", f, n);
        n = collect_fields(L, 4, f, n, 0, num);
    }
    qsort(f, (size_t)n, sizeof(f[0]), field_cmp);
    format_and_enqueue((osara_log_level_t)level, msg, len, f, n);
    return 0;
}

/* enabled(level) -> boolean, so callers skip formatting */
static int l_log_enabled(lua_State *L)
{
    int level = osara_log_parse_level(luaL_checkstring(L, 1));
    lua_pushboolean(L, level >= 0 && osara_log_enabled((osara_log_level_t)level));
    return 1;
}

/* level([name]) -> current level name; sets it when name is given */
static int l_log_level(lua_State *L)
{
    static const char *names[] = {"debug", "info", "warn", "error", "off"};
    if (!lua_isnoneornil(L, 1)) {
        int level = osara_log_parse_level(luaL_checkstring(L, 1));
        if (level < 0) {
            return luaL_argerror(L, 1, "unknown level");
        }
        osara_log_set_level((osara_log_level_t)level);
    }
    lua_pushstring(L, names[osara_log_get_level()]);
    return 1;
}

int osara_log_open(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"write", l_log_write}, {"enabled", l_log_enabled},
        {"level", l_log_level}, {NULL, NULL},
    };
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
