"""The soak's child processes, and the soak's handle on them.

Two roles, each in a process of its own:
- the probe (`probe` role): the idle health connections and the probes, in a process of its own
  so that the soak's load threads (and their GIL) cannot delay a probe;
- notify helpers (`helper` role): one as root, one as nobody (setpriv), each sending what the
  soak asks to a worker's NOTIFY_SOCKET, single-threaded so that they may fork.
The roles are started as `python3 -c <this file's text> ROLE ARGS...` (class Child), so that
nobody can run them whatever the permissions of the checkout. Hence this file uses the standard
library only and imports nothing from its package: what a role needs from the soak's numbers
comes on its command line, and the small helpers both sides use (errname, raise_nofile, bump)
live here. Children read commands on stdin and exit when it closes: the soak dying leaves none
behind.
"""
import array
import errno
import json
import os
import random
import resource
import select
import shutil
import socket
import subprocess
import sys
import threading
import time


def errname(e):
    """The errno name of an OSError (ECONNREFUSED, ...), else the exception's type name."""
    return errno.errorcode.get(e.errno, str(e.errno)) if getattr(e, "errno", None) else \
        type(e).__name__


def raise_nofile():
    """Soft RLIMIT_NOFILE up to the hard limit (a helper holds FDS_PER_DGRAM fds, the probe
    hundreds of sockets); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def bump(d, key, n=1):
    """d[key] += n, counting from 0: the tallies are dicts of counts."""
    d[key] = d.get(key, 0) + n


# ---------------------------------------------------------------------------------------------
# The child roles.

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


def role_helper(fds_per_dgram):
    """Reads {"addr": ..., "kinds": [...]} lines; answers {kind: {outcome: count}} lines. The
    "fds" kind sends fds_per_dgram fds (of /dev/null) in one datagram."""
    raise_nofile()
    devnull = [os.open("/dev/null", os.O_RDONLY) for _ in range(fds_per_dgram)]
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


def fetch(port, path, timeout):
    """The raw answer to one `GET path` (Connection: close) on 127.0.0.1:port, read until the
    peer closes. `timeout` bounds the whole exchange; errors are the socket's (OSError, with
    socket.timeout for the deadline). The one HTTP client of the soak: load, probes, /status."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: herder\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout()
            s.settimeout(left)
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk


def _probe_once(port, path, timeout):
    """One GET on the health port; (answered, kind, seconds). Any HTTP status is an answer."""
    t0 = time.monotonic()
    try:
        data = fetch(port, path, timeout)
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


def role_probe(port, want_idle, timeout, every):
    """Holds idle connections to the health port and probes /livez and /readyz, one each every
    `every` s, each allowed `timeout` s; commands on stdin: `idle N` (answered `ok N` once
    applied), `quit` (answered with the JSON summary)."""
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
                ok, kind, took = _probe_once(port, path, timeout)
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
            nxt += every
            stop.wait(max(0.0, nxt - time.monotonic()))
            nxt = max(nxt, time.monotonic() - every)

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
# The soak's side.

class Child:
    """A child role (probe or helper) of this file, talked to over its stdin and stdout; args
    are its command line after the role's name (see the end of this file)."""

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


if __name__ == "__main__":
    if sys.argv[1:2] == ["helper"]:
        role_helper(int(sys.argv[2]))
    elif sys.argv[1:2] == ["probe"]:
        role_probe(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
    else:
        sys.exit("usage: bench/run --soak (this file's own roles: helper FDS_PER_DGRAM, "
                 "probe PORT IDLE TIMEOUT EVERY)")
