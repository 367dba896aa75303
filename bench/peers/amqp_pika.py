#!/usr/bin/python3
"""The amqp_consume benchmark's queue filler and its pika peer.

  amqp_pika.py fill URL N     puts N small JSON messages in queue bench_amqp
                              (bound to exchange bench_amqp, key m) and waits
                              until the broker holds them all
  amqp_pika.py consume URL N  consumes them with prefetch 256, decoding each
                              and acking it; prints "rate=<msgs/s> n= secs="
                              measured from the first message
"""
import json
import sys
import time

import pika

QUEUE = "bench_amqp"


def channel(url):
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.exchange_declare(QUEUE, "topic", durable=True)
    ch.queue_declare(QUEUE, durable=True)
    ch.queue_bind(QUEUE, QUEUE, "m")
    return conn, ch


def fill(url, n):
    conn, ch = channel(url)
    props = pika.BasicProperties(content_type="application/json")
    for i in range(n):
        ch.basic_publish(QUEUE, "m", json.dumps({"i": i, "user": "user-%d" % (i % 100), "amount": i % 997}), props)
    while ch.queue_declare(QUEUE, durable=True, passive=True).method.message_count < n:
        time.sleep(0.05)
    conn.close()


def consume(url, n):
    conn, ch = channel(url)
    ch.basic_qos(prefetch_count=256)
    state = {"n": 0, "t0": None}

    def on_message(ch, method, props, body):
        if state["t0"] is None:
            state["t0"] = time.monotonic()
        if json.loads(body)["i"] is not None:
            state["n"] += 1
        ch.basic_ack(method.delivery_tag)
        if state["n"] == n:
            secs = time.monotonic() - state["t0"]
            print("rate=%d n=%d secs=%.3f" % (n / secs, n, secs), flush=True)
            ch.stop_consuming()

    ch.basic_consume(QUEUE, on_message)
    ch.start_consuming()
    conn.close()


if __name__ == "__main__":
    {"fill": fill, "consume": consume}[sys.argv[1]](sys.argv[2], int(sys.argv[3]))
