"""Python peer of the startup benchmark: a confluent-kafka consumer in a new
group reads the first message of a topic that already holds one; prints the
wall-clock time it had it. usage: startup_python.py BOOT TOPIC"""
import sys
import time
import uuid

from confluent_kafka import Consumer

consumer = Consumer({"bootstrap.servers": sys.argv[1], "group.id": "py-" + uuid.uuid4().hex,
                     "auto.offset.reset": "earliest"})
consumer.subscribe([sys.argv[2]])
while True:
    m = consumer.poll(0.05)
    if m is not None and not m.error():
        print("first_at=%.6f" % time.time(), flush=True)
        break
consumer.close()
