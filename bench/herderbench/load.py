"""Load generators: wrk for throughput and latency, bench/loadclient.py for precise failure
counts and for which worker answered. Loopback only, every run bounded in time."""
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys

from .procs import Unavailable

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADCLIENT = os.path.join(HERE, "loadclient.py")

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None


def parse_wrk(out):
    r = {"rps": None, "p50_ms": None, "p99_ms": None, "requests": 0, "errors": 0,
         "non2xx": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        r["rps"] = float(m.group(1))
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if m:
            r[key] = _ms(m.group(1))
    m = re.search(r"(\d+) requests in", out)
    if m:
        r["requests"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        r["errors"] = sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        r["non2xx"] = int(m.group(1))
    return r


def wrk(port, duration, conns, keepalive, threads=2):
    """One wrk run against 127.0.0.1:port; returns the parsed numbers."""
    if not shutil.which("wrk"):
        raise Unavailable("wrk not installed (bench/install-deps.sh)")
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--latency", "--timeout", "5s"]
    if not keepalive:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}/")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30,
                         stdin=subprocess.DEVNULL).stdout
    r = parse_wrk(out)
    if r["rps"] is None:
        raise Unavailable(f"wrk printed no result: {out.strip()[-200:]}")
    return r


class Client:
    """bench/loadclient.py in the background (paced at `rate` requests/s in all when > 0; from
    127.0.0.1 .. 127.0.0.`sources` in turn when > 0); stop() ends it (SIGTERM by pid) and
    returns its JSON summary."""

    def __init__(self, port, conns=16, keepalive=False, duration=600.0, timeout=5.0, rate=0.0,
                 sources=0):
        argv = [sys.executable, LOADCLIENT, "--port", str(port), "--conns", str(conns),
                "--duration", str(duration), "--timeout", str(timeout), "--rate", str(rate),
                "--sources", str(sources)]
        if keepalive:
            argv.append("--keepalive")
        self.duration = duration
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                  text=True, start_new_session=True)
        # Until it says "started", a SIGTERM would kill it before it can print a result.
        ready, _, _ = select.select([self.p.stdout], [], [], 30)
        first = self.p.stdout.readline() if ready else ""
        if first.strip() != "started":
            self.p.kill()
            self.p.wait()
            raise Unavailable(f"loadclient did not start: {first[-200:]!r}")

    def stop(self, early=True):
        if early and self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            out, _ = self.p.communicate(timeout=self.duration + 30 if not early else 30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            out, _ = self.p.communicate()
        try:
            return json.loads(out)
        except ValueError:
            raise Unavailable(f"loadclient printed no result: {out[-200:]!r}")

    def wait(self):
        return self.stop(early=False)


def client_run(port, duration, conns, keepalive, timeout=5.0):
    return Client(port, conns, keepalive, duration, timeout).wait()
