/* server.c - the embedded nats-server child (servers = "embedded"). */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/err.h"
#include "core/mem.h"
#include "core/log.h"
#include "nats/natsio_int.h"

/* Reaping: the child is polled (never waited for on the loop); SIGKILL
 * after this long. */
#define STOP_POLL_MS 20
#define STOP_KILL_AFTER_MS 5000

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    int port = -1;
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0) {
        port = ntohs(a.sin_port);
    }
    if (fd >= 0) {
        close(fd);
    }
    return port;
}

/* Forks nats-server on port with its JetStream store in sd, as a child
 * that dies with us (PR_SET_PDEATHSIG), so a kill -9 of the host never
 * leaves it behind. Returns its pid, or -1 (errno). */
static pid_t spawn_server(int port, const char *sd)
{
    char portstr[16];
    snprintf(portstr, sizeof(portstr), "%d", port);
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        int devnull = open("/dev/null", 0);
        dup2(devnull, 1);
        dup2(devnull, 2);
        execlp("nats-server", "nats-server", "-a", "127.0.0.1", "-p", portstr, "-js", "-sd", sd,
               (char *)NULL);
        _exit(127);
    }
    return pid;
}

/* ---- watching the child ------------------------------------------------------ *
 * A timer reaps the child when it dies (no zombie), logs it, and starts it
 * again on the same port and store after a backoff (0.1 s doubling to 5 s;
 * back to 0.1 s once it ran 30 s); nats.c reconnects to it by itself. The
 * gauge osara_nats_embedded_server_up is 0 meanwhile. */

#define WATCH_MS 100
#define RESTART_MIN_MS 100
#define RESTART_MAX_MS 5000
#define STABLE_MS 30000

struct nserver_watch_s {
    uv_timer_t timer;
    nclient_t *c;         /* valid until the watch is closed */
    int port;
    char sd[4096];
    uint64_t started_at;  /* loop ms of the last start */
    uint64_t restart_at;  /* loop ms of the next start, while server_pid == 0 */
    uint64_t backoff_ms;
    int restarts;
};

static osara_metric_t *server_up;
static uv_once_t server_up_once = UV_ONCE_INIT;

static void server_up_create(void)
{
    server_up = osara_metrics_gauge("osara_nats_embedded_server_up",
                                    "1 while the embedded nats-server runs", NULL);
}

static void log_exit(pid_t pid, int status, double delay_s)
{
    if (WIFSIGNALED(status)) {
        OSARA_WARN("nats: the embedded server (pid %d) was killed by signal %d; restarting it "
                   "in %.1f s", (int)pid, WTERMSIG(status), delay_s);
    } else {
        OSARA_WARN("nats: the embedded server (pid %d) exited with status %d; restarting it "
                   "in %.1f s", (int)pid, WEXITSTATUS(status), delay_s);
    }
}

static void watch_restart(struct nserver_watch_s *ws, uint64_t now)
{
    pid_t pid = spawn_server(ws->port, ws->sd);
    if (pid < 0) {
        OSARA_ERROR("nats: cannot restart the embedded server: %s", strerror(errno));
        ws->restart_at = now + ws->backoff_ms;
        return;
    }
    ws->c->server_pid = pid;
    ws->started_at = now;
    ws->restarts++;
    osara_metric_set(server_up, 1);
    OSARA_INFO("nats: embedded server restarted (pid %d, restart %d) at %s", (int)pid,
               ws->restarts, ws->c->url);
}

static void on_watch(uv_timer_t *t)
{
    struct nserver_watch_s *ws = t->data;
    nclient_t *c = ws->c;
    uint64_t now = uv_now(t->loop);
    if (c->server_pid == 0) {
        if (now >= ws->restart_at) {
            watch_restart(ws, now);
        }
        return;
    }
    int status = 0;
    if (waitpid(c->server_pid, &status, WNOHANG) != c->server_pid) {
        return;
    }
    if (now - ws->started_at >= STABLE_MS) {
        ws->backoff_ms = RESTART_MIN_MS;
    }
    log_exit(c->server_pid, status, (double)ws->backoff_ms / 1000);
    osara_metric_set(server_up, 0);
    c->server_pid = 0;
    ws->restart_at = now + ws->backoff_ms;
    ws->backoff_ms = ws->backoff_ms * 2 > RESTART_MAX_MS ? RESTART_MAX_MS : ws->backoff_ms * 2;
}

static void watch_start(nclient_t *c, int port, const char *sd)
{
    uv_once(&server_up_once, server_up_create);
    struct nserver_watch_s *ws = osara_xcalloc(1, sizeof(*ws));
    ws->c = c;
    ws->port = port;
    snprintf(ws->sd, sizeof(ws->sd), "%s", sd);
    ws->backoff_ms = RESTART_MIN_MS;
    uv_timer_init(&c->w->loop, &ws->timer);
    ws->timer.data = ws;
    ws->started_at = uv_now(&c->w->loop);
    uv_timer_start(&ws->timer, on_watch, WATCH_MS, WATCH_MS);
    c->server_watch = ws;
    osara_metric_set(server_up, 1);
}

static void on_watch_closed(uv_handle_t *h)
{
    free(h->data);
}

static void watch_stop(nclient_t *c)
{
    if (c->server_watch) {
        uv_close((uv_handle_t *)&c->server_watch->timer, on_watch_closed);
        c->server_watch = NULL;
    }
}

int osara__nats_server_start(nclient_t *c, const char *data_dir)
{
    if (access("/usr/bin/nats-server", X_OK) != 0 && access("/usr/sbin/nats-server", X_OK) != 0) {
        return osara_err_set(OSARA_ENOENT, "nats: the embedded server needs the nats-server "
                                           "binary (apt-get install nats-server)");
    }
    int port = free_port();
    char sd[4096];
    snprintf(sd, sizeof(sd), "%s/nats", data_dir);
    mkdir(data_dir, 0755);
    mkdir(sd, 0755);
    pid_t pid = spawn_server(port, sd);
    if (pid < 0) {
        return osara_err_set(-errno, "nats: cannot start nats-server: %s", strerror(errno));
    }
    c->server_pid = pid;
    char url[64];
    snprintf(url, sizeof(url), "nats://127.0.0.1:%d", port);
    free(c->url);
    c->url = osara_xstrdup(url);
    watch_start(c, port, sd);
    return 0;
}

typedef struct {
    uv_timer_t timer;
    pid_t pid;
    int waited_ms;
} nserver_stop_t;

static void on_stop_closed(uv_handle_t *h)
{
    free(h->data);
}

static void on_stop_poll(uv_timer_t *t)
{
    nserver_stop_t *st = t->data;
    pid_t r = waitpid(st->pid, NULL, WNOHANG);
    if (r == st->pid || (r < 0 && errno == ECHILD)) {
        uv_close((uv_handle_t *)t, on_stop_closed);
        return;
    }
    st->waited_ms += STOP_POLL_MS;
    if (st->waited_ms == STOP_KILL_AFTER_MS) {
        OSARA_WARN("nats: the embedded server (pid %d) ignored SIGTERM; killing it", (int)st->pid);
        kill(st->pid, SIGKILL);
    }
}

/* Sends SIGTERM and reaps the child from a timer: the loop (and so the
 * host's exit) waits for it without blocking, so a restart never finds the
 * JetStream store still held. */
void osara__nats_server_stop(nclient_t *c)
{
    watch_stop(c);
    if (c->server_pid <= 0) {
        return;
    }
    kill(c->server_pid, SIGTERM);
    nserver_stop_t *st = osara_xcalloc(1, sizeof(*st));
    st->pid = c->server_pid;
    c->server_pid = 0;
    uv_timer_init(&c->w->loop, &st->timer);
    st->timer.data = st;
    uv_timer_start(&st->timer, on_stop_poll, STOP_POLL_MS, STOP_POLL_MS);
}
