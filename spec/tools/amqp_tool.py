#!/usr/bin/python3
"""An independent AMQP client for the specs (Debian's python3-pika; no
osara code): publishes and reads messages the way another service would.

  amqp_tool.py pub URL EXCHANGE ROUTING_KEY N [BODY]
      publishes N persistent messages with publisher confirms; BODY is a
      JSON template where {i} becomes 1..N (default {"i": {i}}); declares
      EXCHANGE (topic, durable) first unless it is "".
  amqp_tool.py flood URL EXCHANGE ROUTING_KEY N SECONDS
      publishes N messages spread over SECONDS, each confirmed, reconnecting
      when the broker goes away; prints "confirmed I" for each confirmed one.
  amqp_tool.py get URL QUEUE N TIMEOUT
      reads N messages from QUEUE (acking each), prints one line per
      message: "msg <body> headers=<json>", then "got N".
  amqp_tool.py count URL QUEUE
      prints "count N": the messages ready in QUEUE.
"""
import json
import sys
import time

import pika


def connect(url):
    return pika.BlockingConnection(pika.URLParameters(url))


def pub(url, exchange, key, n, body='{"i": {i}}'):
    conn = connect(url)
    ch = conn.channel()
    ch.confirm_delivery()
    if exchange:
        ch.exchange_declare(exchange, "topic", durable=True)
    props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    for i in range(1, n + 1):
        ch.basic_publish(exchange, key, body.replace("{i}", str(i)), props)
    print("published %d" % n, flush=True)
    conn.close()


def flood(url, exchange, key, n, seconds):
    gap = seconds / max(n, 1)
    i = 1
    conn = None
    deadline = time.time() + seconds + 120
    while i <= n and time.time() < deadline:
        try:
            if conn is None:
                conn = connect(url)
                ch = conn.channel()
                ch.confirm_delivery()
                ch.exchange_declare(exchange, "topic", durable=True)
            ch.basic_publish(exchange, key, json.dumps({"i": i}),
                             pika.BasicProperties(delivery_mode=2))
            print("confirmed %d" % i, flush=True)
            i += 1
            time.sleep(gap)
        except Exception as e:  # the broker went away: the publish is not confirmed
            print("retrying %d: %s" % (i, type(e).__name__), flush=True)
            conn = None
            time.sleep(0.2)
    print("flood done %d" % (i - 1), flush=True)


def get(url, queue, n, timeout):
    conn = connect(url)
    ch = conn.channel()
    got = 0
    deadline = time.time() + timeout
    while got < n and time.time() < deadline:
        method, props, body = ch.basic_get(queue)
        if method is None:
            time.sleep(0.05)
            continue
        headers = {k: v for k, v in (props.headers or {}).items()
                   if isinstance(v, (str, int, float, bool))}
        print("msg %s headers=%s" % (body.decode(), json.dumps(headers, sort_keys=True)), flush=True)
        ch.basic_ack(method.delivery_tag)
        got += 1
    print("got %d" % got, flush=True)
    conn.close()


def count(url, queue):
    conn = connect(url)
    ch = conn.channel()
    q = ch.queue_declare(queue, passive=True)
    print("count %d" % q.method.message_count, flush=True)
    conn.close()


def main(argv):
    cmd = argv[1]
    if cmd == "pub":
        pub(argv[2], argv[3], argv[4], int(argv[5]), *argv[6:7])
    elif cmd == "flood":
        flood(argv[2], argv[3], argv[4], int(argv[5]), float(argv[6]))
    elif cmd == "get":
        get(argv[2], argv[3], int(argv[4]), float(argv[5]))
    elif cmd == "count":
        count(argv[2], argv[3])
    else:
        sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    main(sys.argv)
