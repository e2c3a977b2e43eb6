"""Measurements shared by several sections: medians, and a manager process's weight while
nothing happens (sections 5 and 9)."""
import statistics
import time

from .procs import CLK_TCK, cpu_ticks, now, rss_kib, smaps_kib


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ctx_switches(pid):
    n = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    n += int(line.split()[1])
    except OSError:
        return None
    return n


def idle(pid, seconds):
    """RSS (max over the window) and CPU of pid while nothing happens for `seconds`."""
    t0, c0, w0 = now(), cpu_ticks(pid), ctx_switches(pid)
    rss = [rss_kib(pid)]
    while (left := seconds - (now() - t0)) > 0:
        time.sleep(min(1.0, left))
        rss.append(rss_kib(pid))
    dt = now() - t0
    c1, w1 = cpu_ticks(pid), ctx_switches(pid)
    sm = smaps_kib(pid)
    return {"rss_kib": max(r for r in rss if r is not None),
            "pss_kib": sm.get("pss"), "anon_kib": sm.get("anonymous"),
            "cpu_pct": (c1 - c0) / CLK_TCK / dt * 100 if None not in (c0, c1) else None,
            "cpu_ms": (c1 - c0) * 1000 / CLK_TCK if None not in (c0, c1) else None,
            "wakeups": (w1 - w0) if None not in (w0, w1) else None, "idle_s": round(dt, 1)}
