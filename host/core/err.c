#include "core/err.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <uv.h>

#include "core/log.h"

static _Thread_local char err_buf[1024];

int osara_err_set(int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_buf, sizeof(err_buf), fmt, ap);
    va_end(ap);
    return rc;
}

const char *osara_err_msg(void)
{
    return err_buf;
}

void osara__uv_must(int rc, const char *call, const char *file, int line)
{
    if (rc != 0) {
        OSARA_ERROR("%s:%d: %s failed: %s (a bug: it cannot fail as called)",
                    file, line, call, uv_strerror(rc));
        osara_log_shutdown();
        abort();
    }
}
