"""The chaos actors of the soak, one thread each: load (new connections), kill -9 of a random
worker, SIGHUP storms, TTIN/TTOU, notify attacks (through the helper children, as root and as
nobody) and the hostile control-socket client; and the Gate that pauses them between two actions
(for the baseline) and stops them.

The actors are methods of `Chaos`, a mixin of `phases.Soak`: they use its herder (pid, ports,
control socket), helpers, parts left out, tallies (`self.r`, under `self.lock` where the load
threads share them), the pool size it asked for, and its helpers `event`, `workers` and
`control`. They attack and count; they never judge (that is `checks`) and never measure herder.
"""
import json
import os
import random
import select
import signal
import socket
import threading
import time

from . import CONTROL_EVERY, CONTROL_HELD, HUP_BURST, HUP_EVERY, HUP_SPREAD, KILL_EVERY, \
    LOAD_PAUSE, LOAD_TIMEOUT, NOTIFY_EVERY, SCALE_EVERY, SCALE_MAX, SCALE_MIN, SLEEP_SHARE
from .procfs import proc_state
from .roles import bump, errname, fetch


class Gate:
    """Lets the chaos threads be paused between two actions (for the baseline) and stopped."""

    def __init__(self):
        self.cv = threading.Condition()
        self.paused = False
        self.stopped = False
        self.idle = 0

    def checkpoint(self):
        """Between two actions; False once the soak stops."""
        with self.cv:
            if self.paused and not self.stopped:
                self.idle += 1
                self.cv.notify_all()
                self.cv.wait_for(lambda: not self.paused or self.stopped)
                self.idle -= 1
            return not self.stopped

    def nap(self, secs):
        """Sleeps, cut short by a pause or the stop."""
        with self.cv:
            self.cv.wait_for(lambda: self.stopped or self.paused, secs)

    def sleep(self, secs):
        """A nap, then a checkpoint."""
        self.nap(secs)
        return self.checkpoint()

    def pause(self, threads, timeout):
        with self.cv:
            self.paused = True
            self.cv.notify_all()
            return self.cv.wait_for(lambda: self.idle >= threads, timeout)

    def resume(self):
        with self.cv:
            self.paused = False
            self.cv.notify_all()

    def stop(self):
        with self.cv:
            self.stopped = True
            self.cv.notify_all()


class Chaos:
    """The chaos threads of a Soak (see the top of this file)."""

    def load_thread(self, n):
        rnd = random.Random(n)
        load = self.r["load"]
        while self.gate.checkpoint():
            path = "/sleep?ms=20" if rnd.randrange(SLEEP_SHARE) == 0 else "/"
            kind = self.request(path)
            with self.lock:
                if kind == "ok":
                    load["ok"] += 1
                elif kind == "refused":
                    load["refused"] += 1
                    if load["refused"] <= 5:
                        self.event("connection refused on the service port")
                else:
                    bump(load["failed"], kind)
            if LOAD_PAUSE:
                time.sleep(LOAD_PAUSE)

    def request(self, path):
        try:
            data = fetch(self.port, path, LOAD_TIMEOUT)
        except ConnectionRefusedError:
            return "refused"
        except socket.timeout:
            return "timeout"
        except ConnectionResetError:
            return "reset"
        except BrokenPipeError:
            return "broken pipe"
        except OSError as e:
            return errname(e)
        if not data:
            return "closed without an answer"
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep or not head.startswith(b"HTTP/1.1 "):
            return "incomplete answer"
        code = head[9:12].decode(errors="replace")
        if not code.startswith("2"):
            return f"status {code}"
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                if len(body) != int(line.split(b":")[1]):
                    return "incomplete answer"
        return "ok"

    def kill_thread(self):
        rnd = random.Random()
        while self.gate.sleep(KILL_EVERY):
            ws = self.workers()
            if not ws:
                self.r["no_worker_to_kill"] += 1
                continue
            try:
                os.kill(rnd.choice(ws), signal.SIGKILL)
                self.r["kills"] += 1
            except ProcessLookupError:
                pass

    def hup_thread(self):
        while self.gate.sleep(HUP_EVERY):
            self.r["hup_storms"] += 1
            for i in range(HUP_BURST):
                try:
                    os.kill(self.hpid, signal.SIGHUP)
                    self.r["hups"] += 1
                except ProcessLookupError:
                    return
                time.sleep(HUP_SPREAD / HUP_BURST)

    def scale_thread(self):
        rnd = random.Random()
        while self.gate.sleep(SCALE_EVERY):
            if self.size <= SCALE_MIN:
                up = True
            elif self.size >= SCALE_MAX:
                up = False
            else:
                up = rnd.random() < 0.5
            try:
                os.kill(self.hpid, signal.SIGTTIN if up else signal.SIGTTOU)
            except ProcessLookupError:
                return
            self.size += 1 if up else -1
            self.r["scale"]["up" if up else "down"] += 1

    def notify_address(self, pid, cache):
        key = (pid, (proc_state(pid) or (None, None))[1])
        if key not in cache:
            addr = None
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    for var in f.read().split(b"\0"):
                        if var.startswith(b"NOTIFY_SOCKET="):
                            addr = var[len(b"NOTIFY_SOCKET="):].decode(errors="replace")
            except OSError:
                pass
            if len(cache) > 4096:
                cache.clear()
            cache[key] = addr
        return cache[key]

    def notify_thread(self):
        rnd = random.Random()
        cache = {}
        turn = 0
        kinds = ["random", "oversized", "forged", "forged_gone"]
        if "fds" not in self.without:
            kinds.append("fds")
        while self.gate.sleep(NOTIFY_EVERY):
            who = "nobody" if (turn % 2 and self.helpers.get("nobody")) else "root"
            turn += 1
            ws = self.workers()
            if not ws:
                continue
            addr = self.notify_address(rnd.choice(ws), cache)
            if not addr:
                self.r["notify_no_address"] += 1
                continue
            answer = self.helpers[who].ask(json.dumps({"addr": addr, "kinds": kinds}))
            self.r["notify_rounds"] += 1
            tally = self.r["notify"][who]
            if answer is None:
                bump(tally, "helper did not answer")
                continue
            for kind, outcomes in json.loads(answer).items():
                for outcome, n in outcomes.items():
                    bump(tally.setdefault(kind, {}), outcome, n)

    def control_thread(self):
        rnd = random.Random()
        tally = self.r["control"]
        held = []

        def count(kind, outcome):
            bump(tally.setdefault(kind, {}), outcome)

        while True:
            if self.gate.paused:    # nothing of ours may stay open in herder at the baseline
                for s in held:
                    s.close()
                held.clear()
            if not self.gate.checkpoint():
                break
            # Held connections, never sending: herder answers them after its read timeout.
            for s in list(held):
                r, _, _ = select.select([s], [], [], 0)
                if r:
                    try:
                        data = s.recv(4096)
                        count("held", "answered after timeout" if data else "closed")
                    except OSError as e:
                        count("held", errname(e))
                    held.remove(s)
                    s.close()
            while len(held) < CONTROL_HELD:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.settimeout(1)
                    s.connect(self.control_path)
                    held.append(s)
                    count("held", "opened")
                except OSError as e:
                    s.close()
                    count("held", "connect " + errname(e))
                    break
            kind = rnd.choice(["garbage", "garbage", "oversized", "status"])
            if kind == "garbage":
                junk = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 512)))
                line = junk.replace(b"\n", b" ") + b"\n"
            elif kind == "oversized":
                line = b'{"v":1,"cmd":"status","pad":"' + b"x" * 8192 + b'"}\n'
            else:
                line = b'{"v":1,"cmd":"status"}\n'
            outcome, _ = self.control(line)
            count(kind, outcome)
            self.gate.nap(CONTROL_EVERY)
        for s in held:
            s.close()
