/* broker.c - `osara broker`: the embedded cluster as a process.
 *
 * librdkafka 2.0.2's mock cluster binds its brokers to loopback ports the
 * kernel picks. With --port N the process also listens on N and relays each
 * connection to the first broker, so the bootstrap address is fixed; the
 * brokers it advertises in metadata stay on their own loopback ports. */

#include <signal.h>

#include "kafka/kafka.h"
#include "kafka/kafka_int.h"

typedef struct {
    uv_loop_t loop;
    rd_kafka_t *rk;
    struct sockaddr_in first;      /* the mock's first broker */
    uv_tcp_t listener;
    uv_timer_t poll;
    uv_signal_t sigterm, sigint;
} broker_t;

/* One relayed connection: the client's socket and the broker's. */
typedef struct {
    uv_tcp_t side[2];              /* 0: client, 1: broker */
    uv_connect_t connect;
    int closing, closed;
} relay_t;

typedef struct {
    uv_write_t req;
    uv_buf_t buf;
} relay_write_t;

static void relay_closed(uv_handle_t *h)
{
    relay_t *r = h->data;
    if (++r->closed == 2) {
        free(r);
    }
}

static void relay_close(relay_t *r)
{
    if (r->closing) {
        return;
    }
    r->closing = 1;
    uv_close((uv_handle_t *)&r->side[0], relay_closed);
    uv_close((uv_handle_t *)&r->side[1], relay_closed);
}

static void relay_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    (void)h;
    buf->base = osara_xmalloc(hint);
    buf->len = hint;
}

static void relay_written(uv_write_t *req, int status)
{
    relay_write_t *w = (relay_write_t *)req;
    relay_t *r = req->handle->data;
    free(w->buf.base);
    free(w);
    if (status < 0) {
        relay_close(r);
    }
}

/* Bytes from one side are written as they are to the other. */
static void relay_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    relay_t *r = s->data;
    if (n <= 0) {
        free(buf->base);
        if (n < 0) {
            relay_close(r);
        }
        return;
    }
    uv_stream_t *to = (uv_stream_t *)&r->side[s == (uv_stream_t *)&r->side[0] ? 1 : 0];
    relay_write_t *w = osara_xmalloc(sizeof(*w));
    w->buf = uv_buf_init(buf->base, (unsigned)n);
    if (uv_write(&w->req, to, &w->buf, 1, relay_written) != 0) {
        free(buf->base);
        free(w);
        relay_close(r);
    }
}

static void relay_connected(uv_connect_t *req, int status)
{
    relay_t *r = req->data;
    if (status < 0 || r->closing) {
        relay_close(r);
        return;
    }
    uv_read_start((uv_stream_t *)&r->side[0], relay_alloc, relay_read);
    uv_read_start((uv_stream_t *)&r->side[1], relay_alloc, relay_read);
}

static void on_relay_connection(uv_stream_t *server, int status)
{
    broker_t *b = server->data;
    if (status < 0) {
        return;
    }
    relay_t *r = osara_xcalloc(1, sizeof(*r));
    uv_tcp_init(&b->loop, &r->side[0]);
    uv_tcp_init(&b->loop, &r->side[1]);
    r->side[0].data = r->side[1].data = r->connect.data = r;
    if (uv_accept(server, (uv_stream_t *)&r->side[0]) != 0 ||
        uv_tcp_connect(&r->connect, &r->side[1], (const struct sockaddr *)&b->first,
                       relay_connected) != 0) {
        relay_close(r);
    }
}

/* Listens on 127.0.0.1:port and relays to the first broker; -1 with a
 * message on stderr. */
static int relay_start(broker_t *b, int port, const char *bootstraps)
{
    char host[64];
    int first_port = 0;
    if (sscanf(bootstraps, "%63[^:]:%d", host, &first_port) != 2 ||
        uv_ip4_addr(host, first_port, &b->first) != 0) {
        fprintf(stderr, "osara broker: unexpected bootstrap address %s\n", bootstraps);
        return -1;
    }
    struct sockaddr_in addr;
    uv_ip4_addr("127.0.0.1", port, &addr);
    uv_tcp_init(&b->loop, &b->listener);
    b->listener.data = b;
    int rc = uv_tcp_bind(&b->listener, (const struct sockaddr *)&addr, 0);
    if (rc == 0) {
        rc = uv_listen((uv_stream_t *)&b->listener, 128, on_relay_connection);
    }
    if (rc != 0) {
        fprintf(stderr, "osara broker: cannot listen on 127.0.0.1:%d: %s\n", port, uv_strerror(rc));
        return -1;
    }
    return 0;
}

static void on_poll(uv_timer_t *t)
{
    broker_t *b = t->data;
    rd_kafka_poll(b->rk, 0);
}

static void on_stop_signal(uv_signal_t *s, int sig)
{
    (void)sig;
    uv_stop(s->loop);
}

/* At exit: the broker's own handles close plainly, relays pair-wise. */
static void close_any(uv_handle_t *h, void *arg)
{
    broker_t *b = arg;
    int own = h == (uv_handle_t *)&b->listener || h == (uv_handle_t *)&b->poll ||
              h == (uv_handle_t *)&b->sigterm || h == (uv_handle_t *)&b->sigint;
    if (own && !uv_is_closing(h)) {
        uv_close(h, NULL);
    } else if (!own) {
        relay_close(h->data);
    }
}

/* Serves until SIGTERM or SIGINT; closes every handle before returning. */
static void serve(broker_t *b)
{
    uv_timer_init(&b->loop, &b->poll);
    b->poll.data = b;
    uv_timer_start(&b->poll, on_poll, 200, 200);
    uv_signal_init(&b->loop, &b->sigterm);
    uv_signal_init(&b->loop, &b->sigint);
    uv_signal_start(&b->sigterm, on_stop_signal, SIGTERM);
    uv_signal_start(&b->sigint, on_stop_signal, SIGINT);
    uv_run(&b->loop, UV_RUN_DEFAULT);
    uv_walk(&b->loop, close_any, b);
    uv_run(&b->loop, UV_RUN_DEFAULT);
    uv_loop_close(&b->loop);
}

/* ---- osara broker ------------------------------------------------------- */

static void usage(void)
{
    printf("usage: osara broker [--brokers N] [--partitions N] [--port N] [--topic NAME...]\n\n"
           "runs the embedded Kafka cluster (librdkafka's mock cluster: in memory,\n"
           "for development and tests) until SIGTERM; prints its bootstrap address\n"
           "on the first line. Topics are created on first use. --port N makes the\n"
           "bootstrap address 127.0.0.1:N (relayed to the first broker).\n");
}

int osara_kafka_broker_main(int argc, char **argv)
{
    int brokers = 1, partitions = 4, port = 0;
    const char *topics[128];
    int ntopics = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage();
            return 0;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "osara broker: %s needs a value\n", a);
            return 2;
        }
        if (strcmp(a, "--brokers") == 0) {
            brokers = atoi(argv[++i]);
        } else if (strcmp(a, "--partitions") == 0) {
            partitions = atoi(argv[++i]);
        } else if (strcmp(a, "--port") == 0) {
            char *end;
            long v = strtol(argv[++i], &end, 10);
            port = *end || v < 1 || v > 65535 ? -1 : (int)v;
        } else if (strcmp(a, "--topic") == 0 && ntopics < 128) {
            topics[ntopics++] = argv[++i];
        } else {
            fprintf(stderr, "osara broker: unknown option %s\n", a);
            return 2;
        }
    }
    if (brokers < 1 || partitions < 1) {
        fprintf(stderr, "osara broker: --brokers and --partitions must be >= 1\n");
        return 2;
    }
    if (port < 0) {
        fprintf(stderr, "osara broker: --port must be a port number (1 to 65535)\n");
        return 2;
    }
    char errstr[512], n[16];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    snprintf(n, sizeof(n), "%d", brokers);
    rd_kafka_conf_set(conf, "test.mock.num.brokers", n, errstr, sizeof(errstr));
    rd_kafka_conf_set_log_cb(conf, osara__kafka_on_log);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    if (rk == NULL) {
        fprintf(stderr, "osara broker: %s\n", errstr);
        return 1;
    }
    rd_kafka_mock_cluster_t *mock = rd_kafka_handle_mock_cluster(rk);
    for (int i = 0; i < ntopics; i++) {
        rd_kafka_mock_topic_create(mock, topics[i], partitions, 1);
    }
    broker_t b = {.rk = rk};
    uv_loop_init(&b.loop);
    const char *bootstraps = rd_kafka_mock_cluster_bootstraps(mock);
    if (port && relay_start(&b, port, bootstraps) != 0) {
        uv_walk(&b.loop, close_any, &b);
        uv_run(&b.loop, UV_RUN_DEFAULT);
        uv_loop_close(&b.loop);
        rd_kafka_destroy(rk);
        return 1;
    }
    if (port) {
        printf("127.0.0.1:%d\n", port);
    } else {
        printf("%s\n", bootstraps);
    }
    fflush(stdout);
    serve(&b);
    rd_kafka_destroy(rk);
    return 0;
}
