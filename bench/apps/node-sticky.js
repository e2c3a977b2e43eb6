// Sticky sessions in Node's cluster mode, the way the npm packages for it set them up: a master
// that accepts every connection and passes it to a worker (the master-in-the-path design).
//   node node-sticky.js N sticky-session     (PORT, HOST from env)
//   node node-sticky.js N socket.io-sticky
// The workers run bench/apps/node-app.js unchanged (NODE_APP_EMBEDDED=1: it does not listen,
// the master hands it connections).
//  sticky-session (1.1.2): the master (a net.Server with pauseOnConnect) hashes the client's
//    address (connection.remoteAddress) to a worker and sends it the socket before reading a
//    byte: per-IP stickiness for any protocol. sticky.listen() is the usual entry; its Master is
//    used directly here only to bind HOST (listen() binds every address).
//  @socket.io/sticky (2.0.1): setupMaster(httpServer, {loadBalancingMethod: 'least-connection'})
//    reads the first chunk of each connection and routes by the socket.io session id (`sid=` in
//    the request line); a request without one goes to the worker with the fewest socket.io
//    sessions. The worker side (setupWorker) needs only io.httpServer and io.engine from a
//    socket.io Server: a plain HTTP app passes them itself (there are no socket.io sessions).
// Prints "READY" on stdout once the master listens and every worker has said it can take
// connections. SIGTERM: kill the workers, exit.
'use strict';
const cluster = require('cluster');
const path = require('path');

const n = Number(process.argv[2] || 2);
const kind = process.argv[3] || 'sticky-session';
const port = Number(process.env.PORT || 8080);
const host = process.env.HOST || '127.0.0.1';
if (!['sticky-session', 'socket.io-sticky'].includes(kind)) {
  console.error(`node-sticky: unknown kind ${kind}`);
  process.exit(2);
}

function worker() {
  process.env.NODE_APP_EMBEDDED = '1';
  const server = require(path.join(__dirname, 'node-app.js'));
  if (kind === 'sticky-session') {
    require('sticky-session').listen(server, port); // in a worker: wait for sockets
  } else {
    const { EventEmitter } = require('events');
    require('@socket.io/sticky').setupWorker({ httpServer: server, engine: new EventEmitter() });
  }
  process.send({ type: 'bench:ready' });
}

function master() {
  let ready = 0;
  let stopping = false;
  cluster.on('message', (w, msg) => {
    if (msg && msg.type === 'bench:ready' && ++ready === n) console.log('READY');
  });
  if (kind === 'sticky-session') {
    const { Master } = require('sticky-session');
    new Master(n).listen(port, host); // forks the n workers once it listens
  } else {
    const http = require('http');
    const server = http.createServer();
    // as its README says: the first chunk crosses IPC as a Buffer only with this
    cluster.setupPrimary({ serialization: 'advanced' });
    require('@socket.io/sticky').setupMaster(server, { loadBalancingMethod: 'least-connection' });
    server.listen(port, host, () => {
      for (let i = 0; i < n; i++) cluster.fork();
    });
    cluster.on('exit', (w) => { if (!stopping) cluster.fork(); });
  }
  process.on('SIGTERM', () => {
    stopping = true;
    for (const w of Object.values(cluster.workers)) w.process.kill('SIGKILL');
    process.exit(0);
  });
}

if (cluster.isPrimary) master(); else worker();
