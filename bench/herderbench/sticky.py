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
every address always reached one worker) and the busiest worker's share of all answers.

(c) A crash-looping slot under load (issue 13: no request waits for a slot that cannot serve):
herder-demo × 4 under herder `--reuseport` (default balance), `--ready notify`, behind a
wrapper that makes slot 3 exit at once while a mark file exists. Two such herders run side by
side: one healthy, and one whose mark exists and whose slot-3 worker was killed (pid from its
`--health` /status), so that slot 3 fails every start in backoff. The same load
(loadclient.py, new connection per request, --sources 64 so that the flow hash spreads) runs
against each in a rotating order: p99 and max latency of the ok requests, failed requests, and
the median of the per-round ratios p99(crash-looping) / p99(healthy)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time

from . import load
from .fmt import missing_lines, ms, num, pct, ratio, table
from .measure import median
from .procs import Proc, Unavailable, conntrack, free_port, kill, wait_http, wait_until
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


# --- (c) a crash-looping slot under load ---------------------------------------------------

LOOP_SLOT = 3  # HERDER_WORKER is the 0-based slot index


def _status(health):
    """herder's /status document, or the reason there is none."""
    try:
        with socket.create_connection(("127.0.0.1", health), timeout=2.0) as so:
            so.sendall(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := so.recv(65536):
                data += chunk
    except OSError as e:
        return None, repr(e)
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        return json.loads(body), None
    except ValueError:
        return None, f"{head[:80]!r}, {len(body)} bytes of body"


def _slot(s, i=LOOP_SLOT, tries=10):
    """Slot i of /status on s's --health port (a few tries: one probe may meet a busy loop)."""
    for _ in range(tries):
        s._check_alive()
        st, why = _status(s.health)
        if st is not None:
            return st["slots"][i]
        time.sleep(0.2)
    raise Unavailable(f"{s.label}: no /status on its --health port ({why})")


class LoopHerder(Herder):
    """herder-demo × 4 under herder --reuseport --ready notify, started through
    `sh -c 'if [ "$HERDER_WORKER" = 3 ] && [ -e MARK ]; then exit 1; fi; exec herder-demo'`,
    with --health for /status; crash() makes slot 3 crash-loop."""

    def __init__(self, ctx, key, label):
        self.mark = os.path.join(ctx.tmp, f"crashloop-{key}.mark")
        self.health = free_port()
        script = (f'if [ "$HERDER_WORKER" = {LOOP_SLOT} ] && [ -e {self.mark} ]; then exit 1; '
                  f'fi; exec {ctx.demo}')
        # The default restart limit (10 in 60 s) would give up on the looping slot mid-run.
        super().__init__(ctx, 4, ["sh", "-c", script], reuseport=True, ready="notify",
                         extra=["--health", f"127.0.0.1:{self.health}",
                                "--restart-limit", "100000"], label=label)

    def crash(self, timeout=20.0):
        """Create the mark, kill slot 3's worker by its pid (from /status), and wait until the
        slot has failed two more starts and is steered away: it is in the loop."""
        open(self.mark, "w").close()
        slot = _slot(self)
        if slot["pid"] is None:
            raise Unavailable(f"{self.label}: slot {LOOP_SLOT} has no worker to kill")
        kill(slot["pid"], signal.SIGKILL)
        r0 = slot["restarts"]

        def looping():
            self._check_alive()
            x = _slot(self)
            return x["restarts"] >= r0 + 2 and x.get("steering") == "steered away"
        if not wait_until(looping, timeout, 0.02):
            raise Unavailable(f"{self.label}: slot {LOOP_SLOT} not in a crash loop within "
                              f"{timeout:.0f}s ({_slot(self)})")


def _room(need, timeout):
    """Wait (at most timeout s) until netfilter's connection table has room for `need` more
    entries with a tenth to spare (procs.conntrack: a full table drops SYNs); the seconds
    waited."""
    t0 = time.monotonic()
    wait_until(lambda: (ct := conntrack()) is None or ct[0] + need <= 0.9 * ct[1], timeout, 0.5)
    return round(time.monotonic() - t0, 1)


def _loop_run(s, c, looping):
    """One load run (paced at crash_rate requests/s); for the looping pool, slot 3's failed
    starts during it (from /status) prove that it looped all along; conntrack's drops during
    it say whether the kernel dropped SYNs for want of room."""
    waited = _room(c["crash_rate"] * c["crash_dur"] * 1.1, c["crash_ct_wait"])
    before, ct0 = _slot(s), conntrack()
    if looping and before["state"] == "ready":
        raise Unavailable(f"{s.label}: slot {LOOP_SLOT} is ready again")
    r = load.Client(s.port, c["crash_conns"], False, duration=c["crash_dur"],
                    timeout=c["req_timeout"], rate=c["crash_rate"],
                    sources=c["crash_sources"]).wait()
    after, ct1 = _slot(s), conntrack()
    s._check_alive()
    return {"rps": r["rps"], "ok": r["ok"], "failed": r["failed"], "fails": r["fails"],
            "p99_ms": r["p99_ms"], "max_ms": r["max_ms"],
            "slot_restarts": after["restarts"] - before["restarts"],
            "slot_state": after["state"], "ct_waited_s": waited,
            "ct_drops": ct1[2] - ct0[2] if ct0 and ct1 else None,
            "ct_entries": ct0[0] if ct0 else None}


def _crashloop(ctx):
    c = ctx.cfg
    systems = {"healthy": LoopHerder(ctx, "healthy", "herder --reuseport, healthy pool"),
               "looping": LoopHerder(ctx, "looping", f"herder --reuseport, slot {LOOP_SLOT} "
                                                     "crash-looping")}
    runs = {k: [] for k in systems}
    loads = []
    try:
        for k, s in systems.items():
            ctx.log(f"  start {s.label}")
            s.start()
        systems["looping"].crash()
        keys = list(systems)
        for r in range(c["crash_rounds"]):
            for k in keys[r % 2:] + keys[:r % 2]:
                runs[k].append(_loop_run(systems[k], c, k == "looping"))
            loads.append(float(open("/proc/loadavg").read().split()[0]))
            ctx.log(f"  crash loop round {r + 1}/{c['crash_rounds']} (load average "
                    f"{loads[-1]}; p99 {runs['healthy'][-1]['p99_ms']} ms healthy, "
                    f"{runs['looping'][-1]['p99_ms']} ms looping)")
    finally:
        for s in systems.values():
            s.stop()
    table = {}
    for k, rs in runs.items():
        fails = {}
        for x in rs:
            for kind, n in x["fails"].items():
                fails[kind] = fails.get(kind, 0) + n
        table[k] = {"label": systems[k].label, "rps": median([x["rps"] for x in rs]),
                    "p99_ms": median([x["p99_ms"] for x in rs if x["p99_ms"] is not None]),
                    "max_ms": max((x["max_ms"] for x in rs if x["max_ms"] is not None),
                                  default=None),
                    "ok": sum(x["ok"] for x in rs), "failed": sum(x["failed"] for x in rs),
                    "fails": fails, "slot_restarts": sum(x["slot_restarts"] for x in rs),
                    "ct_drops": sum(x["ct_drops"] or 0 for x in rs),
                    "ct_waited_s": sum(x["ct_waited_s"] for x in rs), "rounds": rs}
    # A round where conntrack dropped packets measured the table, not herder: left out.
    clean = [(a, b) for a, b in zip(runs["looping"], runs["healthy"])
             if not a["ct_drops"] and not b["ct_drops"]]
    rr = [a["p99_ms"] / b["p99_ms"] for a, b in clean if a["p99_ms"] and b["p99_ms"]]
    q = sorted(rr)
    ct = conntrack()
    git = subprocess.run(["git", "-C", ctx.apps, "describe", "--always", "--dirty"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
    return {"run": {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "git": git or "?"},
            "workers": 4, "slot": LOOP_SLOT, "rounds": c["crash_rounds"],
            "dur": c["crash_dur"], "conns": c["crash_conns"], "sources": c["crash_sources"],
            "rate": c["crash_rate"], "conntrack_max": ct[1] if ct else None,
            "table": table, "loadavg": loads, "clean_rounds": len(rr),
            "ratio": {"median": median(rr),
                      "iqr": (q[len(q) // 4], q[(3 * len(q)) // 4]) if q else None}}


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
    if c["sticky_node"]:
        _node(ctx, n, ip, out)
    else:
        out["node"] = None
        out["node_skipped"] = f"not run in {ctx.mode} mode (bench/run without --smoke runs it)"
    # Last: its ~200k connections in 2 minutes would fill conntrack's table for the parts after
    # it (it waits for room itself, the others do not).
    try:
        out["crashloop"] = _crashloop(ctx)
    except (Unavailable, OSError) as e:
        ctx.log(f"  crash loop: missing: {e}")
        out["crashloop"] = {"missing": str(e)}
    return out


def _node(ctx, n, ip, out):
    app = [ctx.node or "node", os.path.join(ctx.apps, "node-app.js")]
    ready = "notify" if shutil.which("systemd-notify") else "exec"
    out["node"] = _compare(ctx, "sticky, node app", [
        ("herder_ip", lambda: Herder(ctx, n, app, reuseport=True, ready=ready, extra=ip,
                                     label=f"herder --reuseport --balance client-ip (node app, "
                                           f"--ready {ready})")),
        ("sticky_session", lambda: NodeSticky(ctx, n, "sticky-session")),
        ("socketio_sticky", lambda: NodeSticky(ctx, n, "socket.io-sticky")),
    ], pairs=[("herder_ip", "sticky_session"), ("herder_ip", "socketio_sticky")])


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
    rows += crashloop_headline(sec.get("crashloop"))
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
    return out + crashloop_section(sec.get("crashloop"))


def _loop_ratio(cl):
    x = cl.get("ratio") or {}
    if x.get("median") is None:
        return None, "–"
    n = cl.get("clean_rounds", cl["rounds"])
    iqr = f" ({x['iqr'][0]:.2f}–{x['iqr'][1]:.2f})" if n >= 4 and x["iqr"] else ""
    return x["median"], ratio(x["median"]) + iqr


def crashloop_headline(cl):
    if not cl:
        return []
    claim = "herder --reuseport, p99 latency with 1 of 4 slots crash-looping ÷ healthy pool"
    if "table" not in cl:
        return [[claim, "≤ 2×", f"missing: {cl.get('missing', 'not run')}", "–"]]
    x, txt = _loop_ratio(cl)
    return [[f"{claim} (new conn/request, {cl['sources']} addresses)", "≤ 2×", txt,
             "–" if x is None else ("yes" if x <= 2 else "no")]]


PRE_STEERING = (
    "Before steering (herder before e4390ec) the kernel kept hashing about 1 in 4 new "
    "connections onto slot {slot}'s socket, where they waited for a worker that never became "
    "ready. That herder was measured only by tests/steer.rs's crash-loop test run against the "
    "pre-steering build, where a request waited the test's 3 s timeout; this suite has not "
    "measured a pre-steering herder, so it has no row here.")


def crashloop_section(cl):
    head = "**A crash-looping slot under load.** "
    if not cl:
        return ""
    if "table" not in cl:
        return f"{head}**missing:** {cl.get('missing', 'not run')}\n"
    out = (head + "herder-demo × {workers} under herder `--reuseport` (default `--balance "
           "hash`) `--ready notify`, each worker started through `sh -c 'if [ \"$HERDER_WORKER\" "
           "= {slot} ] && [ -e MARK ]; then exit 1; fi; exec herder-demo'`. Two herders side by "
           "side: one healthy; in the other the mark exists and slot {slot}'s worker was killed "
           "(its pid from `/status` on `--health`), so every start of slot {slot} fails at once "
           "and waits out the backoff (100 ms doubling to 5 s; `--restart-limit 100000` so that "
           "herder does not give up). The same load against each, {rounds} rounds in rotating "
           "order: loadclient.py, {conns} connections, new connection per request, paced at "
           "{rate} requests/s in all (about half of what this client reaches against herder-demo "
           "here), each from the next of 127.0.0.1..127.0.0.{sources} (so the flow hash "
           "spreads), {dur} s per run. Latency over the ok requests, connect included; a request "
           "with no answer within the timeout counts as failed. This machine loads netfilter's "
           "conntrack (a table of {conntrack_max} entries, each loopback connection's kept 120 s "
           "after it closes): a full table drops SYNs, which the client resends after 1 s and "
           "3 s, seconds of latency that are not herder's. So before each run the suite waits "
           "until the run fits in the table, counts the packets conntrack dropped during it, "
           "and leaves a round with drops out of the ratio. ").format(**cl)
    run = cl.get("run")
    out += PRE_STEERING.format(**cl) + (
        f" Measured {run['date']} at {run['git']}." if run else "") + \
        "\n\nLoad average (1 min) after each round: " + \
        ", ".join(f"{x:.1f}" for x in cl["loadavg"]) + ".\n\n"
    rows = []
    for v in cl["table"].values():
        fails = ", ".join(f"{k} {n}" for k, n in sorted(v["fails"].items())) or "–"
        rows.append([v["label"], num(v["rps"]), ms(v["p99_ms"]), ms(v["max_ms"]),
                     f"{num(v['failed'])} of {num(v['ok'] + v['failed'])}", fails,
                     num(v["slot_restarts"]), num(v.get("ct_drops")),
                     f"{v.get('ct_waited_s', 0):.0f} s"])
    out += table(["system", "req/s", "p99 (median of rounds)", "max (any round)", "failed",
                  "failed by kind", f"slot {cl['slot']} restarts during the runs",
                  "conntrack drops", "waited for conntrack"], rows)
    x, txt = _loop_ratio(cl)
    out += (f"\np99 ratio crash-looping ÷ healthy, the median of the per-round ratios over the "
            f"{cl.get('clean_rounds', '–')} of {cl['rounds']} rounds without conntrack drops "
            f"(interquartile range from 4 rounds): **{txt}** (target ≤ 2×).\n")
    return out
