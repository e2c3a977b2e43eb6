"""The chaos soak (issue 10: "nobody outside the pool can take herder down"), `bench/run --soak`.

One real herder with herder-demo workers on loopback, and everything at once for N minutes:
new-connection load, kill -9 of a random worker every 200 ms, SIGHUP storms, TTIN/TTOU, garbage,
oversized datagrams, forged lines and hundreds of fds sent to the workers' NOTIFY_SOCKETs (as
root and as nobody), garbage and held connections on the control socket, idle connections held
on the health port while /livez and /readyz are probed. Then the checks (bench/README.md, "The
soak"): herder alive, the pool whole, no connection refused, no zombie, no fd or RSS growth, every
probe answered within 1 s, SIGTERM ends herder with nothing left running.

This file owns the numbers (the bounds of the checks and the pace of the chaos, which every
report states) and `run`, the entry point bench/run calls; the work is in:
- `phases`: one soak run (class Soak): herder's start and stop, warm-up, baseline, chaos, final
  measurement, the monitor, leftovers;
- `chaos`: the chaos actors (load, kill, hup, scale, notify, control threads) and their Gate;
- `roles`: the child processes (the probe, the notify helpers as root and as nobody), which run
  as `python3 -c <roles.py's text>` and so import nothing from this package;
- `procfs`: the /proc readers;
- `checks`: the verdicts against the bounds; `report`: the summary and soak.md.
"""
import json
import os
import shutil
import subprocess
import sys
import time

# The bounds of the checks, stated in bench/README.md and in every report.
FD_SLACK = 4                   # final fds <= baseline + FD_SLACK
RSS_SLACK_KIB = 2048           # final RSS <= baseline + max(RSS_SLACK_KIB, RSS_SLACK_FRACTION)
RSS_SLACK_FRACTION = 0.20
PROBE_TIMEOUT = 1.0            # every probe must be answered within this
ZOMBIE_GRACE = 2.0             # a zombie child of herder still there this much later is a zombie

POOL = 4                       # the pool size at the start, the baseline and the end
SCALE_MIN, SCALE_MAX = 2, 6
KILL_EVERY = 0.2
HUP_EVERY, HUP_BURST, HUP_SPREAD = 5.0, 5, 0.1
SCALE_EVERY = 3.0
NOTIFY_EVERY = 0.25            # one round of notify attacks, alternately as root and as nobody
CONTROL_EVERY = 0.5
CONTROL_HELD = 4               # control connections opened and held without a request
LOAD_THREADS = 8
LOAD_PAUSE = 0.005             # between two requests of one load thread: the machine is shared
LOAD_TIMEOUT = 10.0
SLEEP_SHARE = 4                # one request in SLEEP_SHARE is /sleep?ms=20
IDLE_CONNS = 200
PROBE_EVERY = 0.25
FDS_PER_DGRAM = 250            # SCM_MAX_FD is 253
DRAIN_TIMEOUT = 5
# PROBE_TIMEOUT, PROBE_EVERY and FDS_PER_DGRAM reach the child roles on their command line.

# What --without may leave out.
PARTS = ("load", "kill", "hup", "scale", "notify", "fds", "nobody", "control", "idle")


def run(ctx, minutes, out, without=()):
    """bench/run --soak: runs the soak, writes soak.json and soak.md into out, prints the
    summary; returns the exit status (0 only on PASS)."""
    # Imported here, not at the top: the submodules import the numbers above from this package.
    from .phases import Soak
    from .report import markdown, summary
    soak = Soak(ctx, minutes, without)
    machine = {"date": time.strftime("%Y-%m-%d %H:%M %Z"),
               "loadavg": open("/proc/loadavg").read().split()[:3]}
    try:
        r = subprocess.run([ctx.herder, "--version"], capture_output=True, text=True, timeout=10)
        machine["herder"] = r.stdout.strip()
        r = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)),
                            "describe", "--always", "--dirty"], capture_output=True, text=True,
                           timeout=10)
        machine["git"] = r.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        result = soak.run()
    except RuntimeError as e:       # herder did not start: nothing to soak
        print(f"soak: FAIL ({e})")
        return 1
    finally:
        soak.gate.stop()
        log = getattr(soak, "herder_log", None)
        if log and os.path.exists(log):
            with open(log, "rb") as src, open(os.path.join(out, "soak-herder.log"), "wb") as dst:
                src.seek(max(0, os.path.getsize(log) - (4 << 20)))
                shutil.copyfileobj(src, dst)
    machine["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    result["machine"] = machine
    with open(os.path.join(out, "soak.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "soak.md"), "w") as f:
        f.write(markdown(result, machine))
    sys.stdout.write(summary(result))
    print(f"wrote {os.path.join(out, 'soak.json')}, soak.md, soak-herder.log")
    return 0 if result["pass"] else 1
