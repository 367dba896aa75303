// Node peer of the sql_route benchmark: node's http module with a pool of
// the npm `pg` client, the same route reading the same row by id from
// PostgreSQL (a named prepared statement, as osara and asyncpg prepare).
// usage: node sql_node.js PORT PG_URL POOL_SIZE
const http = require("http");
const { Pool } = require("pg");

const port = Number(process.argv[2]);
const pool = new Pool({ connectionString: process.argv[3], max: Number(process.argv[4]) });

http.createServer(async (req, res) => {
  const m = /^\/orders\/(\d+)$/.exec(req.url);
  let status = 404, body = { error: "no such order" };
  try {
    const r = m ? await pool.query({
      name: "order_by_id",
      text: "SELECT id, user_name, amount, status FROM orders WHERE id = $1",
      values: [Number(m[1])],
    }) : { rows: [] };
    if (r.rows.length > 0) { status = 200; body = r.rows[0]; }
  } catch (e) {
    status = 503; body = { error: String(e) };
  }
  res.writeHead(status, { "Content-Type": "application/json" });
  res.end(JSON.stringify(body));
}).listen(port, "127.0.0.1");
