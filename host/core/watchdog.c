#include "core/watchdog.h"

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "core/log.h"
#include "core/metrics.h"
#include "core/sched.h"

static osara_metric_t *m_stalls; /* process-wide, set once */
static uv_once_t metrics_once = UV_ONCE_INIT;

static void metrics_init(void)
{
    m_stalls = osara_metrics_counter(
        "osara_loop_stalls_total",
        "loop turns longer than the stall threshold (--loop-stall-ms)", NULL);
}

int osara_watchdog_init(osara_watchdog_t *wd, uv_loop_t *loop,
                        unsigned threshold_ms)
{
    *wd = (osara_watchdog_t){.threshold_ns = (uint64_t)threshold_ms * 1000000,
                             .schedstat_fd = -1};
    uv_once(&metrics_once, metrics_init);
    int rc = uv_loop_configure(loop, UV_METRICS_IDLE_TIME);
    if (rc == 0) {
        rc = uv_prepare_init(loop, &wd->prepare);
    }
    if (rc == 0) {
        wd->prepare.data = wd;
        uv_unref((uv_handle_t *)&wd->prepare);
    }
    return rc;
}

/* Names what ran: the entry whose Lua ran longest, when it explains at
 * least half of the stall. */
static void report(uint64_t work_ns)
{
    uint64_t lua_ns = 0;
    unsigned runs = 0;
    const char *what = osara_sched_turn_top(&lua_ns, &runs);
    unsigned long long ms = work_ns / 1000000, lua_ms = lua_ns / 1000000;
    if (what != NULL && lua_ns * 2 >= work_ns) {
        if (runs == 1) {
            OSARA_WARN("loop stall: %llu ms in %s", ms, what);
        } else {
            OSARA_WARN("loop stall: %llu ms in %s (%u runs, %llu ms)", ms, what,
                       runs, lua_ms);
        }
    } else if (what != NULL) {
        OSARA_WARN("loop stall: %llu ms in C callbacks (most Lua: %s, %u runs, "
                   "%llu ms)", ms, what, runs, lua_ms);
    } else {
        OSARA_WARN("loop stall: %llu ms in C callbacks (no Lua ran)", ms);
    }
    osara_metric_add(m_stalls, 1);
}

int osara_schedstat_open(void)
{
    return open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
}

uint64_t osara_schedstat_runqueue_wait(int fd)
{
    char buf[96];
    ssize_t n = fd >= 0 ? pread(fd, buf, sizeof(buf) - 1, 0) : -1;
    if (n <= 0) {
        return 0;
    }
    buf[n] = '\0';
    char *end;
    (void)strtoull(buf, &end, 10); /* time on a CPU */
    return strtoull(end, NULL, 10);
}

/* A turn's work less the time the thread waited for a CPU since the last
 * sample (taken at a turn's start at most 10 ms before this one's): read
 * only for a turn over the threshold, as a read costs a few microseconds. */
static uint64_t less_preemption(osara_watchdog_t *wd, uint64_t work)
{
    uint64_t rq = osara_schedstat_runqueue_wait(wd->schedstat_fd);
    uint64_t waited = rq > wd->rq_sample ? rq - wd->rq_sample : 0;
    return work > waited ? work - waited : 0;
}

/* Runs once per turn, right before libuv polls: the turn that ends here is
 * its wall time minus the time it waited in the previous poll and for a
 * CPU. */
static void on_prepare(uv_prepare_t *h)
{
    osara_watchdog_t *wd = h->data;
    uint64_t now = uv_hrtime();
    uint64_t idle = uv_metrics_idle_time(h->loop);
    if (wd->turn_start != 0 && !wd->skip && wd->threshold_ns > 0) {
        uint64_t wall = now - wd->turn_start, waited = idle - wd->idle_start;
        uint64_t work = wall > waited ? wall - waited : 0;
        if (work > wd->threshold_ns) {
            work = less_preemption(wd, work);
        }
        if (work > wd->threshold_ns) {
            report(work);
        }
    }
    if (now - wd->rq_sampled >= 10 * 1000000ull) {
        wd->rq_sample = osara_schedstat_runqueue_wait(wd->schedstat_fd);
        wd->rq_sampled = now;
    }
    wd->turn_start = now;
    wd->idle_start = idle;
    wd->skip = 0;
    osara_sched_turn_reset();
}

void osara_watchdog_start(osara_watchdog_t *wd)
{
    if (wd->threshold_ns > 0 && !wd->started) {
        wd->started = 1;
        wd->schedstat_fd = osara_schedstat_open();
        uv_prepare_start(&wd->prepare, on_prepare);
    }
}

void osara_watchdog_skip_turn(osara_watchdog_t *wd)
{
    wd->skip = 1;
}

void osara_watchdog_close(osara_watchdog_t *wd)
{
    if (wd->schedstat_fd >= 0) {
        close(wd->schedstat_fd);
        wd->schedstat_fd = -1;
    }
    if (!uv_is_closing((uv_handle_t *)&wd->prepare)) {
        uv_close((uv_handle_t *)&wd->prepare, NULL);
    }
}
