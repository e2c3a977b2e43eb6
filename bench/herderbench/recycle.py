"""Section 9 (issue 12): worker recycling.

(a) The same leaking Node app (bench/apps/node-app.js with LEAK_KB: every request keeps that
many KiB) under herder `--max-memory` and under pm2 cluster mode's `--max-memory-restart`, set
to the same limit, each under the same paced load (bench/loadclient.py --rate, new connection
per request) for the same fixed time: recycles, failed requests, failed per recycle, p99 of the
ok requests, and the largest worker the suite saw (its own samples, every 0.5 s). pm2 runs at
its defaults (its memory check every 30 s) and again with its check interval lowered to
herder's 2 s through PM2_WORKER_INTERVAL, the variable its constants.js reads.

(b) herder's own CPU on an idle pool of trivial workers with `--max-memory` set (and never
reached), against the same pool without it, in the same run."""
import os
import re
import shutil
import threading
import time

from . import load
from .measure import idle
from .procs import Unavailable, descendants, free_port, http_get, rss_kib, smaps_kib
from .systems import Herder, Pm2

SAMPLE_EVERY = 0.5  # the suite's own look at the workers' memory (herder's is every 2 s)


def _tree_kib(pid):
    """(RSS, PSS) in KiB of pid and its descendants: pm2 checks one pid's RSS, herder the PSS
    of the whole tree."""
    rss = pss = 0
    for p in [pid, *descendants(pid)]:
        rss += rss_kib(p) or 0
        pss += smaps_kib(p).get("pss") or 0
    return rss, pss


class MemSampler:
    """Every SAMPLE_EVERY seconds, from a thread: each worker's tree RSS and PSS; keeps the
    largest of each and the distinct worker pids seen (a recycle shows as a new one)."""

    def __init__(self, system):
        self.system = system
        self.peak_rss = self.peak_pss = 0
        self.pids = set()
        self.stopped = threading.Event()
        self.t = threading.Thread(target=self._loop, daemon=True)
        self.t.start()

    def _loop(self):
        while not self.stopped.wait(SAMPLE_EVERY):
            for pid in self.system.workers():
                rss, pss = _tree_kib(pid)
                self.pids.add(pid)
                self.peak_rss = max(self.peak_rss, rss)
                self.peak_pss = max(self.peak_pss, pss)

    def stop(self):
        self.stopped.set()
        self.t.join(5)
        return {"peak_rss_kib": self.peak_rss or None, "peak_pss_kib": self.peak_pss or None,
                "workers_seen": len(self.pids)}


def _oncpu_ns(pid):
    """Nanoseconds pid's threads have been on a CPU (/proc/PID/task/*/schedstat, first field):
    utime + stime without the 10 ms clock tick, so that a few milliseconds over the idle window
    show. Threads that have exited are not in it (herder runs one thread: see "threads")."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total


def _herder_recycles(health_port):
    """herder_recycles_total{reason="memory"} from herder's /metrics."""
    body = http_get(health_port, 5.0, "/metrics")
    m = re.search(r'^herder_recycles_total\{reason="memory"\} (\d+)', body or "", re.M)
    if not m:
        raise Unavailable("herder's /metrics has no herder_recycles_total{reason=\"memory\"}")
    return int(m.group(1))


def _pm2_memory_lines(s):
    return s.daemon_log().count("exceeds --max-memory-restart")


def _pm2_interval_ms(s):
    """The check interval pm2's daemon says it runs with (pm2.log, "Worker Interval")."""
    m = re.search(r"Worker Interval\s*:\s*(\d+)", s.daemon_log())
    return int(m.group(1)) if m else None


def _leak_makers(ctx):
    c = ctx.cfg
    n, limit = c["n"], c["recycle_limit"]
    app = [ctx.node or "node", os.path.join(ctx.apps, "node-app.js")]
    leak = {"LEAK_KB": str(c["recycle_leak_kb"])}
    # As in sections 2-4: node-app.js reports READY=1 through systemd-notify(1) when it exists.
    ready = "notify" if shutil.which("systemd-notify") else "exec"

    def herder():
        health = free_port()
        s = Herder(ctx, n, app, ready=ready, env=leak,
                   extra=["--max-memory", limit, "--health", f"127.0.0.1:{health}"],
                   label=f"herder --max-memory {limit} (node app, --ready {ready})")
        s.count = lambda: _herder_recycles(health)
        return s

    def pm2(interval_ms):
        env = dict(leak, **({"PM2_WORKER_INTERVAL": str(interval_ms)} if interval_ms else {}))
        how = (f"PM2_WORKER_INTERVAL={interval_ms}, as often as herder" if interval_ms
               else "defaults")
        s = Pm2(ctx, n, extra=["--max-memory-restart", limit], env=env,
                label=f"pm2 cluster --max-memory-restart {limit} ({how})")
        s.count = s.restarts
        return s

    makers = [("herder", herder)]
    if c["recycle_pm2_default"]:
        makers.append(("pm2_default", lambda: pm2(None)))
    makers.append(("pm2_fast", lambda: pm2(c["recycle_pm2_interval_ms"])))
    return makers


def _leak_run(ctx, s):
    """One system: start, settle, paced load for the fixed time with the memory sampler on,
    recycles counted over exactly that window."""
    c = ctx.cfg
    s.start()
    time.sleep(0.5)
    row = {"label": s.label}
    if isinstance(s, Pm2):
        row["check"] = "RSS of the worker's pid"
        row["check_interval_ms"] = _pm2_interval_ms(s)
        lines0 = _pm2_memory_lines(s)
    else:
        row["check"] = "PSS of the worker's process tree"
        row["check_interval_ms"] = 2000  # MEASURE_EVERY in src/pool/recycle.rs
    before = s.count()
    sampler = MemSampler(s)
    client = load.Client(s.port, c["recycle_conns"], False, duration=c["recycle_dur"],
                         timeout=c["req_timeout"], rate=c["recycle_rate"])
    try:
        res = client.wait()
    finally:
        row.update(sampler.stop())
    # Counted the moment the load ends: a recycle started later saw no load.
    row["recycles"] = s.count() - before
    if isinstance(s, Pm2):
        row["memory_lines"] = _pm2_memory_lines(s) - lines0
    s._check_alive()
    row.update(ok=res["ok"], failed=res["failed"], fails=res["fails"],
               examples=res["examples"], fail_times=res["fail_times"][:20],
               p50_ms=res.get("p50_ms"), p99_ms=res.get("p99_ms"),
               max_ms=res.get("max_ms"), rps=res.get("rps"), elapsed_s=res.get("elapsed"))
    row["per_recycle"] = row["failed"] / row["recycles"] if row["recycles"] else None
    ctx.log(f"    {row['recycles']} recycles, {row['ok']} ok, {row['failed']} failed "
            f"{row['fails']}, p99 {row['p99_ms']} ms, peak worker RSS "
            f"{(row['peak_rss_kib'] or 0) / 1024:.0f} MiB")
    return row


def _cpu_runs(ctx):
    """herder's CPU (utime + stime of its own process, /proc/PID/stat) idle with
    --max-memory 1G on k trivial workers, against the same pool without the flag."""
    c = ctx.cfg
    k = c["recycle_cpu_workers"]
    out, missing = {}, {}
    for key, extra, label in (("without", [], "herder, no limit"),
                              ("with", ["--max-memory", "1G"], "herder --max-memory 1G")):
        s = Herder(ctx, k, [ctx.notify_sleep], http=False, extra=extra, label=label)
        ctx.log(f"  {label} × {k}, idle {c['recycle_idle']} s")
        try:
            s.start(ready_timeout=120)
            s.wait_workers(k, timeout=120)
            time.sleep(1.0)
            pid, workers = s.manager_pid(), set(s.workers())
            ns0 = _oncpu_ns(pid)
            row = {"label": label, "workers": k, **idle(pid, c["recycle_idle"])}
            ns1 = _oncpu_ns(pid)
            row["oncpu_us"] = (ns1 - ns0) / 1000 if None not in (ns0, ns1) else None
            row["threads"] = len(os.listdir(f"/proc/{pid}/task"))
            row["same_workers"] = set(s.workers()) == workers
            out[key] = row
            ctx.log(f"    CPU {row['cpu_ms']:.0f} ms ({row['oncpu_us']} µs on CPU) in "
                    f"{row['idle_s']} s ({row['cpu_pct']:.3f}% of a core), "
                    f"{row['wakeups']} wakeups")
        except (Unavailable, OSError) as e:
            missing[f"cpu_{key}"] = {"label": f"{label} × {k}", "reason": str(e)}
            ctx.log(f"    missing: {e}")
        finally:
            s.stop()
    w, wo = out.get("with"), out.get("without")
    # No ratio when herder without the limit did not run at all (0 / 0 wakeups): the report
    # says so instead of dividing by zero.
    ratio = None
    if w and wo and wo.get("oncpu_us"):
        ratio = w["oncpu_us"] / wo["oncpu_us"]
    return {"table": out, "missing": missing, "ratio": ratio, "workers": k,
            "idle": c["recycle_idle"]}


def s9_recycle(ctx):
    c = ctx.cfg
    table, missing = {}, {}
    for key, mk in _leak_makers(ctx):
        s = mk()
        ctx.log(f"  {s.label}")
        try:
            table[key] = _leak_run(ctx, s)
        except (Unavailable, OSError) as e:
            missing[key] = {"label": s.label, "reason": str(e)}
            ctx.log(f"    missing: {e}")
        finally:
            s.stop()
    ratios = {}
    h = table.get("herder")
    for key in ("pm2_default", "pm2_fast"):
        p = table.get(key)
        if not (h and p):
            continue
        ratios[key] = {
            "per_recycle": (h["per_recycle"] / p["per_recycle"]
                            if h["per_recycle"] is not None and p["per_recycle"] else None),
            "p99": h["p99_ms"] / p["p99_ms"] if h["p99_ms"] and p["p99_ms"] else None,
            "peak_rss": (h["peak_rss_kib"] / p["peak_rss_kib"]
                         if h["peak_rss_kib"] and p["peak_rss_kib"] else None),
        }
    cpu = _cpu_runs(ctx)
    missing.update(cpu.pop("missing"))
    return {"table": table, "ratios": ratios, "cpu": cpu, "missing": missing,
            "n": c["n"], "limit": c["recycle_limit"], "leak_kb": c["recycle_leak_kb"],
            "rate": c["recycle_rate"], "dur": c["recycle_dur"], "conns": c["recycle_conns"],
            "timeout": c["req_timeout"], "pm2_interval_ms": c["recycle_pm2_interval_ms"]}
