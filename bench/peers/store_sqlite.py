"""SQLite peer of the `store` scenario: WAL, synchronous=NORMAL, puts in
transactions of 1000, then random gets (Python's sqlite3, as a Python
service would use it)."""
import os
import random
import sqlite3
import sys
import time

N = int(os.environ.get("BENCH_N", "100000"))
path = sys.argv[1]
db = sqlite3.connect(path, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=NORMAL")
db.execute("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB)")
t0 = time.monotonic()
for b in range(N // 1000):
    db.execute("BEGIN")
    db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)",
                   [("key%08d" % (((b * 1000 + i) * 7919) % N), "value-%d" % (b * 1000 + i)) for i in range(1, 1001)])
    db.execute("COMMIT")
secs = time.monotonic() - t0
print("bench: put rate=%.0f" % (N / secs), flush=True)
t0 = time.monotonic()
hits = 0
for _ in range(N):
    if db.execute("SELECT v FROM kv WHERE k = ?", ("key%08d" % random.randrange(N),)).fetchone():
        hits += 1
secs = time.monotonic() - t0
print("bench: get rate=%.0f hits=%d" % (N / secs, hits), flush=True)
