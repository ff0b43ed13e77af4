// The cache service's subscriber of the hand-written approach, unchanged: it used to
// get these messages from every write path's publishInvalidation(entity, id, fields);
// now pginval sends them from the WAL.
//
//   npm install amqplib
//   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f node consumer.js
"use strict";

const amqp = require("amqplib");

const EXCHANGE = "cache_invalidation";

function drop(key) {
  // Stand-in for the service's own cache.
  console.log(`drop ${key}`);
}

async function main() {
  const url = process.env.AMQP_URL || "amqp://guest:guest@127.0.0.1:5672/%2f";
  const connection = await amqp.connect(url);
  const channel = await connection.createChannel();
  await channel.assertExchange(EXCHANGE, "topic", { durable: true });
  const { queue } = await channel.assertQueue("", { exclusive: true });
  await channel.bindQueue(queue, EXCHANGE, "invalidate.*");
  await channel.consume(queue, (msg) => {
    const event = JSON.parse(msg.content.toString());
    // pginval only: TRUNCATE and too-big transactions send fields = null ("all").
    if (event.fields === null) {
      drop(`${event.entity}:*`);
    } else {
      drop(`${event.entity}:${event.id}`);
      if ("role" in event.fields) drop(`permissions:${event.id}`);
    }
    console.log(`event ${msg.fields.routingKey} ${msg.properties.messageId} ${JSON.stringify(event)}`);
    channel.ack(msg);
  });
  console.log("waiting for invalidations");
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
