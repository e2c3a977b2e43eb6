"""One soak run (class Soak): herder started with its pool, the helper and probe children, the
chaos threads (`chaos`) and the monitor; then the phases — warm-up, baseline at rest, the rest of
the chaos, the final measurement at rest, SIGTERM — and the leftovers scan. Gathers every count
into one result dict and has `checks` judge it.

Owns herder's lifecycle and every measurement of it (fds, RSS, children, zombies, what its log
says); every process it starts it stops by its pid, and every wait has a deadline.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

from . import DRAIN_TIMEOUT, FDS_PER_DGRAM, IDLE_CONNS, LOAD_THREADS, LOAD_TIMEOUT, POOL, \
    PROBE_EVERY, PROBE_TIMEOUT, ZOMBIE_GRACE
from ..procs import Proc, free_port
from .chaos import Chaos, Gate
from .checks import checks
from .procfs import fd_info, nofile_limit, proc_children, proc_state, vm_kib
from .roles import Child, errname, fetch, nobody_python, raise_nofile


def http(port, path, timeout):
    """(status code, body) of one GET, or (None, reason)."""
    try:
        data = fetch(port, path, timeout)
    except OSError as e:
        return None, errname(e)
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        return None, "no HTTP answer"
    return int(head[9:12]), body.decode(errors="replace")


class Soak(Chaos):
    """One run of the soak: `run` does it all and returns the result."""

    def __init__(self, ctx, minutes, without):
        self.ctx = ctx
        self.log = ctx.log
        self.minutes = minutes
        self.without = set(without)
        self.gate = Gate()
        self.lock = threading.Lock()
        self.tag = str(uuid.uuid4())
        self.size = POOL
        self.threads = []
        self.r = {"kills": 0, "no_worker_to_kill": 0, "hup_storms": 0, "hups": 0,
                  "scale": {"up": 0, "down": 0, "to": 0}, "scale_errors": 0,
                  "notify": {"root": {}, "nobody": {}}, "notify_rounds": 0,
                  "notify_no_address": 0, "control": {}, "load": {"ok": 0, "refused": 0,
                                                                  "failed": {}},
                  "zombies": [], "zombie_samples": 0, "max_children": 0, "max_fds": 0,
                  "max_rss_kib": 0, "series": [], "events": []}

    # --- small helpers ---------------------------------------------------------------------
    def event(self, what):
        self.log(f"  soak: {what}")
        self.r["events"].append({"t": round(time.time(), 3), "what": what})

    def herder_alive(self):
        return self.herder.running()

    def workers(self):
        return [c for c in proc_children(self.hpid) if (proc_state(c) or ("Z",))[0] != "Z"]

    def status(self, timeout=1.0):
        code, body = http(self.hport, "/status", timeout)
        if code != 200:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return None

    def control(self, line, timeout=10.0):
        """One control-socket exchange; the outcome kind and the answer (or None)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(self.control_path)
                s.sendall(line)
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
        except socket.timeout:
            return "no answer", None
        except OSError as e:
            return errname(e), None
        try:
            v = json.loads(data)
        except ValueError:
            return "no answer" if not data else "not JSON", None
        return ("answered ok" if v.get("ok") else "answered error"), v

    # --- the monitor -----------------------------------------------------------------------
    def monitor_thread(self):
        """Every second: is herder alive, its fds, RSS and children, zombies among them."""
        seen_z = {}
        last_series = 0.0
        while not self.gate.stopped:
            if not self.herder_alive():
                self.event(f"herder exited during the soak (status {self.herder.p.returncode})")
                self.died = True
                self.gate.stop()
                return
            self.zombie_scan(seen_z)
            fds, null = fd_info(self.hpid)
            rss = vm_kib(self.hpid)
            kids = len(proc_children(self.hpid))
            with self.lock:
                r = self.r
                r["max_children"] = max(r["max_children"], kids)
                r["max_fds"] = max(r["max_fds"], fds or 0)
                r["max_rss_kib"] = max(r["max_rss_kib"], rss or 0)
                if time.monotonic() - last_series >= 5:
                    last_series = time.monotonic()
                    r["series"].append({"t": round(time.time() - self.t0, 1), "fds": fds,
                                        "devnull_fds": null, "rss_kib": rss, "children": kids,
                                        "load_ok": r["load"]["ok"]})
            with self.gate.cv:
                self.gate.cv.wait_for(lambda: self.gate.stopped, 1.0)

    def zombie_scan(self, seen):
        """Zombie children of herder; one still a zombie ZOMBIE_GRACE later is counted."""
        now = time.monotonic()
        self.r["zombie_samples"] += 1
        current = {}
        for c in proc_children(self.hpid):
            st = proc_state(c)
            if st and st[0] == "Z":
                current[(c, st[1])] = seen.get((c, st[1]), now)
        for key, since in current.items():
            if now - since >= ZOMBIE_GRACE and key[0] not in [z["pid"] for z in self.r["zombies"]]:
                self.r["zombies"].append({"pid": key[0], "t": round(time.time() - self.t0, 1)})
                self.event(f"zombie: pid {key[0]}, a child of herder, unreaped for "
                           f"{now - since:.1f} s")
        seen.clear()
        seen.update(current)

    # --- phases ----------------------------------------------------------------------------
    def start_herder(self):
        self.port, self.hport = free_port(), free_port()
        self.control_path = os.path.join(self.ctx.tmp, "herder.sock")
        argv = [self.ctx.herder, "-l", f"127.0.0.1:{self.port}", "-w", str(POOL),
                "--ready", "notify", "--health", f"127.0.0.1:{self.hport}",
                "--control", self.control_path, "--restart-limit", "100000",
                "--drain-timeout", f"{DRAIN_TIMEOUT}s", "--", self.ctx.demo]
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")}
        env.update(HERDER_SOAK_TAG=self.tag, HERDER_LOG=os.environ.get("HERDER_LOG", "info"))
        self.herder_log = os.path.join(self.ctx.tmp, "soak-herder.log")
        self.argv = argv
        self.herder = Proc(argv, self.herder_log, env=env)
        self.hpid = self.herder.pid
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not self.herder_alive():
                raise RuntimeError(f"herder exited at start: {self.herder.tail()}")
            if http(self.hport, "/readyz", 1)[0] == 200:
                return
            time.sleep(0.1)
        raise RuntimeError("herder not ready within 30 s of its start")

    def wait_whole(self, timeout):
        """Until /status shows POOL slots, all ready, herder ready, nothing else left (old
        generations drained); returns (whole, settled, last status summary)."""
        deadline = time.monotonic() + timeout
        last = "no /status answer"
        whole = False
        while time.monotonic() < deadline and self.herder_alive():
            st = self.status()
            if st:
                h = st["herder"]
                ready = sum(1 for s in st["slots"] if s["state"] == "ready")
                others = len(st.get("other_workers") or [])
                last = (f"state {h['state']}, {ready}/{h['workers']} slots ready, "
                        f"{others} other workers")
                whole = h["workers"] == POOL and ready == POOL and h["state"] == "ready"
                if whole and others == 0:
                    return True, True, last
            time.sleep(0.25)
        return whole, False, last

    def measure(self):
        """fds and RSS of herder at rest: the minimum over 2 s of samples (a probe connection
        open at one sample must not count), once the count no longer changes."""
        def window():
            fds, nulls, rss = [], [], []
            for _ in range(8):
                f, n = fd_info(self.hpid)
                if f is not None:
                    fds.append(f)
                    nulls.append(n)
                rss.append(vm_kib(self.hpid) or 0)
                time.sleep(0.25)
            return (min(fds) if fds else None, min(nulls) if nulls else None, min(rss))
        prev = window()
        for _ in range(4):
            cur = window()
            if cur[0] == prev[0]:
                break
            prev = cur
        return {"fds": cur[0], "devnull_fds": cur[1], "rss_kib": cur[2]}

    def quiesce(self, label, timeout):
        """Chaos stopped (or paused): pool back to POOL, idle connections closed, herder at
        rest; then its fds and RSS."""
        t = time.monotonic()
        outcome, answer = self.control(f'{{"v":1,"cmd":"scale","to":{POOL}}}\n'.encode(), 5)
        if outcome == "answered ok":
            self.size = POOL
            self.r["scale"]["to"] += 1
        else:
            self.r["scale_errors"] += 1
            self.event(f"{label}: scale to {POOL} over the control socket: {outcome} {answer}")
        if self.probe and "idle" not in self.without:
            if self.probe.ask("idle 0", 10) is None:
                self.event(f"{label}: the probe child did not close its idle connections")
        whole, settled, last = self.wait_whole(timeout)
        m = self.measure() if self.herder_alive() else {}
        m.update(whole=whole, settled=settled, pool=last,
                 seconds=round(time.monotonic() - t, 1))
        self.event(f"{label}: pool {'whole' if whole else 'NOT whole'} ({last}); "
                   f"fds {m.get('fds')} (/dev/null {m.get('devnull_fds')}), "
                   f"RSS {m.get('rss_kib')} KiB")
        return m

    def start_threads(self):
        specs = []
        if "load" not in self.without:
            specs += [(f"load-{i}", self.load_thread, (i,)) for i in range(LOAD_THREADS)]
        for part, fn in (("kill", self.kill_thread), ("hup", self.hup_thread),
                         ("scale", self.scale_thread), ("notify", self.notify_thread),
                         ("control", self.control_thread)):
            if part not in self.without:
                specs.append((part, fn, ()))
        self.chaos_threads = len(specs)
        for name, fn, args in specs:
            t = threading.Thread(target=fn, args=args, name=name, daemon=True)
            t.start()
            self.threads.append(t)
        m = threading.Thread(target=self.monitor_thread, name="monitor", daemon=True)
        m.start()
        self.threads.append(m)

    def start_children(self):
        self.helpers = {}
        self.notes = []
        if "notify" not in self.without:
            self.helpers["root"] = Child([sys.executable], "helper", (FDS_PER_DGRAM,))
            if "nobody" in self.without:
                self.notes.append("notify attacks as nobody: left out (--without nobody)")
            else:
                prefix, why = nobody_python()
                if prefix:
                    self.helpers["nobody"] = Child(prefix, "helper", (FDS_PER_DGRAM,))
                else:
                    self.notes.append(f"notify attacks as nobody: not run ({why})")
                    self.event(f"no helper as nobody: {why}")
        idle = 0 if "idle" in self.without else IDLE_CONNS
        self.probe = Child([sys.executable], "probe",
                           (self.hport, idle, PROBE_TIMEOUT, PROBE_EVERY))

    def stop_herder(self):
        """SIGTERM; exit status and seconds, or None if it had to be SIGKILLed."""
        t = time.monotonic()
        try:
            os.kill(self.hpid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = DRAIN_TIMEOUT + 15
        try:
            code = self.herder.p.wait(deadline)
        except subprocess.TimeoutExpired:
            self.event(f"herder still running {deadline} s after SIGTERM: SIGKILL")
            self.herder.stop(signal.SIGKILL, 5)
            return None, round(time.monotonic() - t, 3)
        took = round(time.monotonic() - t, 3)
        self.herder.stop()
        return code, took

    def leftovers(self):
        """Processes still carrying this run's tag after herder exited: killed (by pid)."""
        needle = f"HERDER_SOAK_TAG={self.tag}".encode()

        def scan():
            found = []
            for d in os.listdir("/proc"):
                if not d.isdigit() or int(d) == os.getpid():
                    continue
                try:
                    with open(f"/proc/{d}/environ", "rb") as f:
                        if needle in f.read().split(b"\0"):
                            found.append(int(d))
                except OSError:
                    pass
            return found
        deadline = time.monotonic() + 2
        found = scan()
        while found and time.monotonic() < deadline:
            time.sleep(0.1)
            found = scan()
        out = []
        for pid in found:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                cmd = "?"
            out.append({"pid": pid, "state": (proc_state(pid) or ("gone",))[0], "cmdline": cmd})
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return out

    def herder_log_facts(self):
        """What herder's own log says about the attacks: forged notifications it acted on (the
        demo worker never sends WATCHDOG=trigger, and its own STOPPING=1 comes while it is
        already draining, which herder does not log), errors and panics."""
        facts = {"acted on STOPPING=1": 0, "acted on WATCHDOG=trigger": 0,
                 "dropped foreign senders": 0, "dropped oversized": 0, "errors": 0,
                 "panics": 0, "error_examples": []}
        pats = (("is stopping on its own (STOPPING=1)", "acted on STOPPING=1"),
                ("said STOPPING=1 before it had served", "acted on STOPPING=1"),
                ("asked for a watchdog failure", "acted on WATCHDOG=trigger"),
                ("may not speak for the worker", "dropped foreign senders"),
                ("outside the worker's tree", "dropped foreign senders"),  # the previous wording
                ("dropping an oversized notification", "dropped oversized"),
                ("panicked", "panics"))
        try:
            with open(self.herder_log, errors="replace") as f:
                for line in f:
                    for pat, key in pats:
                        if pat in line:
                            facts[key] += 1
                    if " ERROR " in line:
                        facts["errors"] += 1
                        if len(facts["error_examples"]) < 5:
                            facts["error_examples"].append(line.strip()[:300])
        except OSError:
            pass
        return facts

    def run(self):
        total = self.minutes * 60
        warmup = min(60.0, max(5.0, total * 0.2))
        settle = 15 if total <= 90 else 45   # deadline for the pool to be whole again
        self.died = False
        self.start_herder()
        self.r["herder_nofile"] = nofile_limit(self.hpid)
        self.r["soak_nofile"] = raise_nofile()  # after herder started: it keeps its own limit
        self.log(f"soak: herder pid {self.hpid} on 127.0.0.1:{self.port}, health :{self.hport};"
                 f" {total:.0f} s of chaos ({warmup:.0f} s warm-up), tag {self.tag}")
        self.t0 = time.time()
        t_start = time.monotonic()
        self.start_children()
        self.start_threads()

        # Warm-up, then the baseline at rest, then the rest of the chaos.
        self.gate.sleep(warmup)
        baseline = {}
        if not self.gate.stopped:
            self.event("warm-up done: pausing the chaos for the baseline")
            if not self.gate.pause(self.chaos_threads, LOAD_TIMEOUT + 5):
                self.event(f"not every chaos thread paused within {LOAD_TIMEOUT + 5:.0f} s")
            baseline = self.quiesce("baseline", settle)
            if self.probe and "idle" not in self.without:
                self.probe.ask(f"idle {IDLE_CONNS}", 5)
            self.gate.resume()
        self.gate.sleep(max(0.0, total - warmup))
        chaos_s = time.monotonic() - t_start - baseline.get("seconds", 0)
        died = self.died
        self.gate.stop()
        for t in self.threads:
            t.join(LOAD_TIMEOUT + 5)
        self.event("chaos stopped")

        final = {}
        alive = self.herder_alive() and not died
        if alive:
            final = self.quiesce("final", settle)
            seen = {}                # once more at rest, with the grace period
            self.zombie_scan(seen)
            time.sleep(ZOMBIE_GRACE)
            self.zombie_scan(seen)
        probe = json.loads(self.probe.ask("quit", 15) or "{}") if self.probe else {}
        self.probe.stop()
        for h in self.helpers.values():
            h.stop()
        code, term_s = (self.herder.p.returncode, 0) if not alive else self.stop_herder()
        left = self.leftovers()

        r = self.r
        r.update(minutes=self.minutes, chaos_seconds=round(chaos_s, 1), warmup_s=warmup,
                 without=sorted(self.without), notes=self.notes, baseline=baseline,
                 final=final, probes=probe.get("probes", {}), idle=probe.get("idle", {}),
                 exit_status=code, term_seconds=term_s, leftovers=left, alive_at_end=alive,
                 argv=self.argv, tag=self.tag, herder_log=self.herder_log_facts())
        r["checks"] = checks(r, self.without)
        r["pass"] = all(c["ok"] for c in r["checks"])
        return r
