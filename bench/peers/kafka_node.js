// Node peer: kafkajs with eachBatch (its fastest consumer mode), JSON.parse,
// produce in batches, commit after the batch's produce was acknowledged.
// usage: node kafka_node.js BOOT IN OUT N MODE
const { Kafka, logLevel } = require("kafkajs");
const [boot, topicIn, topicOut, nStr, mode] = process.argv.slice(2);
const n = parseInt(nStr, 10);
const pipeline = mode === "pipeline";

async function main() {
  const kafka = new Kafka({ brokers: boot.split(","), logLevel: logLevel.NOTHING });
  const consumer = kafka.consumer({ groupId: "node-" + Date.now() + "-" + Math.random() });
  const producer = kafka.producer();
  await producer.connect();
  await consumer.connect();
  await consumer.subscribe({ topic: topicIn, fromBeginning: true });
  let handled = 0, t0 = 0, finished = false;
  await consumer.run({
    autoCommit: false,
    eachBatch: async ({ batch, resolveOffset, commitOffsetsIfNecessary }) => {
      if (finished) return;
      if (!t0) t0 = process.hrtime.bigint();
      const out = [];
      for (const m of batch.messages) {
        const v = JSON.parse(m.value);
        if (typeof v.id !== "number" || typeof v.user !== "string" || typeof v.amount !== "number") continue;
        if (pipeline) out.push({ value: JSON.stringify({ id: v.id, user: v.user, amount: v.amount, vip: v.amount > 500 }) });
        handled++;
      }
      if (out.length) await producer.send({ topic: topicOut, messages: out });
      resolveOffset(batch.messages[batch.messages.length - 1].offset);
      await commitOffsetsIfNecessary();
      if (handled >= n && !finished) {
        finished = true;
        const secs = Number(process.hrtime.bigint() - t0) / 1e9;
        console.log(`rate=${Math.round(n / secs)} n=${n} secs=${secs.toFixed(3)}`);
        setImmediate(async () => { await consumer.disconnect(); await producer.disconnect(); process.exit(0); });
      }
    },
  });
}
main().catch((e) => { console.error(e); process.exit(1); });
