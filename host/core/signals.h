/* signals.h - SIGINT and SIGTERM for the whole process.
 *
 * The first signal asks every watching worker to stop gracefully: the
 * handler only wakes each worker's uv_async_t (async-signal-safe), and the
 * worker stops on its loop thread. The second signal exits at once with
 * status 130 from the handler itself, whatever the loops are doing: a Lua
 * handler stuck in an endless loop cannot hold the process. (libuv's
 * uv_signal_t would deliver both through the loop, which such a handler
 * never gives back.) SIGHUP stays a uv_signal_t of the worker. */
#ifndef OSARA_SIGNALS_H
#define OSARA_SIGNALS_H

#include <uv.h>

/* Installs the handlers (once per process) and wakes `stop` on the first
 * SIGINT/SIGTERM. Up to OSARA_SIGNALS_MAX watchers. Returns 0 or a negative
 * errno. Loop thread of the watcher. */
#define OSARA_SIGNALS_MAX 64
int osara_signals_watch(uv_async_t *stop);

/* Stops waking `stop` (before it is closed). */
void osara_signals_unwatch(uv_async_t *stop);

/* Installs handler for signum (SA_RESTART, nothing blocked). Returns 0 or
 * a negative errno. */
int osara_signals_install(int signum, void (*handler)(int));

/* The signal that asked for the stop (SIGINT or SIGTERM), 0 before. */
int osara_signals_received(void);

#endif
