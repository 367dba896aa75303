"""Python peer of the store_eo benchmark: confluent-kafka batch consume, a
per-user counter in SQLite (WAL, synchronous=NORMAL) and the consumed offsets
in the same SQLite transaction, committed once per batch: the usual way to
get exactly-once state in Python without Kafka transactions.
usage: store_eo_python.py BOOT TOPIC N DBFILE"""
import json
import sqlite3
import sys
import time
import uuid

from confluent_kafka import Consumer

boot, topic, n, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
db = sqlite3.connect(path, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=NORMAL")
db.execute("CREATE TABLE IF NOT EXISTS counts (user TEXT PRIMARY KEY, n INTEGER)")
db.execute("CREATE TABLE IF NOT EXISTS offsets (part INTEGER PRIMARY KEY, next INTEGER)")
consumer = Consumer({"bootstrap.servers": boot, "group.id": "py-eo-" + uuid.uuid4().hex,
                     "auto.offset.reset": "earliest", "enable.auto.commit": False,
                     "queued.min.messages": 1000000})
consumer.subscribe([topic])
handled, t0 = 0, None
while handled < n:
    batch = consumer.consume(num_messages=500, timeout=0.1)
    if not batch:
        continue
    t0 = t0 or time.monotonic()
    db.execute("BEGIN")
    for m in batch:
        if m.error():
            continue
        user = json.loads(m.value())["user"]
        db.execute("INSERT INTO counts VALUES (?, 1) ON CONFLICT(user) DO UPDATE SET n = n + 1", (user,))
        db.execute("INSERT OR REPLACE INTO offsets VALUES (?, ?)", (m.partition(), m.offset() + 1))
        handled += 1
    db.execute("COMMIT")
secs = time.monotonic() - t0
print("rate=%d n=%d secs=%.3f" % (n / secs, n, secs))
consumer.close()
