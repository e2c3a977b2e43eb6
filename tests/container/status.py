#!/usr/bin/env python3
"""status.py -- validate herder's /status JSON (stdin) and print one normalised line:

    STATE N_SLOTS N_READY PID,PID,... HERDER_PID

(herder 0.1 shape: {"herder": {"state", "pid", "workers", ...}, "slots": [{"slot", "pid",
"state", "uptime_s", "restarts", "last_exit", ...}], ...}; HERDER_PID is - when absent.)

The contract (issue 5): herder's state, and per slot its pid, state, uptime, restarts and last
exit. Exits 1 with a reason on stderr when the body is not JSON or a field is missing.
"""
import json
import sys


def fail(why):
    print(f"status.py: {why}", file=sys.stderr)
    sys.exit(1)


def find(d, *names):
    """The value of the first key of d that equals or starts with one of names."""
    for n in names:
        for k, v in d.items():
            if k == n or k.startswith(n):
                return k, v
    return None, None


raw = sys.stdin.read()
try:
    doc = json.loads(raw)
except ValueError as e:
    fail(f"not JSON ({e}): {raw[:200]!r}")
if not isinstance(doc, dict):
    fail("top level is not an object")

_, slots = find(doc, "slots", "workers")
if slots is None and isinstance(doc.get("pool"), dict):
    _, slots = find(doc["pool"], "slots", "workers")
if not isinstance(slots, list):
    fail(f"no slots/workers list in {sorted(doc)}")

_, state = find(doc, "state", "herder")
herder_pid = "-"
if isinstance(state, dict):
    herder = state
    _, state = find(herder, "state")
    if isinstance(herder.get("pid"), int):
        herder_pid = str(herder["pid"])
    if isinstance(herder.get("workers"), int) and herder["workers"] != len(slots):
        fail(f"herder.workers = {herder['workers']} but {len(slots)} slots")
if not isinstance(state, str):
    fail(f"no herder state string in {sorted(doc)}")

pids, ready = [], 0
for i, s in enumerate(slots):
    if not isinstance(s, dict):
        fail(f"slot {i} is not an object")
    for field in ("pid", "state", "uptime", "restarts", "last_exit"):
        if find(s, field)[0] is None:
            fail(f"slot {i} has no {field}: {sorted(s)}")
    pid = s[find(s, "pid")[0]]
    st = s[find(s, "state")[0]]
    st = st if isinstance(st, str) else json.dumps(st)
    if isinstance(pid, int) and pid > 0:
        pids.append(str(pid))
    if st.lower() == "ready":
        ready += 1
print(state.replace(" ", "_"), len(slots), ready, ",".join(pids) or "-", herder_pid)
