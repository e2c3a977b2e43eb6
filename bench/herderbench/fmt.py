"""Formatting for RESULTS.md: numbers, durations, ratios and markdown tables; a missing
number is always "–", never a made-up one."""


def num(x, nd=0):
    if x is None:
        return "–"
    return f"{x:,.{nd}f}"


def ms(x):
    return "–" if x is None else f"{x:.2f} ms"


def ratio(x):
    return "–" if x is None else f"{x:.2f}×"


def mib(kib):
    return "–" if kib is None else f"{kib / 1024:.1f} MiB"


def pct(x):
    return "–" if x is None else f"{x * 100:.0f}%"


def secs(x):
    if x is None:
        return "–"
    if x < 0.01:
        return f"{x * 1000:.1f} ms"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def missing_lines(sec):
    m = sec.get("missing") or {}
    if not m:
        return ""
    return "\n".join(f"- **missing: {v['label']}** — {v['reason']}" for v in m.values()) + "\n"
