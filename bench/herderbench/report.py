"""RESULTS.md and results.svg from the results dict of one run (hand-written SVG, no deps)."""
import os
from html import escape

from .fmt import missing_lines, mib, ms, num, pct, ratio, secs, table
from .sticky import STICKY_INTRO, sticky_headline, sticky_section

TARGETS = "issues 7, 12 and 13"


def _rq(sec, a, b, mode):
    """The ratio with the interquartile range of the per-round ratios."""
    x = _ratio_of(sec, a, b, mode)
    sp = (sec.get("spread", {}).get(a, {}).get(b, {}) or {}).get(mode)
    if x is None or not sp or len(sec["table"][a][mode]["rounds"]) < 4:
        return ratio(x)
    return f"{ratio(x)} ({sp[0]:.2f}–{sp[1]:.2f})"


def _ratio_of(sec, a, b, mode):
    return (sec.get("ratios", {}).get(a, {}).get(b, {}) or {}).get(mode)


def headline(r):
    rows = []
    s = r["sections"]
    rp = s.get("request_path", {})
    for a, b, what in (("herder", "bare_fd", "herder (shared fd) vs N bare processes on one fd"),
                       ("herder_reuseport", "bare_reuseport",
                        "herder --reuseport vs N bare SO_REUSEPORT processes")):
        for mode in ("keepalive", "close"):
            x = _ratio_of(rp, a, b, mode)
            rows.append([f"{what}, {'keep-alive' if mode == 'keepalive' else 'new conn/request'}",
                         "≥ 0.98×", ratio(x), "–" if x is None else ("yes" if x >= 0.98 else "no")])
    pe = s.get("peers", {})
    for ref, tgt, name in (("cluster_rr", 2.0, "node cluster round-robin"),
                           ("pm2", 2.5, "pm2 cluster")):
        x = _ratio_of(pe, "herder", ref, "close")
        rows.append([f"herder vs {name}, node app, new conn/request", f"≥ {tgt}×", ratio(x),
                     "–" if x is None else ("yes" if x >= tgt else "no")])
    for ref, name in (("cluster_rr", "node cluster round-robin"),
                      ("cluster_none", "node cluster SCHED_NONE"), ("pm2", "pm2 cluster")):
        x = _ratio_of(pe, "herder", ref, "keepalive")
        rows.append([f"herder vs {name}, node app, keep-alive", "> 1×", ratio(x),
                     "–" if x is None else ("yes" if x > 1 else "no")])
    for key, label in (("herder_demo", "herder-demo"), ("herder_node", "node app")):
        row = s.get("reload", {}).get("table", {}).get(key)
        if row:
            rows.append([f"failed requests over {row['done']} herder reloads ({label})", "0",
                         num(row.get("failed")), "yes" if row.get("failed") == 0 and
                         row["done"] else "no"])
    for key, label in (("herder_demo", "herder-demo"),):
        row = s.get("crash", {}).get("table", {}).get(key)
        if row:
            refused = (row.get("fails") or {}).get("refused", 0)
            rows.append([f"connections refused over {row['done']} worker kills ({label})", "0",
                         num(refused), "yes" if refused == 0 and row["done"] else "no"])
            if row.get("held") is not None:
                rows.append([f"requests lost over {row['done']} kills ({label}) vs connections "
                             "the killed workers held", f"≤ {row['held']}", num(row["failed"]),
                             "yes" if row["failed"] <= row["held"] else "no"])
    w = s.get("weight", {}).get("table", {}).get("herder_64")
    if w:
        pss = f" (PSS {mib(w['pss_kib'])})" if w.get("pss_kib") else ""
        rows.append(["herder RSS, 64 workers, idle", "≤ 2.5 MiB", mib(w["rss_kib"]) + pss,
                     "yes" if w["rss_kib"] <= 2560 else "no"])
        rows.append(["herder CPU, 64 workers, idle", "0 (no polling)",
                     f"{w['cpu_ms']:.0f} ms / {w['idle_s']} s, {w['wakeups']} wakeups", "yes"
                     if w["cpu_ms"] == 0 else "no"])
    f = s.get("fairness", {}).get("table", {}).get("herder_reuseport")
    if f:
        x = max(v for v in (f["keepalive"]["max_share"], f["close"]["max_share"]) if v is not None)
        rows.append(["herder --reuseport: busiest of 2 workers, any round", "≤ 60%", pct(x),
                     "yes" if x <= 0.6 else "no"])
    rows += recycle_headline(s.get("recycle", {}))
    rows += sticky_headline(s.get("sticky", {}))
    return table(["claim", "target", "measured", "met"], rows)


def recycle_headline(sec):
    rows = []
    h = sec.get("table", {}).get("herder")
    if h:
        rows.append([f"failed requests per recycle, herder --max-memory {sec['limit']} (node app; "
                     f"{h['recycles']} recycles in {sec['dur']} s)", "0",
                     f"{num(h['per_recycle'], 2)} ({num(h['failed'])} failed)",
                     "yes" if h["recycles"] and h["failed"] == 0 else "no"])
    w = sec.get("cpu", {}).get("table", {}).get("with")
    if w:
        rows.append([f"herder CPU with --max-memory 1G, {w['workers']} workers, idle",
                     "< 1% of a core", f"{w['cpu_pct']:.2f}% ({w['cpu_ms']:.0f} ms / "
                     f"{w['idle_s']} s, {w['wakeups']} wakeups)",
                     "yes" if w["cpu_pct"] < 1 else "no"])
    return rows


def throughput_section(sec, refs, intro):
    if "crashed" in sec:
        return f"**section crashed:** {sec['crashed']}\n"
    out = intro.format(**sec)
    if sec.get("loadavg"):
        out += (f"Load average (1 min) after each round: "
                f"{', '.join(f'{x:.1f}' for x in sec['loadavg'])}.\n")
    out += "\n"
    rows = []
    for k, v in sec["table"].items():
        rows.append([v["label"], num(v["keepalive"]["rps"]), ms(v["keepalive"]["p99_ms"]),
                     num(v["close"]["rps"]), ms(v["close"]["p99_ms"]),
                     v["keepalive"]["errors"] + v["close"]["errors"]])
    out += table(["system", "keep-alive req/s", "p99", "new conn req/s", "p99", "wrk errors"],
                 rows)
    refs = [x for x in refs if x in sec["table"]]
    if refs:
        out += ("\nRatios: the median of the per-round ratios (A and B measured back to back), "
                "with their interquartile range in parentheses:\n\n")
        head = ["system"]
        for ref in refs:
            lab = sec["table"][ref]["label"]
            head += [f"vs {lab}: keep-alive", "new conn"]
        rows = []
        for k, v in sec["table"].items():
            if k in refs and len(refs) == 1:
                continue
            row = [v["label"]]
            for ref in refs:
                row += [_rq(sec, k, ref, "keepalive") if k != ref else "1×",
                        _rq(sec, k, ref, "close") if k != ref else "1×"]
            rows.append(row)
        out += table(head, rows)
    return out + missing_lines(sec)


def events_section(sec, what, intro):
    if "crashed" in sec:
        return f"**section crashed:** {sec['crashed']}\n"
    out = intro.format(**sec) + "\n"
    rows = []
    for k, v in sec["table"].items():
        fails = ", ".join(f"{n} {c}" for c, n in sorted((v.get("fails") or {}).items())) or "–"
        row = [v["label"], v["done"], num(v.get("ok")), num(v.get("failed")), fails,
               num(v.get("per_event"), 2),
               secs(v.get("duration_median_s")) if what == "reload" else
               f"{secs(v.get('recovery_median_s', v.get('duration_median_s')))} / "
               f"{secs(v.get('recovery_max_s'))}",
               f"{ms(v.get('p99_ms'))} / {ms(v.get('max_ms'))}"]
        if what == "reload":
            row.append(f"{mib(v.get('rss_before_kib'))} → {mib(v.get('rss_after_kib'))}")
        else:
            row.append(num(v.get("held")))
        note = v.get("error") or ""
        if v.get("not_replaced"):
            note += f"old workers still running 30 s after {v['not_replaced']} reloads"
        row.append(note)
        rows.append(row)
    head = ["system", what + "s", "ok", "failed", "failed by kind", f"failed per {what}",
            "median reload time (to the last old worker gone)" if what == "reload" else
            "time from the kill until the pool is whole: median / max",
            "ok requests: p99 / max latency"]
    if what == "reload":
        head.append("manager RSS before → after")
    else:
        head.append("connections the victims held when killed")
    head.append("note")
    out += table(head, rows)
    return out + missing_lines(sec)


def weight_section(sec):
    if "crashed" in sec:
        return f"**section crashed:** {sec['crashed']}\n"
    out = (f"The manager process (herder, gunicorn's arbiter, the cluster primary, pm2's daemon, "
           f"tini) after its pool is up, idle for {sec['idle']} s: max RSS, CPU time used, and "
           f"context switches (wakeups) in that window. RSS counts every page of the executable "
           f"and of libc the process touched; PSS splits shared pages among the processes that "
           f"use them; anon is the process's own heap and stacks.\n\n")
    rows = [[v["label"], v["workers"], mib(v["rss_kib"]), mib(v.get("pss_kib")),
             mib(v.get("anon_kib")), f"{v['cpu_ms']:.0f} ms",
             f"{v['cpu_pct']:.2f}%", v["wakeups"], v["threads"]] for v in sec["table"].values()]
    out += table(["manager", "workers", "RSS", "PSS", "anon", "CPU in window", "CPU", "wakeups",
                  "threads"], rows)
    return out + missing_lines(sec)


def scale_section(sec):
    if "crashed" in sec:
        return f"**section crashed:** {sec['crashed']}\n"
    out = ("herder `--ready notify` with a trivial worker (bench/apps/notify-sleep.rs: sends "
           "READY=1 to herder and \"ready <pid>\" to the benchmark's probe socket, then sleeps).\n\n")
    rows = [[f"start → READY=1 with {k} workers", secs(v["median_s"]),
             ", ".join(secs(x) for x in v["runs"])] for k, v in sec["start"].items()]
    rp = sec.get("replace")
    if rp:
        rows.append([f"kill -9 of one worker (pool of {rp['workers']}) → replacement ready",
                     secs(rp["median_s"]), f"max {secs(rp['max_s'])} over {len(rp['runs'])}"])
    m = sec.get("mass")
    if m:
        rows.append([f"kill -9 of all {m['workers']} workers → all replacements ready",
                     secs(m["whole_s"]), f"herder alive: {m['herder_alive']}; READY=1 again: "
                     f"{m['ready_again']}" +
                     (f"; {m['note']}" if m.get("note") else "")])
    out += table(["event", "median", "runs"], rows)
    return out + missing_lines(sec)


def fairness_section(sec):
    if "crashed" in sec:
        return f"**section crashed:** {sec['crashed']}\n"
    out = (f"Share of requests answered by the busiest of {sec['n']} herder-demo workers "
           f"(bench/loadclient.py tallies the pid in each answer); {sec['rounds']} rounds of "
           f"{sec['dur']} s; keep-alive with {sec['conns_keepalive']} connections, new "
           f"connection per request with {sec['conns_close']} concurrent.\n\n")
    rows = []
    for v in sec["table"].values():
        rows.append([v["label"], pct(v["keepalive"]["max_share"]),
                     " ".join(pct(r[0]) for r in v["keepalive"]["rounds"]),
                     pct(v["close"]["max_share"]),
                     " ".join(pct(r[0]) for r in v["close"]["rounds"])])
    out += table(["system", "keep-alive: max busiest share", "per round", "new conn: max",
                  "per round"], rows)
    return out + missing_lines(sec)


def _fpr(row):
    """Failed per recycle, or why there is none."""
    if row is None:
        return "–"
    if not row["recycles"]:
        return "– (no recycle)"
    return f"{row['per_recycle']:.2f}"


def recycle_section(sec):
    if "crashed" in sec:
        return f"**section crashed:** {sec['crashed']}\n"
    out = ("bench/apps/node-app.js with `LEAK_KB={leak_kb}` (every request keeps {leak_kb} KiB, "
           "filled, in a global array), {n} workers, the same limit {limit} for both; "
           "bench/loadclient.py paced at {rate} requests/s in all over {conns} connections, new "
           "connection per request, {timeout} s timeout, {dur} s per system, one system after "
           "the other. herder measures the PSS of each worker's process tree every 2 s and "
           "recycles one worker at a time: its replacement starts and reports ready "
           "(`--ready notify`), then the old one drains (SIGTERM). pm2 (cluster mode) checks "
           "each worker pid's RSS every *Worker Interval* (30 s by default; the column says what "
           "its daemon logged) and reloads that worker: a new one, and when it listens the old "
           "one gets SIGINT (SIGKILL 1.6 s later). Recycles: herder's "
           "`herder_recycles_total{{reason=\"memory\"}}` (`--health` /metrics); pm2's sum of "
           "`pm2_env.restart_time` (`pm2 jlist`), both counted when the load ends. The largest "
           "worker: the suite's own samples of every worker's process tree, every 0.5 s. A "
           "request the paced load could not send on time (the one before it was late) is "
           "skipped, so a system that stalls gets fewer ok requests.\n\n").format(**sec)
    rows = []
    for v in sec["table"].values():
        fails = ", ".join(f"{n} {c}" for c, n in sorted((v.get("fails") or {}).items())) or "–"
        iv = v.get("check_interval_ms")
        check = f"{v['check']}, every {iv / 1000:g} s" if iv else f"{v['check']} (interval ?)"
        note = ""
        if v.get("memory_lines") is not None and v["memory_lines"] != v["recycles"]:
            note = f"{v['memory_lines']} 'exceeds --max-memory-restart' lines in pm2.log"
        rows.append([v["label"], check, v["recycles"], num(v.get("ok")), num(v.get("failed")),
                     fails, _fpr(v), f"{ms(v.get('p99_ms'))} / {ms(v.get('max_ms'))}",
                     f"{mib(v.get('peak_rss_kib'))} / {mib(v.get('peak_pss_kib'))}",
                     v.get("workers_seen"), note])
    out += table(["system", "memory check", "recycles", "ok", "failed", "failed by kind",
                  "failed per recycle", "ok requests: p99 / max",
                  "largest worker: RSS / PSS", "worker pids seen", "note"], rows)
    h = sec["table"].get("herder")
    pm = [(k, v) for k, v in sec["table"].items() if k.startswith("pm2")]
    if h and pm:
        out += ("\n**herder --max-memory vs pm2 max_memory_restart** (herder ÷ pm2; failed per "
                "recycle has no ratio when pm2 recycled nothing or failed nothing):\n\n")
        rows = []
        for k, p in pm:
            rt = sec.get("ratios", {}).get(k, {})
            fpr = f"{_fpr(h)} vs {_fpr(p)}"
            if rt.get("per_recycle") is not None:
                fpr += f" ({ratio(rt['per_recycle'])})"
            rows.append([p["label"], fpr, f"{h['recycles']} vs {p['recycles']}",
                         f"{ms(h.get('p99_ms'))} vs {ms(p.get('p99_ms'))} "
                         f"({ratio(rt.get('p99'))})",
                         f"{mib(h.get('peak_rss_kib'))} vs {mib(p.get('peak_rss_kib'))} "
                         f"({ratio(rt.get('peak_rss'))})"])
        out += table(["vs", "failed per recycle", "recycles", "p99", "largest worker RSS"],
                     rows)
    cpu = sec.get("cpu") or {}
    if cpu.get("table"):
        out += (f"\nherder's own CPU (utime + stime of its process from /proc/PID/stat; on-CPU "
                f"time from /proc/PID/task/*/schedstat, without the 10 ms tick) with "
                f"{cpu['workers']} trivial workers (bench/apps/notify-sleep.rs, `--ready exec`) "
                f"idle for {cpu['idle']} s, with `--max-memory 1G` (never reached: herder reads "
                f"every worker's smaps_rollup every 2 s) and without, one after the other:\n\n")
        rows = []
        for v in cpu["table"].values():
            per = (f"{v['oncpu_us'] / v['wakeups']:.0f} µs" if v.get("oncpu_us") is not None
                   and v["wakeups"] else "–")
            rows.append([v["label"], v["workers"], f"{v['cpu_ms']:.0f} ms",
                         f"{v['cpu_pct']:.2f}%",
                         "–" if v.get("oncpu_us") is None else f"{v['oncpu_us'] / 1000:.2f} ms",
                         v["wakeups"], per, mib(v["rss_kib"]), v["threads"],
                         "yes" if v.get("same_workers") else "**no**"])
        out += table(["herder", "workers", "CPU in window", "% of a core", "on CPU (schedstat)",
                      "wakeups", "on CPU per wakeup", "RSS", "threads",
                      "same workers after"], rows)
        wo = cpu["table"].get("without")
        if cpu.get("ratio") is not None:
            out += f"\nOn-CPU time with ÷ without: {ratio(cpu['ratio'])}.\n"
        elif wo is not None and cpu["table"].get("with"):
            out += (f"\nOn-CPU time with ÷ without: no ratio — without the limit herder was "
                    f"on a CPU for {wo.get('oncpu_us') or 0:.0f} µs in {wo['idle_s']} s "
                    f"({wo['wakeups']} wakeups).\n")
    return out + missing_lines(sec)


def provenance(r):
    """Sections merged in from later runs of only those sections (bench/run --sections)."""
    out = []
    for m in r.get("merged", []):
        mm = m["machine"]
        nums = m["numbers"]
        which = f"Section {nums[0]} comes" if len(nums) == 1 else \
            f"Sections {', '.join(nums)} come"
        flag = "" if m["mode"] == "full" else " --" + m["mode"]
        out.append(f"{which} from a later run: `bench/run{flag} --sections {','.join(nums)}` "
                   f"({m['mode']} run, {m['seconds']:.0f} s) on {mm['date']}, git "
                   f"`{mm.get('git')}`, herder "
                   f"`{mm['versions'].get('herder')}`; load average at start "
                   f"{' '.join(mm.get('loadavg', []))}, at the end "
                   f"{' '.join(mm.get('loadavg_end', []))}.\n\n")
    return "".join(out)


def markdown(r):
    m = r["machine"]
    v = m["versions"]
    s = r["sections"]
    o = ["# herder benchmark results\n\n",
         f"Generated by `bench/run{'' if r['mode'] == 'full' else ' --' + r['mode']}` "
         f"({r['mode']} run, {r['seconds']:.0f} s) on {m['date']}, git `{m.get('git')}`.\n\n",
         f"Machine: {m.get('cpu', '?')}, {m['cpus']} CPUs, {m.get('mem_gib', '?')} GiB, Linux "
         f"{m['kernel']}; load average at start {' '.join(m.get('loadavg', []))}, at the end "
         f"{' '.join(m.get('loadavg_end', []))}. The machine is "
         "shared and noisy: read the **ratios** (A and B alternated within one run), not the "
         "absolute numbers, and do not compare absolute numbers between runs.\n\n",
         provenance(r),
         table(["component", "version"],
               [[k, f"`{x}`" if x else "**missing**"] for k, x in v.items()]),
         "\n![requests/s per system and failed requests per event](results.svg)\n",
         f"\n## Headline (targets from {TARGETS})\n\n", headline(r)]
    if "request_path" in s:
        o += ["\n## 1. Request path: herder-demo, herder vs no supervisor\n\n",
              throughput_section(s["request_path"], ["bare_fd", "bare_reuseport"],
                                 "{n} herder-demo workers; wrk, {conns} connections, {dur} s "
                                 "per run, {rounds} rounds, systems alternated in rotating "
                                 "order; medians. New connection per request = wrk -H "
                                 "'Connection: close'.\n")]
    if "peers" in s:
        o += ["\n## 2. Against the peers: the same Node.js app\n\n",
              throughput_section(s["peers"], ["cluster_rr", "cluster_none", "pm2", "bare_fd"],
                                 "bench/apps/node-app.js, {n} workers; wrk, {conns} connections, "
                                 "{dur} s per run, {rounds} rounds alternated; medians.\n")]
    if "reload" in s:
        o += ["\n## 3. Reload under load\n\n",
              events_section(s["reload"], "reload",
                             "Continuous load from bench/loadclient.py ({conns} concurrent, new "
                             "connection per request, {timeout} s timeout) while each system does "
                             "{events} rolling reloads one after the other: herder SIGHUP, "
                             "waiting for its next READY=1 on our NOTIFY_SOCKET; `pm2 reload`; "
                             "the node cluster recipe (disconnect a worker, fork its "
                             "replacement, wait for `listening`, next); gunicorn HUP (done when "
                             "all {n} workers are new). Failed = refused, reset, closed "
                             "before a full response, timeout or non-2xx (see "
                             "bench/loadclient.py).\n")]
    if "crash" in s:
        o += ["\n## 4. Crash under load\n\n",
              events_section(s["crash"], "kill",
                             "Same load; kill -9 of a random worker that has served at least "
                             "1.5 s (what the OOM killer or an operator hits), wait until the "
                             "pool has {n} workers again (process table, polled every "
                             "millisecond from the kill), pause, repeat {events} times. herder "
                             "runs with `--restart-limit 100000` so that its default give-up "
                             "(10 restarts of a slot in 60 s) does not end the section.\n")]
    if "weight" in s:
        o += ["\n## 5. Weight\n\n", weight_section(s["weight"])]
    if "scale" in s:
        o += ["\n## 6. Scale and reaction\n\n", scale_section(s["scale"])]
    if "fairness" in s:
        o += ["\n## 7. Fairness\n\n", fairness_section(s["fairness"])]
    o.append(soak_section())
    if "recycle" in s:
        o += ["\n## 9. Recycling: herder --max-memory vs pm2 max_memory_restart\n\n",
              recycle_section(s["recycle"])]
    if "sticky" in s:
        o += ["\n## 10. Sticky sessions: herder --balance client-ip vs the Node sticky masters\n\n",
              STICKY_INTRO, sticky_section(s["sticky"])]
    o.append("\nRaw numbers: `results.json` next to this file when kept (bench/out/ for "
             "--quick runs). How to rerun and caveats: bench/README.md.\n")
    return "".join(o)


# --- SVG -----------------------------------------------------------------------------------

COLORS = {"keep-alive": "#4e79a7", "new conn": "#f28e2b", "reload": "#e15759", "kill": "#76b7b2"}


def _panel(x, y, title, groups, series, width, label_w):
    """Horizontal bars, one row per series in each group, one scale for the panel;
    groups = [(label, {series: value})]. Returns (svg, height)."""
    bar_h, gap = 14, 8
    vals = [v for _, d in groups for v in d.values() if v is not None]
    vmax = max(vals) if vals else 1
    vmax = vmax if vmax > 0 else 1
    plot_w = width - label_w - 60
    parts = [f'<text x="{x + 10}" y="{y + 16}" font-size="14" font-weight="bold">'
             f'{escape(title)}</text>']
    cy = y + 26
    if len(series) > 1:
        lx = x + label_w
        for s in series:
            parts.append(f'<rect x="{lx}" y="{cy}" width="12" height="12" fill="{COLORS[s]}"/>'
                         f'<text x="{lx + 16}" y="{cy + 10}" font-size="12">{escape(s)}</text>')
            lx += 110
        cy += 20
    for label, d in groups:
        parts.append(f'<text x="{x + label_w - 8}" y="{cy + bar_h * len(series) / 2 + 4}" '
                     f'font-size="12" text-anchor="end">{escape(label)}</text>')
        for s in series:
            v = d.get(s)
            w = 0 if v is None else max(1.0, plot_w * v / vmax) if v > 0 else 0
            text = "n/a" if v is None else (f"{v:,.0f}" if vmax >= 100 else f"{v:.2f}")
            parts.append(f'<rect x="{x + label_w}" y="{cy}" width="{w:.1f}" height="{bar_h - 2}" '
                         f'fill="{COLORS[s]}"/><text x="{x + label_w + w + 4:.1f}" '
                         f'y="{cy + bar_h - 4}" font-size="11">{text}</text>')
            cy += bar_h
        cy += gap
    return "\n".join(parts), cy - y + 6


SHORT = {"bare_fd": "bare, no supervisor (one fd)", "bare_reuseport": "bare (SO_REUSEPORT)",
         "herder_reuseport": "herder --reuseport"}


def svg(r):
    s = r["sections"]
    W = 1000
    y, body = 10, []
    for key, title in (("request_path", "1. herder-demo"),
                       ("peers", "2. the same Node.js app")):
        t = s.get(key, {}).get("table")
        if not t:
            continue
        hs = []
        for i, (mode, name) in enumerate((("keepalive", "keep-alive"),
                                          ("close", "new conn"))):
            groups = [(SHORT.get(k, v["label"]), {name: v[mode]["rps"]}) for k, v in t.items()]
            p, h = _panel(i * W // 2, y, f"{title}: requests/s, {name} (median)", groups,
                          [name], W // 2, 250)
            body.append(p)
            hs.append(h)
        y += max(hs) + 10
    rel = s.get("reload", {}).get("table", {})
    cra = s.get("crash", {}).get("table", {})
    keys = list(dict.fromkeys(list(rel) + list(cra)))
    if keys:
        groups = []
        for k in keys:
            lab = (rel.get(k) or cra.get(k))["label"]
            groups.append((lab, {"reload": (rel.get(k) or {}).get("per_event"),
                                 "kill": (cra.get(k) or {}).get("per_event")}))
        p, h = _panel(0, y, "3-4. Failed requests per event: per rolling reload, per kill -9 "
                      "of a worker (lower is better)", groups, ["reload", "kill"], W, 300)
        body.append(p)
        y += h + 10
    foot = (f'<text x="10" y="{y + 8}" font-size="11" fill="#555">bench/run, {r["mode"]} run, '
            f'{escape(r["machine"]["date"])}; shared noisy 2-core machine: compare bars within '
            f'a panel; n/a = not measured (see RESULTS.md)</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{y + 20}" '
            f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n" + foot + "\n</svg>\n")


def soak_section():
    """The last full chaos soak (`bench/run --soak`, 10 minutes), committed as bench/soak.md
    (and soak.json): a run of its own, so it is carried into every RESULTS.md as section 8."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "soak.md")
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return ""
    return "\n" + text.replace("## Chaos soak", "## 8. Chaos soak", 1).rstrip() + "\n"


def write(results, out):
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write(markdown(results))
    with open(os.path.join(out, "results.svg"), "w") as f:
        f.write(svg(results))
