// Node's cluster module as a launcher, the way the Node guides set it up:
//   node node-cluster.js N        (PORT, HOST from env; NODE_CLUSTER_SCHED_POLICY=rr|none)
// Restarts a worker that dies; SIGUSR2 = the usual rolling-restart recipe (disconnect one
// worker, wait for its exit, fork its replacement, wait for 'listening', next one); prints
// "RELOADED" on stdout when a rolling restart is done. SIGTERM: disconnect all, exit.
'use strict';
const cluster = require('cluster');
const path = require('path');

const n = Number(process.argv[2] || 2);
cluster.setupPrimary({ exec: path.join(__dirname, 'node-app.js') });
let reloading = false;
let stopping = false;

cluster.on('exit', (worker) => {
  if (!worker.exitedAfterDisconnect && !stopping) cluster.fork();
});

function ready(count) {
  let listening = 0;
  cluster.on('listening', function onListen() {
    if (++listening === count) {
      cluster.removeListener('listening', onListen);
      console.log('READY');
    }
  });
}
ready(n);
for (let i = 0; i < n; i++) cluster.fork();

process.on('SIGUSR2', () => {
  if (reloading) return;
  reloading = true;
  const workers = Object.values(cluster.workers);
  const restart = (i) => {
    const w = workers[i];
    if (!w) { reloading = false; console.log('RELOADED'); return; }
    w.once('exit', () => {
      const nw = cluster.fork();
      nw.once('listening', () => restart(i + 1));
    });
    w.disconnect();
  };
  restart(0);
});

process.on('SIGTERM', () => {
  stopping = true;
  cluster.disconnect(() => process.exit(0));
  setTimeout(() => process.exit(0), 10000).unref();
});
