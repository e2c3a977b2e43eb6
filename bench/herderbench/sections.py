"""The sections of the suite (issue 7; section 9, recycling, lives in recycle.py, section 10,
sticky sessions, in sticky.py). Each returns
a plain dict for report.py; a system that cannot be started, or lacks a feature, is recorded
under "missing" with the reason."""
import os
import random
import shutil
import signal
import time

from . import load
from .measure import idle, median
from .procs import (CLK_TCK, DgramListener, Unavailable, held_connections, kill, now, rss_kib,
                    starttime, wait_until)
from .recycle import s9_recycle
from .sticky import s10_sticky
from .systems import (BareFd, BareReuseport, Gunicorn, Herder, NodeCluster, Pm2, Tini)

MODES = ("keepalive", "close")


def _start_all(ctx, makers):
    started, missing = {}, {}
    for key, mk in makers:
        s = mk()
        ctx.log(f"  start {s.label}")
        try:
            s.start()
            started[key] = s
        except (Unavailable, OSError) as e:
            missing[key] = {"label": s.label, "reason": str(e)}
            ctx.log(f"  missing {s.label}: {e}")
            s.stop()
    return started, missing


def _throughput(ctx, name, makers, refs):
    """Start every system, then alternate wrk runs between them, rotating the order each round;
    medians per system and mode; ratios of every system against every reference."""
    c = ctx.cfg
    started, missing = _start_all(ctx, makers)
    runs = {k: {m: [] for m in MODES} for k in started}
    loads = []
    try:
        for s in started.values() if c["warmup"] else ():  # warm-up, not recorded
            try:
                load.wrk(s.port, max(1, c["dur"] // 2), c["conns"], True)
            except Unavailable:
                pass
        for r in range(c["rounds"]):
            keys = list(started)
            order = keys[r % len(keys):] + keys[:r % len(keys)] if keys else []
            for mode in MODES:
                for k in order:
                    if k in missing:
                        continue
                    try:
                        started[k]._check_alive()
                        runs[k][mode].append(load.wrk(started[k].port, c["dur"], c["conns"],
                                                      mode == "keepalive"))
                    except Unavailable as e:
                        missing[k] = {"label": started[k].label, "reason": str(e)}
            loads.append(float(open("/proc/loadavg").read().split()[0]))
            ctx.log(f"  {name} round {r + 1}/{c['rounds']} (load average {loads[-1]})")
    finally:
        for s in started.values():
            s.stop()
    table = {}
    for k, s in started.items():
        if k in missing:
            continue
        table[k] = {"label": s.label}
        for mode in MODES:
            rs = runs[k][mode]
            table[k][mode] = {
                "rps": median([x["rps"] for x in rs]),
                "p99_ms": median([x["p99_ms"] for x in rs]),
                "errors": sum(x["errors"] + x["non2xx"] for x in rs),
                "rounds": [x["rps"] for x in rs],
            }
    ratios, spread = {}, {}
    for k in table:
        for ref in refs:
            if ref in table and ref != k:
                for mode in MODES:
                    # per-round ratios (A and B ran back to back), then their median
                    a, b = table[k][mode]["rounds"], table[ref][mode]["rounds"]
                    rr = [x / y for x, y in zip(a, b) if x and y]
                    ratios.setdefault(k, {}).setdefault(ref, {})[mode] = median(rr)
                    if rr:
                        q = sorted(rr)
                        spread.setdefault(k, {}).setdefault(ref, {})[mode] = (
                            q[len(q) // 4], q[(3 * len(q)) // 4])
    return {"table": table, "ratios": ratios, "spread": spread, "loadavg": loads,
            "missing": missing,
            "n": c["n"], "rounds": c["rounds"], "dur": c["dur"], "conns": c["conns"]}


def s1_request_path(ctx):
    n, demo = ctx.cfg["n"], [ctx.demo]
    return _throughput(ctx, "request path", [
        ("herder", lambda: Herder(ctx, n, demo)),
        ("herder_reuseport", lambda: Herder(ctx, n, demo, reuseport=True)),
        ("bare_fd", lambda: BareFd(ctx, n, demo, "bare: N × demo on one fd (bare-launch.py)")),
        ("bare_reuseport", lambda: BareReuseport(ctx, n)),
    ], refs=["bare_fd", "bare_reuseport"])


def _node_app(ctx):
    return [ctx.node or "node", os.path.join(ctx.apps, "node-app.js")]


def _node_ready(ctx):
    """node-app.js reports READY=1 through systemd-notify(1) when that exists."""
    return "notify" if shutil.which("systemd-notify") else "exec"


def s2_peers(ctx):
    n, app = ctx.cfg["n"], _node_app(ctx)
    return _throughput(ctx, "node peers", [
        ("herder", lambda: Herder(ctx, n, app, ready=_node_ready(ctx),
                                  label="herder (node app)")),
        ("herder_reuseport", lambda: Herder(ctx, n, app, reuseport=True, ready=_node_ready(ctx),
                                            label="herder --reuseport (node app)")),
        ("bare_fd", lambda: BareFd(ctx, n, app, "bare: N × node app on one fd")),
        ("cluster_rr", lambda: NodeCluster(ctx, n, "rr")),
        ("cluster_none", lambda: NodeCluster(ctx, n, "none")),
        ("pm2", lambda: Pm2(ctx, n)),
    ], refs=["cluster_rr", "cluster_none", "pm2", "bare_fd"])


def _event_makers(ctx, restart_flags, exec_variant=False):
    n, demo, app = ctx.cfg["n"], [ctx.demo], _node_app(ctx)
    nr = _node_ready(ctx)
    extra = [("herder_node_exec", lambda: Herder(
        ctx, n, app, ready="exec", extra=restart_flags,
        label="herder (node app, --ready exec)"))] if exec_variant and nr != "exec" else []
    return [
        ("herder_demo", lambda: Herder(ctx, n, demo, ready="notify", extra=restart_flags,
                                       label="herder (herder-demo, --ready notify)")),
        ("herder_reuseport_demo", lambda: Herder(ctx, n, demo, reuseport=True, ready="notify",
                                                 extra=restart_flags,
                                                 label="herder --reuseport (herder-demo)")),
        ("herder_node", lambda: Herder(ctx, n, app, ready=nr, extra=restart_flags,
                                       label=f"herder (node app, --ready {nr})")),
        *extra,
        ("cluster_rr", lambda: NodeCluster(ctx, n, "rr")),
        ("cluster_none", lambda: NodeCluster(ctx, n, "none")),
        ("pm2", lambda: Pm2(ctx, n)),
        ("gunicorn", lambda: Gunicorn(ctx, n)),
    ]


def _under_load(ctx, makers, events, act):
    """For each system in turn: start it, run bench/loadclient.py (new connection per request)
    while act(system) happens `events` times, stop. Failed requests per event."""
    c = ctx.cfg
    out, missing = {}, {}
    for key, mk in makers:
        s = mk()
        ctx.log(f"  {s.label}")
        try:
            s.start()
        except (Unavailable, OSError) as e:
            missing[key] = {"label": s.label, "reason": str(e)}
            ctx.log(f"  missing {s.label}: {e}")
            s.stop()
            continue
        client = None
        row = {"label": s.label, "done": 0, "durations": [], "error": None}
        try:
            row["rss_before_kib"] = rss_kib(s.manager_pid()) if s.manager_pid() else None
            client = load.Client(s.port, c["event_conns"], False, duration=900,
                                 timeout=c["req_timeout"])
            time.sleep(c["event_gap"])
            for _ in range(events):
                t = now()
                act(s, row)
                row["durations"].append(now() - t)
                row["done"] += 1
                time.sleep(c["event_gap"])
        except (Unavailable, OSError) as e:
            row["error"] = str(e)
            ctx.log(f"    stopped early: {e}")
        finally:
            if client:
                res = client.stop()
                row.update(ok=res["ok"], failed=res["failed"], fails=res["fails"],
                           examples=res["examples"], p99_ms=res.get("p99_ms"),
                           max_ms=res.get("max_ms"), rps=res.get("rps"))
            row["rss_after_kib"] = rss_kib(s.manager_pid()) if s.manager_pid() else None
            s.stop()
        row["per_event"] = row["failed"] / row["done"] if row.get("done") else None
        row["duration_median_s"] = median(row["durations"])
        del row["durations"]
        if row.get("recoveries"):
            row["recovery_median_s"] = median(row["recoveries"])
            row["recovery_max_s"] = max(row.pop("recoveries"))
        out[key] = row
        ctx.log(f"    {row['done']} events, {row.get('ok')} ok, {row.get('failed')} failed "
                f"{row.get('fails')}")
    return {"table": out, "missing": missing, "events": events, "conns": c["event_conns"],
            "timeout": c["req_timeout"], "n": c["n"]}


def s3_reload(ctx):
    def act(s, row):
        before = set(s.workers())
        s.reload()
        # A reload is over when none of the old workers is left (they drain after their
        # replacement is ready); this also proves the reload replaced them.
        if before and not wait_until(lambda: not (set(s.workers()) & before), 30, 0.02):
            row["not_replaced"] = row.get("not_replaced", 0) + 1
    return _under_load(ctx, _event_makers(ctx, [], exec_variant=True), ctx.cfg["reloads"], act)


def s4_crash(ctx):
    rng = random.Random(7)
    # herder's default restart limit (10 in 60 s) would stop the pool during this section.
    flags = ["--restart-limit", "100000"]

    def served(pid):
        """Seconds since the worker started (its start time against the system's uptime)."""
        st = starttime(pid)
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
        return up - st / CLK_TCK if st is not None else 0.0

    def act(s, row):
        # The victim is a worker that has served a while (>= 1.5 s): what a kill -9 or the OOM
        # killer hits in production. herder replaces such a worker at once and backs off only
        # for one that dies young (a start-up crash loop); the same victims for every system.
        old = wait_until(lambda: [p for p in s.workers() if served(p) >= 1.5], 30, 0.01)
        if not old:
            raise Unavailable("no worker to kill")
        victim = rng.choice(old)
        # Freeze the victim so that the connections it holds can be counted exactly, then
        # kill it: those are the requests a crash at that instant loses.
        kill(victim, signal.SIGSTOP)
        held = held_connections(victim, s.port)
        kill(victim, signal.SIGKILL)
        killed = now()
        # Polled every millisecond: the recovery being measured is a few milliseconds.
        s.wait_workers(s.n, exclude=[victim], timeout=30, step=0.001)
        row.setdefault("recoveries", []).append(now() - killed)
        if held is not None:
            row["held"] = row.get("held", 0) + held
    return _under_load(ctx, _event_makers(ctx, flags), ctx.cfg["kills"], act)


def s5_weight(ctx):
    c = ctx.cfg
    trivial = [ctx.notify_sleep]
    app = _node_app(ctx)
    makers = [(f"herder_{k}", k, (lambda k=k: Herder(ctx, k, trivial, http=False,
                                                      label="herder")))
              for k in c["weight_sizes"]]
    for k in c["peer_weight_sizes"]:
        makers += [(f"gunicorn_{k}", k, lambda k=k: Gunicorn(ctx, k)),
                   (f"cluster_{k}", k, lambda k=k: NodeCluster(ctx, k, "rr")),
                   (f"pm2_{k}", k, lambda k=k: Pm2(ctx, k))]
    makers.append(("tini_1", 1, lambda: Tini(ctx, trivial)))
    out, missing = {}, {}
    for key, k, mk in makers:
        s = mk()
        ctx.log(f"  {s.label} × {k}")
        try:
            if isinstance(s, Herder):
                s.start(ready_timeout=120)
                s.wait_workers(k, timeout=120)
            else:
                s.start()
            time.sleep(1.0)
            pid = s.manager_pid()
            row = {"label": s.label, "workers": k, **idle(pid, c["idle"])}
            row["threads"] = len(os.listdir(f"/proc/{pid}/task"))
            out[key] = row
            ctx.log(f"    RSS {row['rss_kib'] / 1024:.1f} MiB, CPU {row['cpu_ms']:.0f} ms, "
                    f"{row['wakeups']} wakeups in {row['idle_s']} s")
        except (Unavailable, OSError) as e:
            missing[key] = {"label": f"{s.label} × {k}", "reason": str(e)}
            ctx.log(f"    missing: {e}")
        finally:
            s.stop()
    gsize = max(c["peer_weight_sizes"]) if c["peer_weight_sizes"] else None
    if 1000 in c["weight_sizes"] and gsize and gsize < 1000:
        missing["peers_1000"] = {
            "label": "gunicorn / node cluster / pm2 × 1000",
            "reason": "not run: 1,000 Python or Node workers need 20-50 GiB on this 24 GiB machine"}
    return {"table": out, "missing": missing, "idle": c["idle"]}


def _new_ready(msg, old):
    """A probe datagram "ready <pid>" from a worker not in `old`."""
    parts = msg.split()
    return len(parts) == 2 and parts[0] == "ready" and int(parts[1]) not in old


def s6_scale(ctx):
    c = ctx.cfg
    out = {"start": {}, "replace": None, "mass": None, "missing": {}}
    probe = DgramListener(os.path.join(ctx.tmp, "probe.sock"))
    env = {"BENCH_PROBE_SOCKET": probe.path}
    flags = ["--restart-limit", "100000"]
    try:
        for k in c["scale_sizes"]:
            times = []
            for _ in range(c["scale_rounds"]):
                s = Herder(ctx, k, [ctx.notify_sleep], ready="notify", extra=flags, http=False,
                           env=env)
                try:
                    s.start(ready_timeout=120)
                    times.append(s.ready_at - s.t_start)
                except (Unavailable, OSError) as e:
                    out["missing"][f"start_{k}"] = {"label": f"start with {k}", "reason": str(e)}
                    break
                finally:
                    s.stop()
            out["start"][str(k)] = {"median_s": median(times), "runs": times}
            ctx.log(f"  start→READY=1 with {k} workers: {median(times)}")
        big = max(c["scale_sizes"])
        s = Herder(ctx, big, [ctx.notify_sleep], ready="notify", extra=flags, http=False,
                   env=env)
        try:
            s.start(ready_timeout=120)
            s.wait_workers(big, timeout=60)
            rng = random.Random(6)
            reps = []
            for _ in range(c["kills"]):
                mark = probe.mark()
                before = set(s.workers())
                victim = rng.choice(sorted(before))
                t = now()
                kill(victim, signal.SIGKILL)
                got = probe.wait_for(lambda m: _new_ready(m, before), mark, 30)
                if got is None:
                    raise Unavailable("no replacement reported ready within 30 s")
                reps.append(got[0] - t)
                time.sleep(0.3)
            out["replace"] = {"median_s": median(reps), "max_s": max(reps), "runs": reps,
                              "workers": big}
            ctx.log(f"  death→replacement ready: {median(reps)}")
            victims = s.workers()
            old = set(victims)
            mark = probe.mark()
            nmark = s.notify.mark()
            t = now()
            for v in victims:
                kill(v, signal.SIGKILL)
            whole = probe.wait_count(lambda m: _new_ready(m, old), len(victims), mark,
                                    120)
            ready_again = s.notify.wait_for(lambda m: m == "READY=1", nmark, 1.0)
            out["mass"] = {"workers": len(victims),
                           "whole_s": (whole - t) if whole else None,
                           "herder_alive": s.procs[0].running(),
                           "ready_again": bool(ready_again)}
            if whole is None:
                out["mass"]["note"] = (f"only {probe.mark() - mark} of {len(victims)} "
                                       "replacements reported ready within 120 s")
            ctx.log(f"  mass kill of {len(victims)}: {out['mass']}")
        except (Unavailable, OSError) as e:
            out["missing"]["reaction"] = {"label": "death→replacement / mass kill",
                                          "reason": str(e)}
        finally:
            s.stop()
    finally:
        probe.close()
    return out


def s7_fairness(ctx):
    c = ctx.cfg
    n, demo = c["n"], [ctx.demo]
    makers = [("herder", lambda: Herder(ctx, n, demo)),
              ("herder_reuseport", lambda: Herder(ctx, n, demo, reuseport=True)),
              ("bare_reuseport", lambda: BareReuseport(ctx, n))]
    started, missing = _start_all(ctx, makers)
    rows = {k: {m: [] for m in MODES} for k in started}
    try:
        for r in range(c["fair_rounds"]):
            for mode in MODES:
                for k, s in started.items():
                    conns = c["conns"] if mode == "keepalive" else c["event_conns"]
                    res = load.client_run(s.port, c["fair_dur"], conns, mode == "keepalive")
                    counts = {}
                    for body, cnt in res["bodies"].items():
                        pid = body.split()[0]
                        counts[pid] = counts.get(pid, 0) + cnt
                    total = sum(counts.values()) or 1
                    shares = sorted((v / total for v in counts.values()), reverse=True)
                    shares += [0.0] * (n - len(shares))
                    rows[k][mode].append(shares)
    finally:
        for s in started.values():
            s.stop()
    table = {}
    for k, s in started.items():
        table[k] = {"label": s.label}
        for mode in MODES:
            tops = [sh[0] for sh in rows[k][mode]]
            table[k][mode] = {"max_share": max(tops) if tops else None,
                              "median_top": median(tops), "rounds": rows[k][mode]}
    return {"table": table, "missing": missing, "n": n, "rounds": c["fair_rounds"],
            "dur": c["fair_dur"], "conns_keepalive": c["conns"],
            "conns_close": c["event_conns"]}


SECTIONS = [
    ("1", "request_path", s1_request_path),
    ("2", "peers", s2_peers),
    ("3", "reload", s3_reload),
    ("4", "crash", s4_crash),
    ("5", "weight", s5_weight),
    ("6", "scale", s6_scale),
    ("7", "fairness", s7_fairness),
    # 8 is the chaos soak, a run of its own (bench/run --soak), carried into RESULTS.md.
    ("9", "recycle", s9_recycle),
    ("10", "sticky", s10_sticky),
]
