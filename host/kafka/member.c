/* member.c - a group member's trace in the data folder, so a restart after
 * a crash (kill -9) can say why its partitions do not come at once.
 *
 * Each group consumer writes <data>/kafka-members/<group>.<pid>.<n> when it
 * starts and removes it when it closes cleanly (having left the group). A
 * file whose process is gone is a member the broker still counts until its
 * session expires: the next start logs that wait once and removes it. */

#include <dirent.h>
#include <stdint.h>
#include <errno.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/log.h"
#include "kafka/kafka_int.h"

/* The consumer's value of a librdkafka property (its default if unset). */
static void consumer_conf_get(kclient_t *c, const char *name, char *buf, size_t cap)
{
    size_t size = cap;
    if (rd_kafka_conf_get(rd_kafka_conf(c->consumer), name, buf, &size) != RD_KAFKA_CONF_OK) {
        buf[0] = '\0';
    }
}

/* "<group>." followed by a dead process's pid: a member that did not leave. */
static int stale_pid(const char *name, const char *group)
{
    size_t n = strlen(group);
    if (strncmp(name, group, n) != 0 || name[n] != '.') {
        return 0;
    }
    long pid = strtol(name + n + 1, NULL, 10);
    if (pid <= 0 || pid == (long)getpid()) {
        return 0;
    }
    return kill((pid_t)pid, 0) != 0 && errno == ESRCH ? (int)pid : 0;
}

static void log_wait(kclient_t *c, int pid)
{
    char session[32], instance[256];
    consumer_conf_get(c, "session.timeout.ms", session, sizeof(session));
    consumer_conf_get(c, "group.instance.id", instance, sizeof(instance));
    double secs = atof(session) / 1000;
    if (instance[0]) {
        OSARA_INFO("kafka: group %s: the previous run (pid %d) stopped without leaving; static "
                   "member %s takes its partitions back at once on Kafka >= 2.3 (osara broker "
                   "has no static membership: waiting for the previous member's session to "
                   "expire (%.0f s))", c->group, pid, instance, secs);
    } else {
        OSARA_INFO("kafka: group %s: the previous run (pid %d) stopped without leaving: "
                   "waiting for the previous member's session to expire (%.0f s, "
                   "session.timeout.ms)", c->group, pid, secs);
    }
}

void osara__kafka_member_join(kclient_t *c)
{
    char dir[4096];
    if (c->embedded || c->group == NULL || strchr(c->group, '/') || c->w->data_dir == NULL) {
        return; /* no group join, or nowhere to remember it */
    }
    snprintf(dir, sizeof(dir), "%s/kafka-members", c->w->data_dir);
    mkdir(dir, 0755);
    DIR *d = opendir(dir);
    int logged = 0;
    for (struct dirent *e = d ? readdir(d) : NULL; e; e = readdir(d)) {
        int pid = stale_pid(e->d_name, c->group);
        if (pid && !logged++) {
            log_wait(c, pid);
        }
        if (pid) {
            unlinkat(dirfd(d), e->d_name, 0);
        }
    }
    if (d) {
        closedir(d);
    }
    c->member_file = osara_xmalloc(strlen(dir) + strlen(c->group) + 48);
    sprintf(c->member_file, "%s/%s.%ld.%lx", dir, c->group, (long)getpid(), (unsigned long)(uintptr_t)c);
    FILE *f = fopen(c->member_file, "w");
    if (f) {
        fclose(f);
    }
}

void osara__kafka_member_left(kclient_t *c)
{
    if (c->member_file) {
        unlink(c->member_file);
        free(c->member_file);
        c->member_file = NULL;
    }
}
