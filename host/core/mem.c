#include "core/mem.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Writes with fprintf, not the logger: the logger may need memory itself. */
static void out_of_memory(const char *what, size_t size)
{
    fprintf(stderr, "osara: out of memory (%s of %zu bytes); aborting\n", what,
            size);
    fflush(stderr);
    abort();
}

void *osara_xmalloc(size_t size)
{
    void *p = malloc(size ? size : 1);
    if (p == NULL) {
        out_of_memory("malloc", size);
    }
    return p;
}

void *osara_xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (p == NULL) {
        out_of_memory("calloc", n * size);
    }
    return p;
}

void *osara_xrealloc(void *ptr, size_t size)
{
    void *p = realloc(ptr, size ? size : 1);
    if (p == NULL) {
        out_of_memory("realloc", size);
    }
    return p;
}

char *osara_xstrdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = osara_xmalloc(n);
    memcpy(p, s, n);
    return p;
}

void osara_uv_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)h;
    buf->base = osara_xmalloc(suggested);
    buf->len = suggested;
}
