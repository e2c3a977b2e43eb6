"""Section 10 (issue 13): sticky sessions.

(a) herder-demo × N under herder `--reuseport` (default `--balance hash`) against herder
`--reuseport --balance client-ip`, in the same run, rotating order, several rounds, new
connection per request, with two clients: wrk -H 'Connection: close' (fast, but every
connection comes from 127.0.0.1, so client-ip puts them all on one slot: that is what sticky
means, and it caps client-ip at one worker's rate), and bench/loadclient.py --sources (each
connection from the next of 127.0.0.1..127.0.0.S, Python, slower than wrk), which shows the
spread and the stickiness.

(b) The same Node app (bench/apps/node-app.js) under herder `--reuseport --balance client-ip`
and under the npm packages for sticky sessions in cluster mode (bench/apps/node-sticky.js):
sticky-session, whose master hashes the client address, and @socket.io/sticky, whose master
routes by socket.io session id. Same clients, same rounds.

Stickiness (from the --sources runs): for each source address, the fraction of its answers
that came from its most frequent worker; the table shows the lowest over all addresses (1.0:
every address always reached one worker) and the busiest worker's share of all answers."""
import os
import shutil

from . import load
from .fmt import missing_lines, ms, num, pct, ratio, table
from .measure import median
from .procs import Proc, Unavailable, free_port, wait_http, wait_until
from .systems import Herder, System

CLIENTS = ("wrk", "sources")


class NodeSticky(System):
    """bench/apps/node-sticky.js: a cluster master in the path that passes each accepted
    connection to a worker running node-app.js (kind: sticky-session or socket.io-sticky)."""

    PACKAGES = {"sticky-session": "sticky-session", "socket.io-sticky": "@socket.io/sticky"}

    def __init__(self, ctx, n, kind):
        super().__init__(ctx, n)
        self.kind = kind
        self.package = self.PACKAGES[kind]
        how = ("hash of the client address" if kind == "sticky-session"
               else "least-connection, by sid")
        self.label = f"node cluster + {self.package} ({how})"

    def start(self, timeout=60.0):
        if not self.ctx.node:
            raise Unavailable("node not installed")
        bench = os.path.dirname(self.ctx.apps)
        if not os.path.isfile(os.path.join(bench, "node_modules", self.package, "package.json")):
            raise Unavailable(f"{self.package} not installed (bench/install-deps.sh)")
        self.port = free_port()
        env = dict(os.environ, PORT=str(self.port), HOST="127.0.0.1")
        self.procs = [Proc([self.ctx.node, os.path.join(self.ctx.apps, "node-sticky.js"),
                            str(self.n), self.kind], self._log(self.kind), env=env)]

        def ready():
            self._check_alive()
            with open(self.procs[0].log, errors="replace") as f:
                return "READY" in f.read().split()
        if not wait_until(ready, timeout, 0.05):
            raise Unavailable(f"{self.label}: not ready within {timeout:.0f}s")
        wait_http(self.port, 20, self.procs[0])
        return self


def _sources_run(port, c):
    """sticky_clients copies of loadclient.py at once, each from the same sticky_sources
    addresses; their answers per address and worker summed."""
    clients = [load.Client(port, c["sticky_conns"], False, duration=c["sticky_dur"],
                           timeout=c["req_timeout"], sources=c["sticky_sources"])
               for _ in range(c["sticky_clients"])]
    res = [cl.wait() for cl in clients]
    by = {}
    for r in res:
        for addr, tally in r["by_source"].items():
            mine = by.setdefault(addr, {})
            for w, k in tally.items():
                mine[w] = mine.get(w, 0) + k
    return {"rps": sum(r["rps"] for r in res), "failed": sum(r["failed"] for r in res),
            "p99_ms": max((r["p99_ms"] for r in res if r["p99_ms"] is not None), default=None),
            "by_source": by}


def stickiness(by_source):
    """(lowest per-address top-worker fraction, busiest worker's share, workers seen,
    addresses) of one --sources run."""
    tops, per_worker = [], {}
    for tally in by_source.values():
        total = sum(tally.values())
        if total:
            tops.append(max(tally.values()) / total)
        for w, k in tally.items():
            per_worker[w] = per_worker.get(w, 0) + k
    total = sum(per_worker.values())
    return {"min": min(tops) if tops else None,
            "mean": sum(tops) / len(tops) if tops else None,
            "busiest": max(per_worker.values()) / total if total else None,
            "workers": len(per_worker), "addresses": len(tops)}


def _one(s, client, c):
    s._check_alive()
    if client == "wrk":
        r = load.wrk(s.port, c["dur"], c["conns"], False)
        return {"rps": r["rps"], "p99_ms": r["p99_ms"], "failed": r["errors"] + r["non2xx"]}
    r = _sources_run(s.port, c)
    r["stick"] = stickiness(r.pop("by_source"))
    return r


def _compare(ctx, name, makers, pairs):
    """Start every system, then per round and client run each system in a rotating order;
    medians, and for each pair (a, b) the median of the per-round ratios a / b."""
    c = ctx.cfg
    started, missing = {}, {}
    for key, mk in makers:
        s = mk()
        ctx.log(f"  start {s.label}")
        try:
            started[key] = s.start()
        except (Unavailable, OSError) as e:
            missing[key] = {"label": s.label, "reason": str(e)}
            ctx.log(f"  missing {s.label}: {e}")
            s.stop()
    runs = {k: {cl: [] for cl in CLIENTS} for k in started}
    loads = []
    try:
        for s in started.values() if c["warmup"] else ():  # warm-up, not recorded
            try:
                load.wrk(s.port, 1, c["conns"], False)
            except Unavailable:
                pass
        for r in range(c["sticky_rounds"]):
            keys = [k for k in started if k not in missing]
            order = keys[r % len(keys):] + keys[:r % len(keys)] if keys else []
            for client in CLIENTS:
                for k in order:
                    if k in missing:
                        continue
                    try:
                        runs[k][client].append(_one(started[k], client, c))
                    except Unavailable as e:
                        missing[k] = {"label": started[k].label, "reason": str(e)}
            loads.append(float(open("/proc/loadavg").read().split()[0]))
            ctx.log(f"  {name} round {r + 1}/{c['sticky_rounds']} (load average {loads[-1]})")
    finally:
        for s in started.values():
            s.stop()
    table = {}
    for k, s in started.items():
        if k in missing:
            continue
        row = {"label": s.label}
        for client in CLIENTS:
            rs = runs[k][client]
            row[client] = {"rps": median([x["rps"] for x in rs]),
                           "p99_ms": median([x["p99_ms"] for x in rs if x["p99_ms"]]),
                           "failed": sum(x["failed"] for x in rs),
                           "rounds": [x["rps"] for x in rs]}
            if client == "sources" and rs:
                st = [x["stick"] for x in rs]
                row[client]["stick_min"] = min(x["min"] for x in st if x["min"] is not None)
                row[client]["busiest_max"] = max(x["busiest"] for x in st if x["busiest"])
                row[client]["workers"] = max(x["workers"] for x in st)
                row[client]["addresses"] = max(x["addresses"] for x in st)
        table[k] = row
    ratios = {}
    for a, b in pairs:
        if a in table and b in table:
            for client in CLIENTS:
                rr = [x / y for x, y in zip(table[a][client]["rounds"],
                                            table[b][client]["rounds"]) if x and y]
                q = sorted(rr)
                ratios.setdefault(f"{a}/{b}", {})[client] = {
                    "median": median(rr),
                    "iqr": (q[len(q) // 4], q[(3 * len(q)) // 4]) if q else None}
    return {"table": table, "ratios": ratios, "missing": missing, "loadavg": loads}


def s10_sticky(ctx):
    c = ctx.cfg
    n, demo = c["n"], [ctx.demo]
    ip = ["--balance", "client-ip"]
    out = {"n": n, "rounds": c["sticky_rounds"], "dur": c["dur"], "conns": c["conns"],
           "sources": c["sticky_sources"], "clients": c["sticky_clients"],
           "client_conns": c["sticky_conns"], "client_dur": c["sticky_dur"]}
    out["demo"] = _compare(ctx, "sticky, herder-demo", [
        ("hash", lambda: Herder(ctx, n, demo, reuseport=True,
                                label="herder --reuseport (herder-demo)")),
        ("client_ip", lambda: Herder(ctx, n, demo, reuseport=True, extra=ip,
                                     label="herder --reuseport --balance client-ip "
                                           "(herder-demo)")),
    ], pairs=[("client_ip", "hash")])
    if not c["sticky_node"]:
        out["node"] = None
        out["node_skipped"] = f"not run in {ctx.mode} mode (bench/run without --smoke runs it)"
        return out
    app = [ctx.node or "node", os.path.join(ctx.apps, "node-app.js")]
    ready = "notify" if shutil.which("systemd-notify") else "exec"
    out["node"] = _compare(ctx, "sticky, node app", [
        ("herder_ip", lambda: Herder(ctx, n, app, reuseport=True, ready=ready, extra=ip,
                                     label=f"herder --reuseport --balance client-ip (node app, "
                                           f"--ready {ready})")),
        ("sticky_session", lambda: NodeSticky(ctx, n, "sticky-session")),
        ("socketio_sticky", lambda: NodeSticky(ctx, n, "socket.io-sticky")),
    ], pairs=[("herder_ip", "sticky_session"), ("herder_ip", "socketio_sticky")])
    return out


# --- RESULTS.md -----------------------------------------------------------------------------

STICKY_INTRO = (
    "herder `--reuseport --balance client-ip` steers each new connection in the kernel (a "
    "classic BPF program on the slots' SO_REUSEPORT group hashes the client's IPv4 address or "
    "IPv6 /64 to a ready slot): nothing sits in the path. The Node peers are what users pick "
    "for sticky sessions in cluster mode (bench/apps/node-sticky.js): a master accepts every "
    "connection and passes it to a worker over IPC. **sticky-session** hashes "
    "`connection.remoteAddress`: per-address stickiness for any protocol, the peer for this "
    "comparison. **@socket.io/sticky** routes by the socket.io session id (`sid=`) and sends a "
    "request without one to the worker with the fewest socket.io sessions, which plain HTTP "
    "never opens: every connection goes to the first worker (stickiness 1.0 only because "
    "nothing is spread). It is shown for what it does with a plain HTTP app.\n\n")


def _sr(sec, part, pair, client):
    """A section-10 ratio with its interquartile range (from 4 rounds on)."""
    x = (((sec.get(part) or {}).get("ratios") or {}).get(pair) or {}).get(client)
    if not x or x["median"] is None:
        return None, "–"
    iqr = f" ({x['iqr'][0]:.2f}–{x['iqr'][1]:.2f})" if sec["rounds"] >= 4 and x["iqr"] else ""
    return x["median"], ratio(x["median"]) + iqr


def sticky_headline(sec):
    if "demo" not in sec:
        return []
    rows = []
    for client, how in (("wrk", "wrk, all from 127.0.0.1"),
                        ("sources", f"loadclient.py from {sec['sources']} addresses")):
        x, txt = _sr(sec, "demo", "client_ip/hash", client)
        rows.append([f"herder --balance client-ip vs plain --reuseport, new conn/request ({how})",
                     "≥ 0.98×", txt, "–" if x is None else ("yes" if x >= 0.98 else "no")])
    ip = sec["demo"]["table"].get("client_ip", {}).get("sources", {})
    if ip.get("stick_min") is not None:
        rows.append([f"herder --balance client-ip: lowest share of an address's requests on its "
                     f"worker ({ip['addresses']} addresses, every round)", "1.0",
                     f"{ip['stick_min']:.3f}", "yes" if ip["stick_min"] == 1.0 else "no"])
    for pair, name in (("herder_ip/sticky_session", "sticky-session"),):
        x, txt = _sr(sec, "node", pair, "sources")
        if x is not None:
            rows.append([f"herder --balance client-ip vs node cluster + {name}, node app, new "
                         f"conn/request ({sec['sources']} addresses)", "(peer row)", txt, "–"])
    return rows


def sticky_section(sec):
    if "crashed" in sec:
        return f"**section crashed:** {sec['crashed']}\n"
    out = ("{n} workers; new connection per request; {rounds} rounds, systems alternated in "
           "rotating order; medians. Two clients: **wrk** -H 'Connection: close', {conns} "
           "connections, {dur} s, every connection from 127.0.0.1 — so `--balance client-ip` "
           "puts them all on one worker (that is what sticky means) and the comparison is "
           "unfair to it; and **bench/loadclient.py --sources {sources}**, {clients} copies at "
           "once, {client_conns} connections each, {client_dur} s: the k-th connection comes "
           "from 127.0.0.(1 + k % {sources}). loadclient.py is Python: it reaches a fraction of "
           "wrk's rate, so its runs are bound by the client more than by the server. "
           "Stickiness, from the loadclient runs: for each address, the share of its answers "
           "that came from its most frequent worker; the lowest over all addresses and rounds "
           "(1.0 = every address always reached one worker), and the busiest worker's share of "
           "all answers (the spread).\n\n").format(**sec)
    head = ["system", "wrk req/s", "p99", "loadclient req/s", "p99", "failed",
            "stickiness (lowest)", "busiest worker", "workers seen"]
    for part, title, pairs in (
            ("demo", "herder-demo", [("client_ip/hash", "client-ip ÷ hash")]),
            ("node", "the same Node app (bench/apps/node-app.js)",
             [("herder_ip/sticky_session", "herder client-ip ÷ sticky-session"),
              ("herder_ip/socketio_sticky", "herder client-ip ÷ @socket.io/sticky")])):
        p = sec.get(part)
        if p is None:
            out += f"**{title}:** {sec.get(part + '_skipped', 'not run')}.\n\n"
            continue
        out += f"**{title}.** Load average (1 min) after each round: " + ", ".join(
            f"{x:.1f}" for x in p["loadavg"]) + ".\n\n"
        rows = []
        for v in p["table"].values():
            w, so = v["wrk"], v["sources"]
            stick = "–" if so.get("stick_min") is None else f"{so['stick_min']:.3f}"
            rows.append([v["label"], num(w["rps"]), ms(w["p99_ms"]), num(so["rps"]),
                         ms(so["p99_ms"]), w["failed"] + so["failed"], stick,
                         pct(so.get("busiest_max")), so.get("workers", "–")])
        out += table(head, rows) + "\n"
        rows = [[name, _sr(sec, part, pair, "wrk")[1], _sr(sec, part, pair, "sources")[1]]
                for pair, name in pairs if pair in p["ratios"]]
        if rows:
            out += ("Ratios, the median of the per-round ratios (interquartile range):\n\n"
                    + table(["ratio", "wrk (one address)",
                             f"loadclient ({sec['sources']} addresses)"], rows) + "\n")
        out += missing_lines(p)
    return out
