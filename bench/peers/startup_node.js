// Node peer of the startup benchmark: a kafkajs consumer in a new group reads
// the first message of a topic that already holds one; prints the wall-clock
// time it had it. usage: node startup_node.js BOOT TOPIC
const { Kafka, logLevel } = require("kafkajs");
const [boot, topic] = process.argv.slice(2);
const kafka = new Kafka({ brokers: [boot], logLevel: logLevel.NOTHING });
const consumer = kafka.consumer({ groupId: "node-" + process.pid + "-" + Date.now() });
(async () => {
  await consumer.connect();
  await consumer.subscribe({ topic, fromBeginning: true });
  await consumer.run({
    eachMessage: async () => {
      console.log(`first_at=${(Date.now() / 1000).toFixed(6)}`);
      process.exit(0);
    },
  });
})().catch((e) => { console.error(e.message); process.exit(1); });
