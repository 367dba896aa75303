/* embedded.h - the Lua half of the API, compiled to bytecode at build time
 * (luajit -b) by CMake into embedded.c. Terminated by a NULL name. */
#ifndef OSARA_EMBEDDED_H
#define OSARA_EMBEDDED_H

#include <stddef.h>

typedef struct {
    const char *name;   /* module name: "osara", "osara.kafka" */
    const char *file;   /* "osara/kafka.lua": chunk name and dev path */
    const unsigned char *bytes;
    size_t size;
} osara_embedded_t;

extern const osara_embedded_t osara_embedded[];

#endif
