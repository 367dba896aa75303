#include "core/err.h"

#include <stdarg.h>
#include <stdio.h>

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
