/* log.h - the host's one logger.
 *
 * Every log line of the host and of user scripts (osara.log.*) goes through
 * osara_log(). Lines are formatted on the caller's thread into a shared
 * buffer and written by a dedicated writer thread, so a slow terminal never
 * blocks the event loop; past OSARA_LOG_MAX_BUFFER bytes pending, lines are
 * dropped and counted (a note says how many). Safe to call from any thread,
 * including librdkafka and nats.c callbacks. */
#ifndef OSARA_LOG_H
#define OSARA_LOG_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
    OSARA_LOG_DEBUG = 0,
    OSARA_LOG_INFO,
    OSARA_LOG_WARN,
    OSARA_LOG_ERROR,
    OSARA_LOG_OFF,
} osara_log_level_t;

typedef enum { OSARA_LOG_TEXT = 0, OSARA_LOG_JSON } osara_log_format_t;

#define OSARA_LOG_MAX_BUFFER (4u << 20)

/* Starts the writer thread. Call once before logging (lines logged before
 * are written synchronously). */
void osara_log_init(osara_log_level_t level, osara_log_format_t format);

/* Flushes everything pending and stops the writer thread. */
void osara_log_shutdown(void);

/* Writes lines to path (appending) instead of stderr. SIGUSR1 makes the
 * writer open path again before its next line (after logrotate moved the
 * file); past max_bytes (0: never) the file is rotated to path.1 (older
 * ones shift up to path.5). Returns 0 or -errno. Call before the first
 * line is logged from another thread. */
int osara_log_set_file(const char *path, uint64_t max_bytes);

/* Parses "debug|info|warn|error|off"; returns -1 if unknown. */
int osara_log_parse_level(const char *s);
/* Parses "text|json"; returns -1 if unknown. */
int osara_log_parse_format(const char *s);

void osara_log_set_level(osara_log_level_t level);
osara_log_level_t osara_log_get_level(void);
int osara_log_enabled(osara_log_level_t level);

/* Logs one line. `msg` need not be NUL-terminated past len. */
void osara_log_write(osara_log_level_t level, const char *msg, size_t len);

/* A structured field of a log line: in JSON lines `"key":value` after
 * msg (value unquoted when `number`: a number or a boolean); in text lines
 * ` key=value` after the message when `text` is set (quoted when needed). */
typedef struct {
    const char *key;
    const char *val;
    size_t len;
    int number;
    int text;
} osara_log_field_t;

/* Logs one line with n fields (written in the order given). */
void osara_log_fields(osara_log_level_t level, const char *msg, size_t len,
                      const osara_log_field_t *fields, int n);

void osara_log(osara_log_level_t level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#define OSARA_DEBUG(...) \
    do { if (osara_log_enabled(OSARA_LOG_DEBUG)) osara_log(OSARA_LOG_DEBUG, __VA_ARGS__); } while (0)
#define OSARA_INFO(...) osara_log(OSARA_LOG_INFO, __VA_ARGS__)
#define OSARA_WARN(...) osara_log(OSARA_LOG_WARN, __VA_ARGS__)
#define OSARA_ERROR(...) osara_log(OSARA_LOG_ERROR, __VA_ARGS__)

struct lua_State;
/* Lua binding `osara.log_c`: write, enabled, level. */
int osara_log_open(struct lua_State *L);

#endif
