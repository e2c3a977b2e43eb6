"""The soak's reports: the human summary printed on stdout and soak.md, a section ready to paste
into bench/RESULTS.md. Pure formatting of the result dict; measures nothing, decides nothing.
"""
import os
import time

from . import FDS_PER_DGRAM, HUP_BURST, HUP_EVERY, HUP_SPREAD, IDLE_CONNS, KILL_EVERY, \
    LOAD_THREADS, POOL, PROBE_EVERY, PROBE_TIMEOUT, SCALE_MAX, SCALE_MIN


def counts(d):
    """{kind: count} as "kind n, ...", the most frequent first."""
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "none"


def _notify_line(tally):
    parts = []
    for kind, outcomes in sorted(tally.items()):
        if isinstance(outcomes, dict):
            parts.append(f"{kind}: {counts(outcomes)}")
        else:
            parts.append(f"{kind}: {outcomes}")
    return "; ".join(parts) or "none"


def summary(r):
    """The human summary (stdout)."""
    L = []
    a = L.append
    a(f"herder chaos soak: {r['chaos_seconds']:.0f} s of chaos (--minutes {r['minutes']:g}),"
      f" {r['warmup_s']:.0f} s warm-up before the baseline")
    a(f"  herder: {' '.join(os.path.basename(x) if i == 0 else x for i, x in enumerate(r['argv']))}")
    if r["without"]:
        a(f"  left out: {', '.join(r['without'])} (not a full soak)")
    for n in r["notes"]:
        a(f"  note: {n}")
    a("done:")
    a(f"  kill -9 of a worker: {r['kills']} (no worker to kill: {r['no_worker_to_kill']} times)")
    a(f"  SIGHUP storms: {r['hup_storms']} ({r['hups']} SIGHUPs)")
    s = r["scale"]
    a(f"  scale steps: {s['up']} TTIN, {s['down']} TTOU, {s['to']} scale-to-{POOL}"
      f" ({r['scale_errors']} failed)")
    a(f"  notify attack rounds: {r['notify_rounds']} (worker without NOTIFY_SOCKET: "
      f"{r['notify_no_address']})")
    for who in ("root", "nobody"):
        if r["notify"][who]:
            a(f"    as {who}: {_notify_line(r['notify'][who])}")
    a(f"  control socket: {_notify_line(r['control'])}")
    p, i = r["probes"], r["idle"]
    a(f"  health probes: {p.get('count')} (/livez {p.get('by_route', {}).get('/livez')}, "
      f"/readyz {p.get('by_route', {}).get('/readyz')}); idle connections held: up to "
      f"{i.get('max_held')}, opened {i.get('opened')}, renewed {i.get('renewed')}, connect "
      f"failed: {counts(i.get('connect_failed', {}))}")
    a("results:")
    ld = r["load"]
    a(f"  requests: {ld['ok']} ok, {ld['refused']} refused, {sum(ld['failed'].values())} "
      f"failed ({counts(ld['failed'])})")
    a(f"  probes: {p.get('late')} not answered within {PROBE_TIMEOUT:.0f} s; latency p50 "
      f"{p.get('p50_ms')} ms, p99 {p.get('p99_ms')} ms, max {p.get('max_ms')} ms; "
      f"answers: {counts(p.get('kinds', {}))}")
    for ex in p.get("late_examples", [])[:3]:
        a(f"    e.g. {ex['route']} {ex['kind']} after {ex['ms']} ms at "
          f"{time.strftime('%H:%M:%S', time.localtime(ex['t']))} ({ex['idle_held']} idle "
          "connections held)")
    b, f = r["baseline"], r["final"]
    a(f"  herder fds: baseline {b.get('fds')}, final {f.get('fds')}, max seen {r['max_fds']} "
      f"(/dev/null: {b.get('devnull_fds')} -> {f.get('devnull_fds')}); RLIMIT_NOFILE "
      f"{r.get('herder_nofile')}")
    a(f"  herder RSS: baseline {b.get('rss_kib')} KiB, final {f.get('rss_kib')} KiB, max seen "
      f"{r['max_rss_kib']} KiB")
    a(f"  herder children: max {r['max_children']}; zombies: {len(r['zombies'])}; "
      f"leftovers: {len(r['leftovers'])}")
    a(f"  exit status after SIGTERM: {r['exit_status']} ({r['term_seconds']} s)")
    hl = r.get("herder_log", {})
    a(f"  herder's log: acted on forged STOPPING=1 {hl.get('acted on STOPPING=1')} and "
      f"WATCHDOG=trigger {hl.get('acted on WATCHDOG=trigger')} times (from senders already "
      f"gone); dropped: foreign senders {hl.get('dropped foreign senders')} (logged once per "
      f"worker), oversized {hl.get('dropped oversized')}; ERROR lines {hl.get('errors')}, "
      f"panics {hl.get('panics')}")
    for e in hl.get("error_examples", [])[:3]:
        a(f"    {e}")
    a("checks:")
    for c in r["checks"]:
        mark = "skip" if c.get("skipped") else "ok" if c["ok"] else "FAIL"
        a(f"  [{mark}] {c['name']}: {c['detail']}")
    failed = [c["name"] for c in r["checks"] if not c["ok"]]
    a("soak: PASS" if r["pass"] else f"soak: FAIL ({'; '.join(failed)})")
    return "\n".join(L) + "\n"


def markdown(r, machine):
    """soak.md: a section ready to paste into bench/RESULTS.md."""
    b, f, p, ld = r["baseline"], r["final"], r["probes"], r["load"]
    L = [f"## Chaos soak ({r['chaos_seconds'] / 60:.1f} min): "
         f"{'PASS' if r['pass'] else 'FAIL'}", ""]
    L.append(f"`bench/run --soak --minutes {r['minutes']:g}` at {machine.get('git')} "
             f"({machine.get('herder')}), {machine.get('date')}, load average "
             f"{' '.join(machine.get('loadavg', []))} -> {' '.join(machine.get('loadavg_end', []))}."
             " One herder, `-w 4 --ready notify --restart-limit 100000 --drain-timeout 5s`, "
             "herder-demo workers; what bench/README.md (\"The soak\") describes, all at once:")
    if r["without"]:
        L.append(f"\n**Left out: {', '.join(r['without'])}** — not a full soak.")
    L.append("")
    s = r["scale"]
    L.append("| chaos | count |\n|---|---|")
    L.append(f"| kill -9 of a random worker (every {KILL_EVERY * 1000:.0f} ms) | {r['kills']:,} |")
    L.append(f"| SIGHUP storms ({HUP_BURST} in {HUP_SPREAD * 1000:.0f} ms, every "
             f"{HUP_EVERY:.0f} s) | {r['hup_storms']} ({r['hups']} SIGHUPs) |")
    L.append(f"| TTIN / TTOU (pool {SCALE_MIN}..{SCALE_MAX}) | {s['up']} / {s['down']} |")
    L.append(f"| notify attack rounds (random, 64 KiB, forged READY/STOPPING/WATCHDOG=trigger, "
             f"{FDS_PER_DGRAM} fds, forged from an exited sender) | {r['notify_rounds']:,} |")
    ctl = sum(sum(v.values()) for k, v in r["control"].items() if k != "held")
    L.append(f"| control socket requests (garbage, > 4 KiB, status) + held connections | {ctl:,} "
             f"+ {r['control'].get('held', {}).get('opened', 0)} |")
    L.append(f"| health probes (every {PROBE_EVERY * 1000:.0f} ms, {IDLE_CONNS} idle connections "
             f"held) | {p.get('count', 0):,} |")
    L.append(f"| requests (new connection each, {LOAD_THREADS} threads) | "
             f"{ld['ok'] + ld['refused'] + sum(ld['failed'].values()):,} |")
    L.append("")
    L.append("| check | result | |\n|---|---|---|")
    for c in r["checks"]:
        mark = "skipped" if c.get("skipped") else "ok" if c["ok"] else "**FAIL**"
        L.append(f"| {c['name']} | {mark} | {c['detail']} |")
    L.append("")
    L.append(f"Requests: {ld['ok']:,} ok, {ld['refused']} refused, failed by kind: "
             f"{counts(ld['failed'])} (failures of requests in flight on a killed worker are "
             "expected; refusals are not). Probe latency p50 "
             f"{p.get('p50_ms')} ms, p99 {p.get('p99_ms')} ms, max {p.get('max_ms')} ms. "
             f"herder's peak during the chaos: {r['max_fds']} fds, {r['max_rss_kib']} KiB RSS, "
             f"{r['max_children']} children.")
    return "\n".join(L) + "\n"
