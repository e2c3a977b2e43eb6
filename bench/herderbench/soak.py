"""The chaos soak (issue 10: "nobody outside the pool can take herder down"), `bench/run --soak`.

One real herder with herder-demo workers on loopback, and everything at once for N minutes:
new-connection load, kill -9 of a random worker every 200 ms, SIGHUP storms, TTIN/TTOU, garbage,
oversized datagrams, forged lines and hundreds of fds sent to the workers' NOTIFY_SOCKETs (as
root and as nobody), garbage and held connections on the control socket, idle connections held
on the health port while /livez and /readyz are probed. Then the checks (bench/README.md, "The
soak"): herder alive, the pool whole, no connection refused, no zombie, no fd or RSS growth, every
probe answered within 1 s, SIGTERM ends herder with nothing left running.

Three kinds of process, all started from this file:
- the soak itself (`run`): herder, the chaos threads, the checks, the report;
- the probe child (`probe` role): the idle health connections and the probes, in a process of
  its own so that the soak's load threads (and their GIL) cannot delay a probe;
- notify helpers (`helper` role): one as root, one as nobody (setpriv), each sending what the
  soak asks to a worker's NOTIFY_SOCKET, single-threaded so that they may fork.
The child roles use only the standard library and are started as `python3 -c <this file's
text>`, so that nobody can run them whatever the permissions of the checkout. Children read
commands on stdin and exit when it closes: the soak dying leaves none behind.
"""
import array
import errno
import json
import os
import random
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

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

PARTS = ("load", "kill", "hup", "scale", "notify", "fds", "nobody", "control", "idle")


def errname(e):
    return errno.errorcode.get(e.errno, str(e.errno)) if getattr(e, "errno", None) else \
        type(e).__name__


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def bump(d, key, n=1):
    d[key] = d.get(key, 0) + n


# ---------------------------------------------------------------------------------------------
# Child roles: stdlib only.

def _send_outcome(fn):
    try:
        fn()
        return "sent"
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            return "refused"          # the path is not reachable by this user: that is fine
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return "gone"             # the worker (and its socket) went away meanwhile
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return "queue full"
        return "error " + errname(e)


FORGED = (b"READY=1\n", b"STOPPING=1\n", b"WATCHDOG=trigger\n",
          b"READY=1\nSTOPPING=1\nWATCHDOG=trigger\nSTATUS=forged\n")
_GONE_CODES = {0: "sent", 1: "refused", 2: "gone", 3: "queue full"}


def role_helper():
    """Reads {"addr": ..., "kinds": [...]} lines; answers {kind: {outcome: count}} lines."""
    raise_nofile()
    devnull = [os.open("/dev/null", os.O_RDONLY) for _ in range(FDS_PER_DGRAM)]
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", devnull))]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    for line in sys.stdin:
        req = json.loads(line)
        addr = req["addr"]
        addr = "\0" + addr[1:] if addr.startswith("@") else addr
        out = {}

        def one(kind, data, fds=None):
            if fds:
                # Not socket.send_fds: it drops its address argument (3.11).
                r = _send_outcome(lambda: sock.sendmsg([data], fds, 0, addr))
            else:
                r = _send_outcome(lambda: sock.sendto(data, addr))
            bump(out.setdefault(kind, {}), r)

        for kind in req["kinds"]:
            if kind == "random":
                one(kind, os.urandom(random.randint(1, 4096)))
            elif kind == "oversized":        # 64 KiB of valid-looking lines: must not be parsed
                one(kind, (b"STOPPING=1\n" * 6000)[:65536])
            elif kind == "forged":
                for data in FORGED:
                    one(kind, data)
            elif kind == "fds":
                one(kind, b"FDSTORE=1\n", rights)
            elif kind == "forged_gone":
                # From a process that exits at once: its pid cannot be checked any more.
                pid = os.fork()
                if pid == 0:
                    r = _send_outcome(lambda: sock.sendto(FORGED[3], addr))
                    os._exit({v: k for k, v in _GONE_CODES.items()}.get(r, 4))
                _, st = os.waitpid(pid, 0)
                code = os.waitstatus_to_exitcode(st)
                bump(out.setdefault(kind, {}), _GONE_CODES.get(code, "error"))
        print(json.dumps(out), flush=True)


def _probe_once(port, path, timeout):
    """One GET on the health port; (answered, kind, seconds). Any HTTP status is an answer."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: herder\r\n\r\n".encode())
            data = b""
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout()
                s.settimeout(left)
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        took = time.monotonic() - t0
        if not data.startswith(b"HTTP/1.1 "):
            return False, "no HTTP answer", took
        code = data[9:12].decode(errors="replace")
        if path == "/livez" and code != "200":
            return False, f"livez {code}", took
        return took <= timeout, "ok" if took <= timeout else "late", took
    except socket.timeout:
        return False, "timeout", time.monotonic() - t0
    except OSError as e:
        return False, errname(e), time.monotonic() - t0


def role_probe(port, want_idle):
    """Holds idle connections to the health port and probes /livez and /readyz; commands on
    stdin: `idle N` (answered `ok N` once applied), `quit` (answered with the JSON summary)."""
    raise_nofile()
    lock = threading.Lock()
    stop = threading.Event()
    target = [want_idle]
    applied = threading.Condition(lock)
    held = []
    idle = {"opened": 0, "renewed": 0, "connect_failed": {}, "max_held": 0}
    probes = {"count": 0, "late": 0, "kinds": {}, "max_ms": 0.0, "lat_ms": [], "late_examples": [],
              "by_route": {"/livez": 0, "/readyz": 0}}

    def idle_loop():
        poller = select.poll()
        while not stop.is_set():
            with lock:
                want = target[0]
            while len(held) > want:
                s = held.pop()
                poller.unregister(s)
                s.close()
            # Closed by herder (EOF or reset): renew.
            for fd, _ev in poller.poll(0):
                for s in held:
                    if s.fileno() == fd:
                        poller.unregister(s)
                        held.remove(s)
                        s.close()
                        idle["renewed"] += 1
                        break
            tries = 0
            while len(held) < want and tries < 50 and not stop.is_set():
                tries += 1
                s = socket.socket()
                s.settimeout(0.5)
                try:
                    s.connect(("127.0.0.1", port))
                except OSError as e:
                    s.close()
                    bump(idle["connect_failed"], "timeout" if isinstance(e, socket.timeout)
                         else errname(e))
                    break       # the accept queue is full: try again next round
                held.append(s)
                poller.register(s, select.POLLIN | select.POLLHUP | select.POLLERR)
                idle["opened"] += 1
            idle["max_held"] = max(idle["max_held"], len(held))
            with lock:
                if len(held) == target[0] or target[0] == 0:
                    applied.notify_all()
            stop.wait(0.5 if len(held) >= want else 0.1)
        for s in held:
            s.close()
        held.clear()

    def probe_loop():
        nxt = time.monotonic()
        while not stop.is_set():
            for path in ("/livez", "/readyz"):
                ok, kind, took = _probe_once(port, path, PROBE_TIMEOUT)
                ms = took * 1000
                probes["count"] += 1
                probes["by_route"][path] += 1
                bump(probes["kinds"], kind)
                probes["max_ms"] = max(probes["max_ms"], ms)
                probes["lat_ms"].append(round(ms, 1))
                if not ok:
                    probes["late"] += 1
                    if len(probes["late_examples"]) < 20:
                        probes["late_examples"].append(
                            {"t": round(time.time(), 3), "route": path, "kind": kind,
                             "ms": round(ms), "idle_held": len(held)})
            nxt += PROBE_EVERY
            stop.wait(max(0.0, nxt - time.monotonic()))
            nxt = max(nxt, time.monotonic() - PROBE_EVERY)

    threads = [threading.Thread(target=idle_loop, daemon=True),
               threading.Thread(target=probe_loop, daemon=True)]
    for t in threads:
        t.start()
    for line in sys.stdin:
        cmd = line.split()
        if cmd[:1] == ["idle"]:
            n = int(cmd[1])
            with lock:
                target[0] = n
                if n == 0:      # answered once every idle connection is closed
                    applied.wait_for(lambda: not held, 8)
                print(f"ok {len(held)}", flush=True)
        elif cmd[:1] == ["quit"]:
            break
    stop.set()
    for t in threads:
        t.join(5)
    lat = sorted(probes.pop("lat_ms"))
    probes["p50_ms"] = lat[len(lat) // 2] if lat else None
    probes["p99_ms"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None
    probes["max_ms"] = round(probes["max_ms"], 1)
    print(json.dumps({"probes": probes, "idle": idle}), flush=True)


# ---------------------------------------------------------------------------------------------
# The soak.

def proc_children(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def proc_state(pid):
    """(state letter, starttime) from /proc/<pid>/stat, or None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return rest[0], int(rest[19])
    except (OSError, IndexError, ValueError):
        return None


def fd_info(pid):
    """(number of open fds, how many of them are /dev/null) of pid, or (None, None)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None, None
    null = 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null":
                null += 1
        except OSError:
            pass
    return len(fds), null


def vm_kib(pid, key="VmRSS"):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def nofile_limit(pid):
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return line.split()[3]
    except OSError:
        pass
    return None


def http(port, path, timeout):
    """(status code, body) of one GET, or (None, reason)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: herder\r\nConnection: close\r\n\r\n"
                      .encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        return None, errname(e)
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        return None, "no HTTP answer"
    return int(head[9:12]), body.decode(errors="replace")


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


class Child:
    """A child role (probe or helper) of this file, talked to over its stdin and stdout."""

    def __init__(self, argv_prefix, role, args=()):
        with open(os.path.abspath(__file__)) as f:
            source = f.read()
        self.p = subprocess.Popen([*argv_prefix, "-c", source, role, *map(str, args)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  bufsize=1, start_new_session=True)
        self.lock = threading.Lock()
        self.dead = False

    def ask(self, line, timeout=20.0):
        """Sends a line, returns the answer line (None when the child died or is too slow; a
        child too slow once is not asked again, so that no late answer is taken for the next)."""
        with self.lock:
            if self.dead or self.p.poll() is not None:
                return None
            try:
                self.p.stdin.write(line + "\n")
                self.p.stdin.flush()
            except OSError:
                return None
            r, _, _ = select.select([self.p.stdout], [], [], timeout)
            if not r:
                self.dead = True
                return None
            return self.p.stdout.readline().strip() or None

    def stop(self):
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            self.p.kill()       # by its pid
            self.p.wait(5)


def nobody_python():
    """An interpreter nobody can run (pyenv shims under /root are not), via setpriv; or the
    reason there is none."""
    if os.geteuid() != 0:
        return None, "not root"
    import shutil
    if not shutil.which("setpriv"):
        return None, "setpriv not found"
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    for py in dict.fromkeys([sys.executable, "/usr/bin/python3", shutil.which("python3")]):
        if not py:
            continue
        try:
            r = subprocess.run([*prefix, py, "-c", "import socket; socket.SCM_RIGHTS"],
                               capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return [*prefix, py], None
    return None, "no python3 that uid 65534 may run"


class Soak:
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

    # --- the chaos threads -----------------------------------------------------------------
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
            with socket.create_connection(("127.0.0.1", self.port), timeout=LOAD_TIMEOUT) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n"
                          .encode())
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
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
        from .procs import Proc, free_port
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
            self.helpers["root"] = Child([sys.executable], "helper")
            if "nobody" in self.without:
                self.notes.append("notify attacks as nobody: left out (--without nobody)")
            else:
                prefix, why = nobody_python()
                if prefix:
                    self.helpers["nobody"] = Child(prefix, "helper")
                else:
                    self.notes.append(f"notify attacks as nobody: not run ({why})")
                    self.event(f"no helper as nobody: {why}")
        idle = 0 if "idle" in self.without else IDLE_CONNS
        self.probe = Child([sys.executable], "probe", (self.hport, idle))

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
        pats = (("worker is stopping on its own", "acted on STOPPING=1"),
                ("asked for a watchdog failure", "acted on WATCHDOG=trigger"),
                ("outside the worker's tree", "dropped foreign senders"),
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
        r["checks"] = self.checks(r)
        r["pass"] = all(c["ok"] for c in r["checks"])
        return r

    def checks(self, r):
        b, f = r["baseline"], r["final"]
        out = []

        def check(name, ok, detail, skipped=False):
            out.append({"name": name, "ok": bool(ok), "detail": detail, "skipped": skipped})

        check("herder alive", r["alive_at_end"],
              "alive when the chaos stopped" if r["alive_at_end"]
              else f"exited during the soak, status {r['exit_status']}")
        check("pool whole", f.get("whole"),
              f"{POOL} slots ready within the deadline: {f.get('pool', 'not measured')}")
        if "load" in self.without:
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
              f"{PROBE_TIMEOUT:.0f} s (max {p.get('max_ms')} ms; {_kinds(p.get('kinds', {}))})")
        code = r["exit_status"]
        check("SIGTERM stops herder", r["alive_at_end"] and code in (0, 3),
              f"exit status {code} after {r['term_seconds']} s (0 or 3 within "
              f"{DRAIN_TIMEOUT + 15} s)" if r["alive_at_end"] else "herder was already gone")
        check("nothing left running", not r["leftovers"],
              f"{len(r['leftovers'])} processes with the run's tag after herder exited"
              + (": " + "; ".join(f"{x['pid']} {x['cmdline'][:60]}" for x in r["leftovers"][:5])
                 if r["leftovers"] else ""))
        return out


# ---------------------------------------------------------------------------------------------
# Reports.

def _kinds(d):
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "none"


def _notify_line(tally):
    parts = []
    for kind, outcomes in sorted(tally.items()):
        if isinstance(outcomes, dict):
            parts.append(f"{kind}: {_kinds(outcomes)}")
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
      f"failed: {_kinds(i.get('connect_failed', {}))}")
    a("results:")
    ld = r["load"]
    a(f"  requests: {ld['ok']} ok, {ld['refused']} refused, {sum(ld['failed'].values())} "
      f"failed ({_kinds(ld['failed'])})")
    a(f"  probes: {p.get('late')} not answered within {PROBE_TIMEOUT:.0f} s; latency p50 "
      f"{p.get('p50_ms')} ms, p99 {p.get('p99_ms')} ms, max {p.get('max_ms')} ms; "
      f"answers: {_kinds(p.get('kinds', {}))}")
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
             f"{_kinds(ld['failed'])} (failures of requests in flight on a killed worker are "
             "expected; refusals are not). Probe latency p50 "
             f"{p.get('p50_ms')} ms, p99 {p.get('p99_ms')} ms, max {p.get('max_ms')} ms. "
             f"herder's peak during the chaos: {r['max_fds']} fds, {r['max_rss_kib']} KiB RSS, "
             f"{r['max_children']} children.")
    return "\n".join(L) + "\n"


def run(ctx, minutes, out, without=()):
    """bench/run --soak: runs the soak, writes soak.json and soak.md into out, prints the
    summary; returns the exit status (0 only on PASS)."""
    import shutil
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


if __name__ == "__main__":
    if sys.argv[1:2] == ["helper"]:
        role_helper()
    elif sys.argv[1:2] == ["probe"]:
        role_probe(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit("usage: bench/run --soak (this file's own roles: helper, probe PORT IDLE)")
