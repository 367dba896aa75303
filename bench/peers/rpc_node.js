// Node peer of the ws_rpc benchmark: npm's ws server answering the same
// JSON-RPC 2.0 messages as osara.rpc (docs/rpc.md), one function `add`,
// answered as soon as it returns (an async function when its promise
// settles), so several calls are in flight on one connection as in osara.
// usage: node rpc_node.js PORT
const { WebSocketServer } = require("ws");
const functions = { add: (a, b) => a + b };
const wss = new WebSocketServer({ host: "127.0.0.1", port: parseInt(process.argv[2], 10), path: "/rpc" });
wss.on("connection", (ws) => {
  ws.on("message", (data) => {
    let msg;
    try { msg = JSON.parse(data); } catch (e) {
      ws.send(JSON.stringify({ jsonrpc: "2.0", id: null, error: { code: -32700, message: "parse error" } }));
      return;
    }
    const fn = functions[msg.method];
    if (!fn) {
      ws.send(JSON.stringify({ jsonrpc: "2.0", id: msg.id, error: { code: -32601, message: "no such method: " + msg.method } }));
      return;
    }
    const reply = (result) => ws.send(JSON.stringify({ jsonrpc: "2.0", id: msg.id, result }));
    const fail = (err) => ws.send(JSON.stringify({ jsonrpc: "2.0", id: msg.id, error: { code: -32000, message: String(err && err.message) } }));
    let result;
    try { result = fn(...(msg.params || [])); } catch (err) { fail(err); return; }
    // a plain value is answered at once; a promise (an async function) when it settles
    if (result && typeof result.then === "function") result.then(reply, fail); else reply(result);
  });
});
