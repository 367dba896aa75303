/* kafka_peer.c - benchmark peers without osara, on the same broker.
 *
 *   kafka_peer fill BOOT TOPIC N              produce N ~100-byte JSON orders
 *   kafka_peer c_lua BOOT IN OUT N MODE LUA   consume; call the Lua handler
 *                                             (lua_pcall, no osara) per message
 *   kafka_peer raw_c BOOT IN OUT N MODE       the same work in C with cJSON
 *
 * MODE is "pipeline" (decode, validate 3 fields, produce one enriched output,
 * store the input's offset after the output's delivery report) or "consume"
 * (decode only). Prints "rate=<msgs/s> n=<N> secs=<elapsed>", measured from
 * the first message consumed to the N-th handled. Settings match osara's
 * defaults (queued.min.messages=1000000, offsets stored after delivery). */
#include <cjson/cJSON.h>
#include <lauxlib.h>
#include <librdkafka/rdkafka.h>
#include <lua.h>
#include <lualib.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what, const char *why)
{
    fprintf(stderr, "kafka_peer: %s: %s\n", what, why);
    exit(1);
}

static void set(rd_kafka_conf_t *conf, const char *k, const char *v)
{
    char err[512];
    if (rd_kafka_conf_set(conf, k, v, err, sizeof(err)) != RD_KAFKA_CONF_OK) {
        die(k, err);
    }
}

static int fill(const char *boot, const char *topic, long n)
{
    char err[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    set(conf, "bootstrap.servers", boot);
    set(conf, "linger.ms", "5");
    set(conf, "sticky.partitioning.linger.ms", "0");
    set(conf, "queue.buffering.max.messages", "1000000");
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof(err));
    if (!rk) {
        die("producer", err);
    }
    char buf[160];
    for (long i = 1; i <= n; i++) {
        int len = snprintf(buf, sizeof(buf),
                           "{\"id\":%ld,\"user\":\"user-%04ld\",\"amount\":%ld,\"note\":\"benchmark order payload\"}",
                           i, i % 1000, i % 997);
        while (rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                 RD_KAFKA_V_VALUE(buf, (size_t)len), RD_KAFKA_V_END) ==
               RD_KAFKA_RESP_ERR__QUEUE_FULL) {
            rd_kafka_poll(rk, 10);
        }
        rd_kafka_poll(rk, 0);
    }
    rd_kafka_flush(rk, 60000);
    rd_kafka_destroy(rk);
    printf("filled n=%ld\n", n);
    return 0;
}

typedef struct {
    rd_kafka_t *consumer;
    long delivered;
} ctx_t;

/* Stores the input's offset once its output was delivered. */
static void on_dr(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    ctx_t *ctx = opaque;
    if (m->err == 0 && m->_private) {
        int64_t packed = (int64_t)(intptr_t)m->_private; /* partition << 48 | offset */
        rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
        rd_kafka_topic_partition_list_add(l, (const char *)rd_kafka_opaque(ctx->consumer),
                                          (int32_t)(packed >> 48))->offset =
            (packed & 0xFFFFFFFFFFFFLL) + 1;
        rd_kafka_offsets_store(ctx->consumer, l);
        rd_kafka_topic_partition_list_destroy(l);
    }
    ctx->delivered++;
}

/* Work in C: parse with cJSON, validate 3 fields, build the output. */
static int raw_work(const char *p, size_t len, int pipeline, char *out, size_t cap)
{
    cJSON *v = cJSON_ParseWithLength(p, len);
    if (!v) {
        return -1;
    }
    cJSON *id = cJSON_GetObjectItemCaseSensitive(v, "id");
    cJSON *user = cJSON_GetObjectItemCaseSensitive(v, "user");
    cJSON *amount = cJSON_GetObjectItemCaseSensitive(v, "amount");
    int ok = cJSON_IsNumber(id) && cJSON_IsString(user) && cJSON_IsNumber(amount);
    int n = 0;
    if (ok && pipeline) {
        n = snprintf(out, cap, "{\"id\":%.0f,\"user\":\"%s\",\"amount\":%.0f,\"vip\":%s}",
                     id->valuedouble, user->valuestring, amount->valuedouble,
                     amount->valuedouble > 500 ? "true" : "false");
    }
    cJSON_Delete(v);
    return ok ? n : -1;
}

static int run(int lua_mode, const char *boot, const char *in, const char *out_topic, long n,
               const char *mode, const char *script)
{
    int pipeline = strcmp(mode, "pipeline") == 0;
    char err[512], group[64];
    ctx_t ctx = {0};
    lua_State *L = NULL;
    if (lua_mode) {
        L = luaL_newstate();
        luaL_openlibs(L);
        if (luaL_dofile(L, script) != 0) {
            die(script, lua_tostring(L, -1));
        }
        lua_setglobal(L, "handler");
    }
    rd_kafka_conf_t *pc = rd_kafka_conf_new();
    set(pc, "bootstrap.servers", boot);
    set(pc, "linger.ms", "5");
    set(pc, "queue.buffering.max.messages", "1000000");
    rd_kafka_conf_set_dr_msg_cb(pc, on_dr);
    rd_kafka_conf_set_opaque(pc, &ctx);
    rd_kafka_t *prod = rd_kafka_new(RD_KAFKA_PRODUCER, pc, err, sizeof(err));
    if (!prod) {
        die("producer", err);
    }
    snprintf(group, sizeof(group), "peer-%d-%ld", lua_mode, (long)time(NULL) ^ (long)getpid());
    rd_kafka_conf_t *cc = rd_kafka_conf_new();
    set(cc, "bootstrap.servers", boot);
    set(cc, "group.id", group);
    set(cc, "auto.offset.reset", "earliest");
    set(cc, "enable.auto.offset.store", "false");
    set(cc, "queued.min.messages", "1000000");
    rd_kafka_conf_set_opaque(cc, (void *)in);
    ctx.consumer = rd_kafka_new(RD_KAFKA_CONSUMER, cc, err, sizeof(err));
    if (!ctx.consumer) {
        die("consumer", err);
    }
    rd_kafka_poll_set_consumer(ctx.consumer);
    rd_kafka_topic_partition_list_t *sub = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(sub, in, RD_KAFKA_PARTITION_UA);
    rd_kafka_subscribe(ctx.consumer, sub);
    rd_kafka_topic_partition_list_destroy(sub);
    rd_kafka_queue_t *q = rd_kafka_queue_get_consumer(ctx.consumer);
    rd_kafka_message_t *batch[512];
    long handled = 0;
    double t0 = 0;
    char obuf[256];
    while (handled < n) {
        ssize_t got = rd_kafka_consume_batch_queue(q, 100, batch, 512);
        for (ssize_t i = 0; i < got; i++) {
            rd_kafka_message_t *m = batch[i];
            if (m->err) {
                rd_kafka_message_destroy(m);
                continue;
            }
            if (t0 == 0) {
                t0 = now();
            }
            const char *outp = NULL;
            size_t outlen = 0;
            if (lua_mode) {
                lua_getglobal(L, "handler");
                lua_pushlstring(L, m->payload, m->len);
                if (lua_pcall(L, 1, 1, 0) != 0) {
                    die("handler", lua_tostring(L, -1));
                }
                outp = lua_tolstring(L, -1, &outlen);
            } else {
                int k = raw_work(m->payload, m->len, pipeline, obuf, sizeof(obuf));
                if (k > 0) {
                    outp = obuf;
                    outlen = (size_t)k;
                }
            }
            if (pipeline && outp) {
                intptr_t packed = ((intptr_t)m->partition << 48) | (intptr_t)m->offset;
                while (rd_kafka_producev(prod, RD_KAFKA_V_TOPIC(out_topic),
                                         RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                         RD_KAFKA_V_VALUE((void *)outp, outlen),
                                         RD_KAFKA_V_OPAQUE((void *)packed), RD_KAFKA_V_END) ==
                       RD_KAFKA_RESP_ERR__QUEUE_FULL) {
                    rd_kafka_poll(prod, 10);
                }
            }
            if (lua_mode) {
                lua_pop(L, 1);
            }
            rd_kafka_message_destroy(m);
            handled++;
        }
        rd_kafka_poll(prod, 0);
    }
    double secs = now() - t0;
    printf("rate=%.0f n=%ld secs=%.3f\n", (double)n / secs, n, secs);
    fflush(stdout);
    rd_kafka_flush(prod, 30000);
    rd_kafka_queue_destroy(q);
    rd_kafka_consumer_close(ctx.consumer);
    rd_kafka_destroy(ctx.consumer);
    rd_kafka_destroy(prod);
    if (L) {
        lua_close(L);
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 5 && strcmp(argv[1], "fill") == 0) {
        return fill(argv[2], argv[3], atol(argv[4]));
    }
    if (argc >= 8 && strcmp(argv[1], "c_lua") == 0) {
        return run(1, argv[2], argv[3], argv[4], atol(argv[5]), argv[6], argv[7]);
    }
    if (argc >= 7 && strcmp(argv[1], "raw_c") == 0) {
        return run(0, argv[2], argv[3], argv[4], atol(argv[5]), argv[6], NULL);
    }
    fprintf(stderr, "usage: kafka_peer fill BOOT TOPIC N | c_lua BOOT IN OUT N MODE LUA | "
                    "raw_c BOOT IN OUT N MODE\n");
    return 2;
}
