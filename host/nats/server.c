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

/* Starts nats-server as a child that dies with us (PR_SET_PDEATHSIG), so a
 * kill -9 of the host never leaves it behind. */
int osara__nats_server_start(nclient_t *c, const char *data_dir)
{
    if (access("/usr/bin/nats-server", X_OK) != 0 && access("/usr/sbin/nats-server", X_OK) != 0) {
        return osara_err_set(OSARA_ENOENT, "nats: the embedded server needs the nats-server "
                                           "binary (apt-get install nats-server)");
    }
    int port = free_port();
    char portstr[16], sd[4096];
    snprintf(portstr, sizeof(portstr), "%d", port);
    snprintf(sd, sizeof(sd), "%s/nats", data_dir);
    mkdir(data_dir, 0755);
    mkdir(sd, 0755);
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
    if (pid < 0) {
        return osara_err_set(-errno, "nats: cannot start nats-server: %s", strerror(errno));
    }
    c->server_pid = pid;
    char url[64];
    snprintf(url, sizeof(url), "nats://127.0.0.1:%d", port);
    free(c->url);
    c->url = osara_xstrdup(url);
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
