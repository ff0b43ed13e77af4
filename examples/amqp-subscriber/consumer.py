"""The cache service's subscriber of the hand-written approach, unchanged: it used to
get these messages from every write path's publish_invalidation(entity, id, fields);
now pginval sends them from the WAL.

    pip install pika
    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f python3 consumer.py
"""

import json
import os

import pika

EXCHANGE = "cache_invalidation"


def drop(key):
    # Stand-in for the service's own cache (an in-process dict, memcached, ...).
    print(f"drop {key}", flush=True)


def on_message(channel, method, properties, body):
    event = json.loads(body)
    entity, entity_id = event["entity"], event["id"]
    fields = event["fields"]
    # pginval only: TRUNCATE and too-big transactions send fields = null ("all").
    if fields is None:
        drop(f"{entity}:*")
    else:
        drop(f"{entity}:{entity_id}")
        if "role" in event["fields"]:
            drop(f"permissions:{entity_id}")
    print(f"event {method.routing_key} {properties.message_id} {json.dumps(event)}", flush=True)
    channel.basic_ack(method.delivery_tag)


def main():
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, EXCHANGE, routing_key="invalidate.*")
    channel.basic_consume(queue, on_message)
    print("waiting for invalidations", flush=True)
    channel.start_consuming()


if __name__ == "__main__":
    main()
