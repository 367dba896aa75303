/* client.c - a Kafka client: configuration, create, close. */

#include <errno.h>
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
    static const uint64_t one = 1;
    rd_kafka_queue_io_event_enable(q, *fd, &one, sizeof(one));
    *poll = osara_xmalloc(sizeof(**poll));
    uv_poll_init(&c->w->loop, *poll, *fd);
    (*poll)->data = c;
    uv_poll_start(*poll, UV_READABLE, cb);
    return 0;
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

static rd_kafka_conf_t *build_conf(kclient_t *c, int consumer, char *errstr, size_t cap)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    for (int i = 0; i < c->nconf; i++) {
        const char *k = c->conf[2 * i], *v = c->conf[2 * i + 1];
        if (!consumer && is_consumer_property(k)) {
            continue; /* keep the producer from warning about them */
        }
        if (rd_kafka_conf_set(conf, k, v, errstr, cap) != RD_KAFKA_CONF_OK) {
            rd_kafka_conf_destroy(conf);
            return NULL;
        }
    }
    rd_kafka_conf_set(conf, "bootstrap.servers", c->bootstrap, errstr, cap);
    rd_kafka_conf_set_opaque(conf, c);
    rd_kafka_conf_set_error_cb(conf, on_error);
    rd_kafka_conf_set_log_cb(conf, osara__kafka_on_log);
    if (consumer) {
        rd_kafka_conf_set(conf, "enable.auto.offset.store", "false", errstr, cap);
        if (c->embedded && !has_conf(c, "fetch.wait.max.ms")) {
            /* The mock broker holds every fetch for the full wait. */
            rd_kafka_conf_set(conf, "fetch.wait.max.ms", "5", errstr, cap);
        }
        if (c->embedded && !has_conf(c, "fetch.error.backoff.ms")) {
            /* First fetches race topic creation; retry fast, not in 500 ms. */
            rd_kafka_conf_set(conf, "fetch.error.backoff.ms", "10", errstr, cap);
        }
    } else {
        rd_kafka_conf_set_dr_msg_cb(conf, osara__kafka_on_delivery);
    }
    return conf;
}


void osara__kafka_client_close(void *ptr)
{
    kclient_t *c = ptr;
    c->closing = 1;
    if (c->producer) {
        /* Delivery reports advance the offsets of finished inputs. */
        rd_kafka_flush(c->producer, 10000);
    }
    if (c->consumer) {
        if (c->revoking) {
            osara__kafka_finish_revoke(c);
        }
        OSARA_KAFKA_FOR_EACH_PART (c, p) {
            osara__kafka_store_offsets(p);
        }
        osara__kafka_free_parts(c);
        rd_kafka_consumer_close(c->consumer); /* commits what was stored */
        rd_kafka_queue_destroy(c->cq);
        rd_kafka_destroy(c->consumer);
    }
    if (c->cpoll) {
        uv_close((uv_handle_t *)c->cpoll, osara__kafka_handle_free);
        close(c->cfd);
    }
    if (c->ppoll) {
        uv_close((uv_handle_t *)c->ppoll, osara__kafka_handle_free);
        close(c->pfd);
    }
    if (c->resub_timer) {
        uv_close((uv_handle_t *)c->resub_timer, osara__kafka_handle_free);
    }
    if (c->revoke_timer) {
        uv_close((uv_handle_t *)c->revoke_timer, osara__kafka_handle_free);
    }
    if (c->pq) {
        rd_kafka_queue_destroy(c->pq);
    }
    if (c->producer) {
        rd_kafka_destroy(c->producer); /* also destroys the mock cluster */
    }
    osara__kafka_free_parts(c); /* none without a consumer; retired ones otherwise freed above */
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
    free(c->bootstrap);
    free(c->key);
    free(c);
}

int osara__kafka_start_producer(kclient_t *c, char *errstr, size_t cap)
{
    rd_kafka_conf_t *conf = build_conf(c, 0, errstr, cap);
    if (conf == NULL) {
        return -1;
    }
    if (c->embedded) {
        char n[16];
        snprintf(n, sizeof(n), "%d", c->embedded);
        rd_kafka_conf_set(conf, "test.mock.num.brokers", n, errstr, cap);
        /* Sticky partitioning fills one mock partition (~5 MiB each) first. */
        rd_kafka_conf_set(conf, "sticky.partitioning.linger.ms", "0", errstr, cap);
    }
    c->producer = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, cap);
    if (c->producer == NULL) {
        return -1;
    }
    if (c->embedded) {
        c->mock = rd_kafka_handle_mock_cluster(c->producer);
        free(c->bootstrap);
        c->bootstrap = osara_xstrdup(rd_kafka_mock_cluster_bootstraps(c->mock));
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
    if (!c->embedded) {
        rd_kafka_conf_set_rebalance_cb(conf, osara__kafka_on_rebalance);
    }
    c->consumer = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof(errstr));
    if (c->consumer == NULL) {
        return osara_err_set(OSARA_EINVAL, "kafka: %s", errstr);
    }
    rd_kafka_poll_set_consumer(c->consumer);
    c->cq = rd_kafka_queue_get_consumer(c->consumer);
    return watch_queue(c, c->cq, &c->cfd, &c->cpoll, osara__kafka_on_consumer_ready);
}

void osara__kafka_ensure_topic(kclient_t *c, const char *topic)
{
    if (c->mock && topic[0] != '^') {
        rd_kafka_mock_topic_create(c->mock, topic, c->partitions, 1);
    }
}
