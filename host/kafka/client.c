/* client.c - a Kafka client: configuration, create, close. */

#include <errno.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "core/err.h"
#include "core/log.h"
#include "kafka/kafka_int.h"

struct osara__kafka_metrics_s osara__kafka_metrics;

void osara__kafka_metrics_init(void)
{
    if (osara__kafka_metrics.consumed) {
        return;
    }
    osara__kafka_metrics.consumed = osara_metrics_counter("osara_kafka_consumed_total", "messages consumed", NULL);
    osara__kafka_metrics.handled = osara_metrics_counter("osara_kafka_handled_total", "handler calls finished", NULL);
    osara__kafka_metrics.failed = osara_metrics_counter("osara_kafka_failed_total", "handler calls that raised or were cancelled", NULL);
    osara__kafka_metrics.produced = osara_metrics_counter("osara_kafka_produced_total", "messages produced", NULL);
    osara__kafka_metrics.delivery_errors = osara_metrics_counter("osara_kafka_delivery_errors_total", "produced messages that failed", NULL);
    osara__kafka_metrics.paused = osara_metrics_gauge("osara_kafka_paused_partitions", "partitions paused by backpressure", NULL);
    osara__kafka_metrics.stuck = osara_metrics_gauge("osara_kafka_stuck_partitions",
                                  "partitions waiting for a failed or cancelled input to be handled again", NULL);
}

/* ---- client lifecycle --------------------------------------------------- */

static void on_error(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    (void)rk;
    kclient_t *c = opaque;
    osara__kafka_log_error(c, (rd_kafka_resp_err_t)err, reason);
}

void osara__kafka_on_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void)rk;
    /* librdkafka repeats connection failures on every retry; errors reach
     * the user once per change through on_error, the rest is debug. */
    osara_log_level_t l = level <= 2 ? OSARA_LOG_ERROR : OSARA_LOG_DEBUG;
    osara_log(l, "librdkafka %s: %s", fac, buf);
}

void osara__kafka_handle_free(uv_handle_t *h)
{
    free(h);
}

static int watch_queue(kclient_t *c, rd_kafka_queue_t *q, int *fd, uv_poll_t **poll,
                       uv_poll_cb cb)
{
    *fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (*fd < 0) {
        return osara_err_set(-errno, "eventfd: %s", strerror(errno));
    }
    *poll = osara_xmalloc(sizeof(**poll));
    int rc = uv_poll_init(&c->w->loop, *poll, *fd);
    if (rc != 0) {
        free(*poll);
        *poll = NULL;
        close(*fd);
        *fd = -1;
        return osara_err_set(rc, "kafka: cannot watch a queue: %s", uv_strerror(rc));
    }
    (*poll)->data = c;
    uv_poll_start(*poll, UV_READABLE, cb); /* cannot fail on an initialised poll */
    static const uint64_t one = 1;
    rd_kafka_queue_io_event_enable(q, *fd, &one, sizeof(one));
    /* librdkafka writes only when the queue turns non-empty: what its
     * threads queued before this (a refused connection's error, at once)
     * would never wake the loop. Wake it once now. */
    osara__kafka_wakeup_set(*fd);
    return 0;
}

void osara__kafka_wakeup_set(int fd)
{
    static const uint64_t one = 1;
    if (write(fd, &one, sizeof(one)) < 0) {
        OSARA_DEBUG("kafka: wake-up write failed: %s", strerror(errno));
    }
}

void osara__kafka_wakeup_clear(int fd)
{
    uint64_t v;
    if (read(fd, &v, sizeof(v)) < 0 && errno != EAGAIN) {
        OSARA_DEBUG("kafka: wake-up read failed: %s", strerror(errno));
    }
}

/* Stops librdkafka writing to fd before it is closed (the number could be
 * reused), then closes the poll. */
static void unwatch_queue(rd_kafka_queue_t *q, int *fd, uv_poll_t **poll)
{
    if (*poll == NULL) {
        return;
    }
    rd_kafka_queue_io_event_enable(q, -1, NULL, 0);
    uv_close((uv_handle_t *)*poll, osara__kafka_handle_free);
    close(*fd);
    *poll = NULL;
    *fd = -1;
}

static int has_conf(kclient_t *c, const char *k)
{
    for (int i = 0; i < c->nconf; i++) {
        if (strcmp(c->conf[2 * i], k) == 0) {
            return 1;
        }
    }
    return 0;
}

static int is_consumer_property(const char *k)
{
    static const char *prefixes[] = {
        "group.", "enable.auto.", "auto.", "queued.", "fetch.", "enable.partition.eof",
        "partition.assignment.strategy", "session.timeout.ms", "heartbeat.interval.ms",
        "max.poll.interval.ms", "isolation.level", "check.crcs", "consume.",
        "coordinator.query.interval.ms", "max.partition.fetch.bytes", NULL,
    };
    for (int i = 0; prefixes[i]; i++) {
        if (strncmp(k, prefixes[i], strlen(prefixes[i])) == 0) {
            return 1;
        }
    }
    return 0;
}

static int conf_set(rd_kafka_conf_t *conf, const char *k, const char *v, char *errstr,
                    size_t cap)
{
    return rd_kafka_conf_set(conf, k, v, errstr, cap) == RD_KAFKA_CONF_OK ? 0 : -1;
}

/* The result of a commit (auto, or the one on revoke), served on the
 * loop: failures are logged once per change. */
static void on_commit(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                      rd_kafka_topic_partition_list_t *offsets, void *opaque)
{
    (void)rk;
    (void)offsets;
    if (err && err != RD_KAFKA_RESP_ERR__NO_OFFSET) {
        char what[256];
        /* the mock coordinator refuses commits once a rebalance started */
        snprintf(what, sizeof(what), "commit failed: %s (what finished since the last "
                 "commit is handled again by the next owner)", rd_kafka_err2str(err));
        osara__kafka_log_error(opaque, err, what);
    }
}

/* The consumer's own settings on top of the user's. */
static int consumer_conf(kclient_t *c, rd_kafka_conf_t *conf, char *errstr, size_t cap)
{
    int rc = conf_set(conf, "enable.auto.offset.store", "false", errstr, cap);
    if (rc == 0 && c->embedded && !has_conf(c, "fetch.wait.max.ms")) {
        /* The mock broker holds every fetch for the full wait. */
        rc = conf_set(conf, "fetch.wait.max.ms", "5", errstr, cap);
    }
    if (rc == 0 && c->embedded && !has_conf(c, "fetch.error.backoff.ms")) {
        /* First fetches race topic creation; retry fast, not in 500 ms. */
        rc = conf_set(conf, "fetch.error.backoff.ms", "10", errstr, cap);
    }
    rd_kafka_conf_set_offset_commit_cb(conf, on_commit);
    if (!c->embedded) {
        rd_kafka_conf_set_rebalance_cb(conf, osara__kafka_on_rebalance);
    }
    return rc;
}

/* The string value after `"name":"` at or after *at (advances *at past
 * it), copied into out; 0 when there is none. */
static int json_next_string(const char **at, const char *name, char *out, size_t cap)
{
    const char *p = strstr(*at, name);
    if (p == NULL) {
        return 0;
    }
    p += strlen(name);
    size_t n = strcspn(p, "\"");
    snprintf(out, cap, "%.*s", (int)(n < cap ? n : cap - 1), p);
    *at = p + n;
    return 1;
}

void osara__kafka_on_stats(kclient_t *c, const char *json)
{
    /* Each broker object has "source" (configured, learned, internal,
     * logical) just before "state"; only real brokers count. */
    int up = 0;
    char source[32], state[32];
    const char *at = json;
    while (json_next_string(&at, "\"source\":\"", source, sizeof(source)) &&
           json_next_string(&at, "\"state\":\"", state, sizeof(state))) {
        int real = strcmp(source, "configured") == 0 || strcmp(source, "learned") == 0;
        up += real && strcmp(state, "UP") == 0;
    }
    c->brokers_up = up;
    c->stats_seen = 1;
    if (up > 0 && c->all_down) {
        c->all_down = 0;
        c->last_error = 0; /* the next failure is a change: logged again */
        OSARA_INFO("kafka %s: connected again (%d broker(s) up)", c->bootstrap, up);
    }
}

static int on_stats(rd_kafka_t *rk, char *json, size_t len, void *opaque)
{
    (void)rk;
    (void)len;
    kclient_t *c = opaque;
    if (!c->closing) { /* closing: served on the pool by the final flush */
        osara__kafka_on_stats(c, json);
    }
    return 0;
}

/* The producer's own settings; the embedded cluster starts with it. */
static int producer_conf(kclient_t *c, rd_kafka_conf_t *conf, char *errstr, size_t cap)
{
    int rc = 0;
    rd_kafka_conf_set_dr_msg_cb(conf, osara__kafka_on_delivery);
    /* Statistics tell readiness which brokers are up (once a second). */
    rd_kafka_conf_set_stats_cb(conf, on_stats);
    if (!has_conf(c, "statistics.interval.ms")) {
        rc = conf_set(conf, "statistics.interval.ms", "1000", errstr, cap);
    }
    if (rc == 0 && c->embedded) {
        char n[16];
        snprintf(n, sizeof(n), "%d", c->embedded);
        rc = conf_set(conf, "test.mock.num.brokers", n, errstr, cap);
        /* Sticky partitioning fills one mock partition (~5 MiB each) first. */
        if (rc == 0) {
            rc = conf_set(conf, "sticky.partitioning.linger.ms", "0", errstr, cap);
        }
    }
    return rc;
}

static rd_kafka_conf_t *build_conf(kclient_t *c, int consumer, char *errstr, size_t cap)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    int rc = 0;
    for (int i = 0; rc == 0 && i < c->nconf; i++) {
        const char *k = c->conf[2 * i], *v = c->conf[2 * i + 1];
        if (consumer || !is_consumer_property(k)) { /* keep the producer from warning */
            rc = conf_set(conf, k, v, errstr, cap);
        }
    }
    if (rc == 0) {
        rc = conf_set(conf, "bootstrap.servers", c->bootstrap, errstr, cap);
    }
    if (rc == 0) {
        rc = consumer ? consumer_conf(c, conf, errstr, cap) : producer_conf(c, conf, errstr, cap);
    }
    if (rc != 0) {
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    rd_kafka_conf_set_opaque(conf, c);
    rd_kafka_conf_set_error_cb(conf, on_error);
    rd_kafka_conf_set_log_cb(conf, osara__kafka_on_log);
    return conf;
}

/* ---- closing, off the loop thread ---------------------------------------- */

static void client_free(kclient_t *c)
{
    osara__kafka_free_parts(c); /* none left when a consumer closed them */
    free(c->buckets);
    while (c->free_outs) {
        kout_t *o = c->free_outs;
        c->free_outs = o->next_free;
        free(o);
    }
    while (c->free_inputs) {
        kinput_t *kin = c->free_inputs;
        c->free_inputs = kin->next_free;
        free(kin);
    }
    for (int i = 0; i < 2 * c->nconf; i++) {
        free(c->conf[i]);
    }
    free(c->conf);
    free(c->group);
    free(c->member_file);
    free(c->cluster_id);
    free(c->bootstrap);
    free(c->key);
    free(c);
}

/* A thread of libuv's pool: everything that may wait - the last delivery
 * reports (up to 10 s), the group's final commit and leave, librdkafka's
 * threads ending. Nothing else touches c meanwhile: its libuv handles are
 * closed, no VM holds it, no job runs. */
static void close_work(uv_work_t *req)
{
    kclient_t *c = req->data;
    if (c->producer) {
        /* Delivery reports advance the offsets of finished inputs. */
        rd_kafka_flush(c->producer, 10000);
    }
    c->inputs_freed = 1; /* later reports (of purged outputs) find no input */
    if (c->consumer) {
        if (c->revoking) {
            osara__kafka_finish_revoke(c);
        }
        OSARA_KAFKA_FOR_EACH_PART (c, p) {
            osara__kafka_store_offsets(p);
        }
        osara__kafka_free_parts(c);
        rd_kafka_consumer_close(c->consumer); /* commits what was stored */
        osara__kafka_member_left(c);
        rd_kafka_queue_destroy(c->cq);
        rd_kafka_destroy(c->consumer);
    }
    if (c->pq) {
        rd_kafka_queue_destroy(c->pq);
    }
    if (c->producer) {
        rd_kafka_destroy(c->producer); /* also destroys the mock cluster */
    }
}

static void close_after(uv_work_t *req, int status)
{
    (void)status;
    kclient_t *c = req->data;
    free(req);
    OSARA_DEBUG("kafka: client %s closed", c->bootstrap);
    client_free(c);
}

/* Closes what lives on the loop, then hands the rest to the pool once no
 * job (an assignment, a metadata fetch) uses the handles. The pending work
 * keeps the loop running, so a stop still waits for the last outputs. */
static void close_when_idle(kclient_t *c)
{
    if (c->jobs > 0 || c->handover || c->close_queued) {
        return;
    }
    c->close_queued = 1;
    uv_work_t *req = osara_xcalloc(1, sizeof(*req));
    req->data = c;
    if (uv_queue_work(&c->w->loop, req, close_work, close_after) != 0) {
        close_work(req); /* the loop is gone: close here */
        close_after(req, 0);
    }
}

static void close_timer(uv_timer_t **t)
{
    if (*t) {
        uv_close((uv_handle_t *)*t, osara__kafka_handle_free);
        *t = NULL;
    }
}

static void on_handover(uv_timer_t *t)
{
    kclient_t *c = t->data;
    close_timer(&c->handover);
    close_when_idle(c);
}

void osara__kafka_client_close(void *ptr)
{
    kclient_t *c = ptr;
    c->closing = 1;
    if (c->producer == NULL && c->consumer == NULL) {
        client_free(c); /* validated only (check mode), or failed to start */
        return;
    }
    unwatch_queue(c->cq, &c->cfd, &c->cpoll);
    unwatch_queue(c->pq, &c->pfd, &c->ppoll);
    osara__kafka_wake_room_waiters(c, 0); /* their sends fail: nil, err */
    if (c->dr_event) { /* reports served halfway: serve the rest now */
        const rd_kafka_message_t *rkm;
        while ((rkm = rd_kafka_event_message_next(c->dr_event)) != NULL) {
            osara__kafka_on_delivery(c->producer, rkm, c);
        }
        rd_kafka_event_destroy(c->dr_event);
        c->dr_event = NULL;
    }
    close_timer(&c->resub_timer);
    close_timer(&c->revoke_timer);
    close_timer(&c->pump_timer);
    OSARA_KAFKA_FOR_EACH_PART (c, p) {
        close_timer(&p->retry_timer);
    }
    for (kpart_t *p = c->retired; p; p = p->next) {
        close_timer(&p->retry_timer);
    }
    /* Hand over on the next turn: close may be called from deep inside a
     * callback of this client (a delivery report resumed the last handler
     * of a closing VM), which goes on using c on the loop once we return. */
    c->handover = osara_xmalloc(sizeof(*c->handover));
    uv_timer_init(&c->w->loop, c->handover);
    c->handover->data = c;
    uv_timer_start(c->handover, on_handover, 0, 0);
}

/* ---- jobs: librdkafka calls that wait, run on libuv's pool -------------- */

void osara__kafka_job_queue(kclient_t *c, uv_work_t *req, uv_work_cb work,
                            uv_after_work_cb after)
{
    c->jobs++;
    if (uv_queue_work(&c->w->loop, req, work, after) != 0) {
        work(req);
        after(req, UV_ECANCELED);
    }
}

void osara__kafka_job_done(kclient_t *c)
{
    c->jobs--;
    if (c->closing) {
        close_when_idle(c);
    }
}

/* The embedded cluster's identity: random per start (its logs are new),
 * so what was saved against an earlier one is recognised as stale. */
static void embedded_identity(kclient_t *c)
{
    uint64_t r[2] = {0, 0};
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd < 0 || read(fd, r, sizeof(r)) != (ssize_t)sizeof(r)) {
        r[0] = uv_hrtime(); /* unique enough for one machine's restarts */
        r[1] = (uint64_t)getpid();
    }
    if (fd >= 0) {
        close(fd);
    }
    char id[64];
    snprintf(id, sizeof(id), "embedded-%016llx%016llx", (unsigned long long)r[0],
             (unsigned long long)r[1]);
    c->cluster_id = osara_xstrdup(id);
}

typedef struct {
    uv_work_t req;
    kclient_t *c;
    char *id; /* rd_kafka_mem_free'd */
} cluster_job_t;

static void cluster_work(uv_work_t *req)
{
    cluster_job_t *job = req->data;
    job->id = rd_kafka_clusterid(job->c->producer, 10000);
}

static void cluster_after(uv_work_t *req, int status)
{
    (void)status;
    cluster_job_t *job = req->data;
    kclient_t *c = job->c;
    if (job->id && c->cluster_id == NULL) {
        c->cluster_id = osara_xstrdup(job->id);
    }
    if (job->id) {
        rd_kafka_mem_free(c->producer, job->id);
    }
    free(job);
    c->cluster_job = 0;
    osara__kafka_job_done(c);
}

const char *osara__kafka_cluster_id(kclient_t *c)
{
    if (c->cluster_id || c->closing) {
        return c->cluster_id;
    }
    /* known without waiting once either handle has fetched metadata */
    rd_kafka_t *rks[2] = {c->consumer, c->producer};
    for (int i = 0; i < 2 && c->cluster_id == NULL; i++) {
        char *id = rks[i] ? rd_kafka_clusterid(rks[i], 0) : NULL;
        if (id) {
            c->cluster_id = osara_xstrdup(id);
            rd_kafka_mem_free(rks[i], id);
        }
    }
    if (c->cluster_id == NULL && !c->cluster_job) {
        c->cluster_job = 1;
        cluster_job_t *job = osara_xcalloc(1, sizeof(*job));
        job->c = c;
        job->req.data = job;
        osara__kafka_job_queue(c, &job->req, cluster_work, cluster_after);
    }
    return c->cluster_id;
}

int osara__kafka_start_producer(kclient_t *c, char *errstr, size_t cap)
{
    rd_kafka_conf_t *conf = build_conf(c, 0, errstr, cap);
    if (conf == NULL) {
        return -1;
    }
    c->producer = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, cap);
    if (c->producer == NULL) {
        return -1;
    }
    if (c->embedded) {
        c->mock = rd_kafka_handle_mock_cluster(c->producer);
        free(c->bootstrap);
        c->bootstrap = osara_xstrdup(rd_kafka_mock_cluster_bootstraps(c->mock));
        embedded_identity(c);
    }
    c->pq = rd_kafka_queue_get_main(c->producer);
    return watch_queue(c, c->pq, &c->pfd, &c->ppoll, osara__kafka_on_producer_ready);
}

int osara__kafka_start_consumer(kclient_t *c)
{
    char errstr[512];
    rd_kafka_conf_t *conf = build_conf(c, 1, errstr, sizeof(errstr));
    if (conf == NULL) {
        return osara_err_set(OSARA_EINVAL, "kafka: %s", errstr);
    }
    c->consumer = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof(errstr));
    if (c->consumer == NULL) {
        return osara_err_set(OSARA_EINVAL, "kafka: %s", errstr);
    }
    rd_kafka_resp_err_t err = rd_kafka_poll_set_consumer(c->consumer);
    if (err) {
        return osara_err_set(OSARA_EBROKER, "kafka: %s", rd_kafka_err2str(err));
    }
    c->cq = rd_kafka_queue_get_consumer(c->consumer);
    osara__kafka_member_join(c);
    return watch_queue(c, c->cq, &c->cfd, &c->cpoll, osara__kafka_on_consumer_ready);
}

typedef struct {
    uv_work_t req;
    kclient_t *c;
    rd_kafka_topic_t *rkt;
} topic_job_t;

static void topic_work(uv_work_t *req)
{
    topic_job_t *job = req->data;
    const struct rd_kafka_metadata *md = NULL;
    if (rd_kafka_metadata(job->c->producer, 0, job->rkt, &md, 2000) ==
        RD_KAFKA_RESP_ERR_NO_ERROR) {
        rd_kafka_metadata_destroy(md);
    }
}

static void topic_after(uv_work_t *req, int status)
{
    (void)status;
    topic_job_t *job = req->data;
    kclient_t *c = job->c;
    rd_kafka_topic_destroy(job->rkt);
    free(job);
    osara__kafka_job_done(c);
}

void osara__kafka_ensure_topic(kclient_t *c, const char *topic)
{
    if (c->mock && topic[0] != '^') {
        rd_kafka_resp_err_t err = rd_kafka_mock_topic_create(c->mock, topic, c->partitions, 1);
        if (err && err != RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS) {
            OSARA_WARN("kafka: cannot create topic %s in the embedded cluster: %s", topic,
                       rd_kafka_err2str(err));
        }
    }
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(c->producer, topic, NULL);
    if (rkt == NULL) {
        return; /* an invalid name: the first send reports it */
    }
    topic_job_t *job = osara_xcalloc(1, sizeof(*job));
    job->c = c;
    job->rkt = rkt;
    job->req.data = job;
    osara__kafka_job_queue(c, &job->req, topic_work, topic_after);
}
