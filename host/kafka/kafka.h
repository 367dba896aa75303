/* kafka.h - Kafka clients, handlers and producers on librdkafka: the
 * interface of host/kafka/ (kafka_int.h lists its files).
 *
 * A client (osara.kafka{...}) is a worker shared resource keyed by its
 * configuration, so it survives reloads: its producer, its consumer, its
 * in-flight inputs and their offsets live here in C. Consumed messages are
 * read on the loop thread in batches (the consumer queue wakes a uv_poll
 * through rd_kafka_queue_io_event_enable); each partition is an ordered
 * lane of host/transport: one handler at a time per partition, each in its
 * own pooled coroutine, partitions concurrently. An input's offset is
 * stored (enable.auto.offset.store=false) only when its handler finished
 * and every output it sent was acknowledged, as the contiguous prefix per
 * partition (see offsets.h); a failed or cancelled input is handled again
 * in place. librdkafka's auto-commit commits what was stored; the final
 * commit happens on revoke and close. Whatever may wait (closing, metadata,
 * committed offsets) runs on libuv's pool, never on the loop thread.
 *
 * With no bootstrap.servers (or "embedded") the client starts librdkafka's
 * in-process mock cluster and assigns partitions directly (no group join). */
#ifndef OSARA_KAFKA_H
#define OSARA_KAFKA_H

#include <lua.h>

/* Lua binding `osara.kafka_c`: client, produce, receipts, the "kafka"
 * registry kind. */
int osara_kafka_open(lua_State *L);

/* `osara broker [--brokers N] [--partitions N] [--topic NAME...]`: runs the
 * embedded cluster standalone until SIGTERM/SIGINT; prints the bootstrap
 * address on the first stdout line. Returns the exit code. */
int osara_kafka_broker_main(int argc, char **argv);

#endif
