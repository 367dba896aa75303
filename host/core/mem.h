/* mem.h - the one out-of-memory policy.
 *
 * osara_x* allocate like their libc namesakes but never return NULL: on
 * failure they log one line naming the size and abort(). This is Redis's
 * zmalloc policy (zmalloc_oom_handler): on Linux, with overcommit, malloc
 * failing means the process is already beyond rescue, and every "if (p ==
 * NULL)" branch would be an untested path that leaves state half-built.
 * Callers therefore never check the result. Allocations whose size comes
 * from untrusted input (a message, a request body) are bounded before they
 * get here, not recovered after. */
#ifndef OSARA_MEM_H
#define OSARA_MEM_H

#include <stddef.h>
#include <uv.h>

void *osara_xmalloc(size_t size);
void *osara_xcalloc(size_t n, size_t size);
void *osara_xrealloc(void *ptr, size_t size);
char *osara_xstrdup(const char *s);

/* libuv's alloc callback for uv_read_start: a fresh buffer of the suggested
 * size under this policy; the read callback frees buf->base. */
void osara_uv_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf);

#endif
