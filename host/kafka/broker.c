/* broker.c - `osara broker`: the embedded cluster as a process. */

#include <signal.h>

#include "kafka/kafka.h"
#include "kafka/kafka_int.h"

/* ---- osara broker ------------------------------------------------------- */

static volatile sig_atomic_t broker_stop;

static void on_broker_signal(int sig)
{
    (void)sig;
    broker_stop = 1;
}

int osara_kafka_broker_main(int argc, char **argv)
{
    int brokers = 1, partitions = 4;
    const char *topics[128];
    int ntopics = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            printf("usage: osara broker [--brokers N] [--partitions N] [--topic NAME...]\n\n"
                   "runs the embedded Kafka cluster (librdkafka's mock cluster: in memory,\n"
                   "for development and tests) until SIGTERM; prints its bootstrap address\n"
                   "on the first line. Topics are created on first use.\n");
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
    printf("%s\n", rd_kafka_mock_cluster_bootstraps(mock));
    fflush(stdout);
    signal(SIGTERM, on_broker_signal);
    signal(SIGINT, on_broker_signal);
    while (!broker_stop) {
        rd_kafka_poll(rk, 200);
    }
    rd_kafka_destroy(rk);
    return 0;
}
