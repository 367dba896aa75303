// Node peer of the cache_route benchmark: node's http module with the npm
// `redis` client, the same route reading the same JSON from redis.
// usage: node cache_node.js PORT REDIS_PORT
const http = require("http");
const { createClient } = require("redis");

const port = Number(process.argv[2]);
const store = createClient({ url: `redis://127.0.0.1:${process.argv[3]}` });

async function main() {
  await store.connect();
  http.createServer(async (req, res) => {
    const m = /^\/orders\/(\d+)$/.exec(req.url);
    const raw = m ? await store.get("bench:order:" + m[1]) : null;
    const body = raw === null ? JSON.stringify({ error: "no such order" }) : JSON.stringify(JSON.parse(raw));
    res.writeHead(raw === null ? 404 : 200, { "Content-Type": "application/json" });
    res.end(body);
  }).listen(port, "127.0.0.1");
}
main();
