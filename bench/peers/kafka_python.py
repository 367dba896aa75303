"""Python peer: confluent-kafka with batch consume, json, a pydantic model per
message (as osara's Tap does), produce, offsets stored after delivery.

usage: kafka_python.py BOOT IN OUT N MODE   (MODE: pipeline | consume)
"""
import json
import sys
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
from pydantic import BaseModel


class Order(BaseModel):
    id: int
    user: str
    amount: int


def main():
    boot, topic_in, topic_out, n, mode = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    pipeline = mode == "pipeline"
    consumer = Consumer({
        "bootstrap.servers": boot, "group.id": "py-" + uuid.uuid4().hex,
        "auto.offset.reset": "earliest", "enable.auto.offset.store": False,
        "queued.min.messages": 1000000,
    })
    producer = Producer({"bootstrap.servers": boot, "linger.ms": 5,
                         "queue.buffering.max.messages": 1000000})

    def delivered(err, msg, tp=None):
        pass

    consumer.subscribe([topic_in])
    handled, t0 = 0, None
    while handled < n:
        batch = consumer.consume(num_messages=500, timeout=0.1)
        for m in batch:
            if m.error():
                continue
            if t0 is None:
                t0 = time.monotonic()
            order = Order(**json.loads(m.value()))
            if pipeline:
                out = json.dumps({"id": order.id, "user": order.user, "amount": order.amount,
                                  "vip": order.amount > 500})
                tp = TopicPartition(m.topic(), m.partition(), m.offset() + 1)
                while True:
                    try:
                        producer.produce(topic_out, out.encode(),
                                         on_delivery=lambda err, msg, tp=tp: (err is None) and consumer.store_offsets(offsets=[tp]))
                        break
                    except BufferError:
                        producer.poll(0.01)
            handled += 1
        producer.poll(0)
    secs = time.monotonic() - t0
    print("rate=%.0f n=%d secs=%.3f" % (n / secs, n, secs), flush=True)
    producer.flush(30)
    consumer.close()


if __name__ == "__main__":
    main()
