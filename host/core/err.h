/* err.h - the one place an error's detail is recorded (Tarantool's diag_set).
 *
 * C functions return 0 or a negative OSARA_E* / -errno and record the
 * human-readable detail once, where the error starts. Callers that decide
 * what to do with the failure (main.c, the Lua bindings) read it back. */
#ifndef OSARA_ERR_H
#define OSARA_ERR_H

enum {
    OSARA_EINVAL = -1000, /* bad argument or configuration */
    OSARA_ESCRIPT,        /* user script failed to load or run */
    OSARA_ETIMEOUT,       /* a bounded wait ran out */
    OSARA_ENOENT,         /* file or resource missing */
    OSARA_ECLOSED,        /* target already closed / not accepting */
    OSARA_EBROKER,        /* broker client error */
};

/* Records a formatted message for the current thread; always returns rc so
 * that `return osara_err_set(OSARA_EINVAL, "...")` reads naturally. */
int osara_err_set(int rc, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* For libuv calls that cannot fail as osara makes them (initialising a
 * timer or a pipe, starting a timer that is not closing, reading a pipe
 * uv_spawn just opened): a failure is a bug, and like the out-of-memory
 * policy (mem.h) it is logged with the call and its place, then abort()s,
 * instead of an untested branch that leaves state half-built. */
#define OSARA_UV_MUST(call) osara__uv_must((call), #call, __FILE__, __LINE__)
void osara__uv_must(int rc, const char *call, const char *file, int line);

/* The last message recorded on this thread ("" if none). Borrowed pointer,
 * valid until the next osara_err_set on the same thread. */
const char *osara_err_msg(void);

#endif
