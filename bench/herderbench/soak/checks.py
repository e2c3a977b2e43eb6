"""The verdicts of the soak: each check against its bound (the numbers in `__init__`), with the
figures that decided it. Only reads the result; the measuring is done in `phases`.
"""
from . import DRAIN_TIMEOUT, FD_SLACK, POOL, PROBE_TIMEOUT, RSS_SLACK_FRACTION, RSS_SLACK_KIB, \
    ZOMBIE_GRACE
from .report import counts


def checks(r, without):
    """The list of checks of one result r, in report order; `without` are the parts left out."""
    b, f = r["baseline"], r["final"]
    out = []

    def check(name, ok, detail, skipped=False):
        out.append({"name": name, "ok": bool(ok), "detail": detail, "skipped": skipped})

    check("herder alive", r["alive_at_end"],
          "alive when the chaos stopped" if r["alive_at_end"]
          else f"exited during the soak, status {r['exit_status']}")
    check("pool whole", f.get("whole"),
          f"{POOL} slots ready within the deadline: {f.get('pool', 'not measured')}")
    if "load" in without:
        check("no connection refused", True, "not checked: no load ran", skipped=True)
    else:
        check("no connection refused", r["load"]["refused"] == 0,
              f"{r['load']['refused']} of "
              f"{r['load']['ok'] + r['load']['refused'] + sum(r['load']['failed'].values())}"
              " connections refused")
    check("no zombie", not r["zombies"],
          f"{len(r['zombies'])} zombie children of herder (unreaped for {ZOMBIE_GRACE:.0f} s"
          f" or more) in {r['zombie_samples']} samples")
    if b.get("fds") is not None and f.get("fds") is not None:
        bound = b["fds"] + FD_SLACK
        check("fds did not grow", f["fds"] <= bound,
              f"baseline {b['fds']}, final {f['fds']} (bound {bound} = baseline + {FD_SLACK})"
              f"; /dev/null among them: {b['devnull_fds']} -> {f['devnull_fds']}")
    else:
        check("fds did not grow", False, "not measured (herder gone or no baseline)")
    if b.get("rss_kib") and f.get("rss_kib"):
        bound = b["rss_kib"] + max(RSS_SLACK_KIB, int(b["rss_kib"] * RSS_SLACK_FRACTION))
        check("RSS did not grow", f["rss_kib"] <= bound,
              f"baseline {b['rss_kib']} KiB, final {f['rss_kib']} KiB (bound {bound} KiB = "
              f"baseline + max({RSS_SLACK_KIB} KiB, {RSS_SLACK_FRACTION:.0%}))")
    else:
        check("RSS did not grow", False, "not measured (herder gone or no baseline)")
    p = r["probes"]
    check("every probe answered within 1 s", p.get("count") and p.get("late") == 0,
          f"{p.get('late', '?')} of {p.get('count', '?')} probes not answered within "
          f"{PROBE_TIMEOUT:.0f} s (max {p.get('max_ms')} ms; {counts(p.get('kinds', {}))})")
    code = r["exit_status"]
    check("SIGTERM stops herder", r["alive_at_end"] and code in (0, 3),
          f"exit status {code} after {r['term_seconds']} s (0 or 3 within "
          f"{DRAIN_TIMEOUT + 15} s)" if r["alive_at_end"] else "herder was already gone")
    check("nothing left running", not r["leftovers"],
          f"{len(r['leftovers'])} processes with the run's tag after herder exited"
          + (": " + "; ".join(f"{x['pid']} {x['cmdline'][:60]}" for x in r["leftovers"][:5])
             if r["leftovers"] else ""))
    return out
