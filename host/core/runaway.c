#include "core/runaway.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "core/err.h"
#include "core/log.h"
#include "core/mem.h"
#include "core/signals.h"
#include "core/watchdog.h"

/* How often the guard looks (its reaction time past a timeout). */
#define CHECK_EVERY_NS (50u * 1000000u)

struct osara_runaway_s {
    uv_thread_t thread;
    uv_mutex_t mu;
    uv_cond_t cond;
    int stop;
    pthread_t loop_thread;
    int schedstat_fd;               /* the loop thread's, or -1 */
    osara_runaway_interrupt_fn interrupt;
    /* Published by the loop thread for the guard thread. */
    atomic_uint gen;                /* runs begun */
    atomic_ullong deadline;         /* when the run becomes runaway; 0: none */
    atomic_ullong timeout;          /* the run's timeout */
    /* Set by the guard; read by the signal handler on the loop thread. */
    atomic_uint target;             /* the run to interrupt */
    atomic_uint delivered;          /* interrupts the hook raised */
    char label[128];                /* what the signal interrupted */
    atomic_uint label_gen;          /* run the label is for */
};

/* The guard of this loop thread (read by the signal handler). */
static _Thread_local osara_runaway_t *guard;
static pthread_once_t installed = PTHREAD_ONCE_INIT;
static int install_rc;

static int interrupt_signal(void)
{
    return SIGRTMIN + 4; /* glibc keeps the lowest ones for itself */
}

/* On the loop thread: interrupts the run the guard picked, if it still
 * runs (a run that ended meanwhile has no deadline or a newer gen). */
static void on_interrupt_signal(int signum)
{
    (void)signum;
    int saved = errno;
    osara_runaway_t *g = guard;
    unsigned gen = g ? atomic_load(&g->gen) : 0;
    if (g && atomic_load(&g->deadline) != 0 && gen == atomic_load(&g->target)) {
        const char *what = g->interrupt();
        if (what != NULL) {
            size_t n = 0;
            while (what[n] && n < sizeof(g->label) - 1) {
                g->label[n] = what[n];
                n++;
            }
            g->label[n] = '\0';
            atomic_store_explicit(&g->label_gen, gen, memory_order_release);
        }
    }
    errno = saved;
}

static void install(void)
{
    install_rc = osara_signals_install(interrupt_signal(), on_interrupt_signal);
}

/* The guard thread's view of the run it watches. */
typedef struct {
    unsigned gen;
    uint64_t rq_seen;   /* the loop thread's run-queue wait when first seen */
    int signalled;
    unsigned delivered; /* g->delivered when it signalled */
    uint64_t next;      /* when to signal again */
    int stuck;          /* reported */
} watch_t;

static void report_stuck(osara_runaway_t *g, unsigned gen, uint64_t now)
{
    const char *what = "a Lua run";
    if (atomic_load_explicit(&g->label_gen, memory_order_acquire) == gen) {
        what = g->label;
    }
    uint64_t started = atomic_load(&g->deadline) - atomic_load(&g->timeout);
    OSARA_ERROR("runaway: %s has run %.1f s without yielding and did not stop "
                "at the interrupt (LuaJIT checks no hook inside a compiled "
                "loop); the worker is stuck: stop the host (a second SIGTERM "
                "exits at once)",
                what, (double)(now - started) / 1e9);
}

/* Signals a run past its deadline, again every timeout while it runs;
 * reports it stuck when an interrupt was not delivered meanwhile. The
 * time the loop thread waited for a CPU since the guard first saw the run
 * does not count: on a loaded machine a run of 1 s of work can take 6 s. */
static void check(osara_runaway_t *g, watch_t *w)
{
    uint64_t deadline = atomic_load(&g->deadline), now = uv_hrtime();
    unsigned gen = atomic_load(&g->gen);
    if (deadline == 0) {
        return;
    }
    if (gen != w->gen) {
        *w = (watch_t){.gen = gen,
                       .rq_seen = osara_schedstat_runqueue_wait(g->schedstat_fd)};
    }
    if (now < deadline || (w->signalled && now < w->next)) {
        return;
    }
    uint64_t rq = osara_schedstat_runqueue_wait(g->schedstat_fd);
    if (!w->signalled && now < deadline + (rq > w->rq_seen ? rq - w->rq_seen : 0)) {
        return;
    }
    if (w->signalled && atomic_load(&g->delivered) == w->delivered && !w->stuck) {
        w->stuck = 1;
        report_stuck(g, gen, now);
    }
    w->signalled = 1;
    w->delivered = atomic_load(&g->delivered);
    w->next = now + atomic_load(&g->timeout);
    atomic_store(&g->target, gen);
    pthread_kill(g->loop_thread, interrupt_signal());
}

static void guard_main(void *arg)
{
    osara_runaway_t *g = arg;
    watch_t w = {0};
    uv_mutex_lock(&g->mu);
    while (!g->stop) {
        (void)uv_cond_timedwait(&g->cond, &g->mu, CHECK_EVERY_NS); /* timeouts expected */
        if (!g->stop) {
            check(g, &w);
        }
    }
    uv_mutex_unlock(&g->mu);
}

osara_runaway_t *osara_runaway_start(osara_runaway_interrupt_fn interrupt)
{
    pthread_once(&installed, install);
    if (install_rc != 0) {
        osara_err_set(install_rc, "cannot install the runaway signal: %s",
                      strerror(-install_rc));
        return NULL;
    }
    osara_runaway_t *g = osara_xcalloc(1, sizeof(*g));
    g->loop_thread = pthread_self();
    g->schedstat_fd = osara_schedstat_open(); /* this (the loop) thread's */
    g->interrupt = interrupt;
    int rc = uv_mutex_init(&g->mu);
    if (rc == 0 && (rc = uv_cond_init(&g->cond)) != 0) {
        uv_mutex_destroy(&g->mu);
    }
    if (rc == 0 && (rc = uv_thread_create(&g->thread, guard_main, g)) != 0) {
        uv_cond_destroy(&g->cond);
        uv_mutex_destroy(&g->mu);
    }
    if (rc != 0) {
        if (g->schedstat_fd >= 0) {
            close(g->schedstat_fd);
        }
        free(g);
        osara_err_set(rc, "cannot start the runaway guard: %s", uv_strerror(rc));
        return NULL;
    }
    guard = g;
    return g;
}

void osara_runaway_stop(osara_runaway_t *g)
{
    if (guard == g) {
        guard = NULL;
    }
    uv_mutex_lock(&g->mu);
    g->stop = 1;
    uv_cond_signal(&g->cond);
    uv_mutex_unlock(&g->mu);
    uv_thread_join(&g->thread);
    uv_cond_destroy(&g->cond);
    uv_mutex_destroy(&g->mu);
    if (g->schedstat_fd >= 0) {
        close(g->schedstat_fd);
    }
    free(g);
}

void osara_runaway_enter(uint64_t now_ns, uint64_t timeout_ns)
{
    osara_runaway_t *g = guard;
    if (g == NULL || timeout_ns == 0) {
        return;
    }
    atomic_fetch_add(&g->gen, 1);
    atomic_store(&g->timeout, timeout_ns);
    atomic_store(&g->deadline, now_ns + timeout_ns);
}

void osara_runaway_leave(void)
{
    osara_runaway_t *g = guard;
    if (g != NULL) {
        atomic_store(&g->deadline, 0);
    }
}

void osara_runaway_delivered(void)
{
    osara_runaway_t *g = guard;
    if (g != NULL) {
        atomic_fetch_add(&g->delivered, 1);
    }
}
