// A worker of herder's pool: HTTP on the shared socket at fd 3. Each request asks the agent for
// the hit count of the whole pool, one line each way, on a connection of its own.
const http = require("node:http");
const net = require("node:net");

// HERDER_AGENT_SOCKET is in --listen syntax: unix:/path, HOST:PORT or [V6]:PORT. (Not unix:@name:
// Node 20 connects to an abstract name padded with NULs to 108 bytes, which is another name.)
const addr = process.env.HERDER_AGENT_SOCKET;
const port = addr.lastIndexOf(":");
const agent = addr.startsWith("unix:") ? { path: addr.slice(5) }
  : { host: addr.slice(0, port).replace(/^\[(.*)\]$/, "$1"), port: Number(addr.slice(port + 1)) };

const ask = (request) => new Promise((resolve, reject) => {
  let answer = "";
  const conn = net.connect(agent, () => conn.write(request + "\n")).setEncoding("utf8");
  conn.on("data", (data) => {
    if ((answer += data).includes("\n")) resolve(answer.split("\n")[0]), conn.end();
  });
  conn.on("error", reject).on("close", () => reject(new Error("the agent closed the connection")));
  conn.setTimeout(5000, () => conn.destroy(new Error("no answer within 5 s")));
});

const server = http.createServer(async (req, res) => {
  try {
    res.end(`pid=${process.pid} worker=${process.env.HERDER_WORKER} hits=${await ask("hit")}\n`);
  } catch (err) {
    res.writeHead(503).end(`agent unavailable: ${err.message}\n`);
  }
});
server.listen({ fd: 3 });
process.on("SIGTERM", () => server.close());   // drain: finish what was accepted, then exit
