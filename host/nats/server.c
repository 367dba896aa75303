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
#include "nats/natsio_int.h"
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
    c->url = strdup(url);
    return 0;
}

void osara__nats_server_stop(nclient_t *c)
{
    if (c->server_pid > 0) {
        kill(c->server_pid, SIGTERM);
        waitpid(c->server_pid, NULL, 0);
        c->server_pid = 0;
    }
}
