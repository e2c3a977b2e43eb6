// The Node.js HTTP app of the peer sections: the same file runs under herder (socket at fd 3,
// LISTEN_FDS), under Node's cluster module (bench/apps/node-cluster.js), under pm2 cluster mode
// and under bench/apps/bare-launch.py. GET / -> "pid=<pid> slot=<slot>\n".
// LEAK_KB=N (the recycling section): every request keeps N KiB more, filled with ones so that
// every page is really there (not the shared zero page), in a global array never freed.
// Drains on SIGTERM and SIGINT (pm2's default kill signal): stop accepting, finish in-flight
// requests, close idle keep-alive connections, exit.
// NODE_APP_EMBEDDED=1 (bench/apps/node-sticky.js): do not listen; module.exports is the server,
// for a sticky-session master that hands it accepted connections.
'use strict';
const http = require('http');
const cluster = require('cluster');

const slot = process.env.HERDER_WORKER ?? process.env.NODE_APP_INSTANCE ??
  (cluster.worker ? String(cluster.worker.id) : '-');
const leakBytes = Number(process.env.LEAK_KB || 0) * 1024;
const leaked = [];
const server = http.createServer((req, res) => {
  if (leakBytes > 0) leaked.push(Buffer.alloc(leakBytes, 1));
  const body = `pid=${process.pid} slot=${slot}\n`;
  res.writeHead(200, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body) });
  res.end(body);
});
server.keepAliveTimeout = 30000;

// sd_listen_fds(3): the fds are ours only if LISTEN_PID names this process.
const inherited = process.env.LISTEN_FDS && Number(process.env.LISTEN_PID) === process.pid;
module.exports = server;
if (process.env.NODE_APP_EMBEDDED === '1') {
  // listens nowhere: the caller feeds it connections
} else if (inherited) {
  server.listen({ fd: 3 });
} else {
  server.listen(Number(process.env.PORT || 8080), process.env.HOST || '127.0.0.1');
}
// Readiness: Node has no AF_UNIX datagram sockets, so under a NOTIFY_SOCKET (herder --ready
// notify) it asks systemd-notify(1) to send READY=1 on its behalf, with this pid as the sender
// (--pid: SCM_CREDENTIALS naming another pid need CAP_SYS_ADMIN, i.e. root, see unix(7)).
server.on('listening', () => {
  if (process.send) process.send('ready');
  if (process.env.NOTIFY_SOCKET) {
    require('child_process').execFile('systemd-notify', ['--ready', `--pid=${process.pid}`],
      (err) => { if (err) console.error(`node-app: systemd-notify failed: ${err.message}`); });
  }
});

let draining = false;
function drain() {
  if (draining) return;
  draining = true;
  server.close(() => process.exit(0));
  server.closeIdleConnections();
  setTimeout(() => process.exit(0), 10000).unref();
}
process.on('SIGTERM', drain);
process.on('SIGINT', drain);
