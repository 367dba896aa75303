#include "core/signals.h"

#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

/* Process-wide by nature: a signal is the process's, not a worker's. */
static _Atomic(uv_async_t *) watchers[OSARA_SIGNALS_MAX];
static atomic_int seen;
static atomic_int first_signum;
static atomic_flag installed = ATOMIC_FLAG_INIT;

static void on_stop_signal(int signum)
{
    int saved = errno;
    if (atomic_fetch_add(&seen, 1) > 0) {
        static const char msg[] = "osara: second signal: exiting now\n";
        ssize_t rc = write(STDERR_FILENO, msg, sizeof(msg) - 1);
        (void)rc; /* nowhere to report it */
        _exit(130);
    }
    atomic_store(&first_signum, signum);
    for (int i = 0; i < OSARA_SIGNALS_MAX; i++) {
        uv_async_t *stop = atomic_load(&watchers[i]);
        if (stop != NULL) {
            uv_async_send(stop); /* async-signal-safe (libuv docs) */
        }
    }
    errno = saved;
}

int osara_signals_install(int signum, void (*handler)(int))
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = handler;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    return sigaction(signum, &sa, NULL) == 0 ? 0 : -errno;
}

static int install(void)
{
    int rc = osara_signals_install(SIGINT, on_stop_signal);
    return rc == 0 ? osara_signals_install(SIGTERM, on_stop_signal) : rc;
}

int osara_signals_watch(uv_async_t *stop)
{
    if (!atomic_flag_test_and_set(&installed)) {
        int rc = install();
        if (rc != 0) {
            atomic_flag_clear(&installed);
            return rc;
        }
    }
    for (int i = 0; i < OSARA_SIGNALS_MAX; i++) {
        uv_async_t *none = NULL;
        if (atomic_compare_exchange_strong(&watchers[i], &none, stop)) {
            return 0;
        }
    }
    return -ENOSPC;
}

void osara_signals_unwatch(uv_async_t *stop)
{
    for (int i = 0; i < OSARA_SIGNALS_MAX; i++) {
        uv_async_t *mine = stop;
        atomic_compare_exchange_strong(&watchers[i], &mine, NULL);
    }
}

int osara_signals_received(void)
{
    return atomic_load(&first_signum);
}
