// Node peer of the http benchmark: node's own http module with the same JSON
// route (one process, keep-alive as node does by default).
// usage: node http_node.js PORT
const http = require("http");
const route = /^\/orders\/(\d+)$/;
http.createServer((req, res) => {
  const m = req.method === "GET" && route.exec(req.url);
  if (!m) { res.writeHead(404); res.end(); return; }
  const id = parseInt(m[1], 10);
  const body = JSON.stringify({ id, user: `user-${id % 1000}`, amount: id % 997, status: "paid" });
  res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
  res.end(body);
}).listen(parseInt(process.argv[2], 10), "127.0.0.1");
