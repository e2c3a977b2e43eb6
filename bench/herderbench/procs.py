"""Processes, sockets and waits for the benchmark: every process is started here, stopped by its
pid (never by name), and every wait has a deadline."""
import os
import signal
import socket
import subprocess
import threading
import time


class Unavailable(Exception):
    """A system could not be started or lacks a feature; the reason goes into RESULTS.md."""


def now():
    return time.monotonic()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid):
    """Direct children of pid, from /proc/<pid>/task/*/children (needs CONFIG_PROC_CHILDREN)."""
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


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def starttime(pid):
    """Field 22 of /proc/<pid>/stat: tells a pid from a later reuse of the same number."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def smaps_kib(pid):
    """Pss and Rss_anon from /proc/PID/smaps_rollup (proc(5)): the memory the process costs once
    pages shared with other processes (libc, the executable) are split among their users, and
    its private heap and stacks."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Pss", "Anonymous"):
                    out[key.lower()] = int(rest.split()[0])
    except OSError:
        pass
    return out


def cpu_ticks(pid):
    """utime + stime of pid in clock ticks (proc(5))."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


CLK_TCK = os.sysconf("SC_CLK_TCK")


def held_connections(pid, port):
    """Established TCP connections to local `port` held by pid (freeze it with SIGSTOP first):
    the requests a worker had accepted, that its death loses. Socket inodes from /proc/<pid>/fd,
    matched against `ss -tnHe state established sport = :PORT` (netlink sock_diag, filtered in
    the kernel: fast even with 100k TIME_WAIT entries, unlike reading /proc/net/tcp)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        out = subprocess.run(["ss", "-tnHe", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    n = 0
    for line in out.splitlines():
        for field in line.split():
            if field.startswith("ino:") and field[4:] in inodes:
                n += 1
    return n


def conntrack():
    """(entries, max, packets dropped so far) of netfilter's connection table, or None when
    conntrack is not loaded. Every loopback connection takes an entry that outlives it (120 s in
    TIME_WAIT by default): a few thousand new connections per second fill the table in a minute
    or two, and the kernel then drops new SYNs (the client retransmits after 1 s, 3 s: latency
    that is not the server's). The drop counter is in /proc/net/stat/nf_conntrack, one line of
    hex per CPU."""
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
            count = int(f.read())
        with open("/proc/sys/net/netfilter/nf_conntrack_max") as f:
            top = int(f.read())
        drops = 0
        with open("/proc/net/stat/nf_conntrack") as f:
            col = f.readline().split().index("drop")
            for line in f:
                drops += int(line.split()[col], 16)
        return count, top, drops
    except (OSError, ValueError, IndexError):
        return None


def kill(pid, sig):
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class Proc:
    """A process this suite started. stop() signals it by pid, waits, escalates to SIGKILL, then
    SIGKILLs (by pid) any descendant still alive that it had recorded."""

    registry = []

    def __init__(self, argv, log, env=None, cwd=None, stdout=None):
        self.argv = argv
        self.log = log
        self.logf = open(log, "ab")
        self.p = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=stdout or self.logf, stderr=self.logf,
            env=env, cwd=cwd, start_new_session=True)
        self.pid = self.p.pid
        self.known = {}
        Proc.registry.append(self)

    def remember_descendants(self):
        for d in descendants(self.pid):
            if d not in self.known:
                self.known[d] = starttime(d)

    def running(self):
        return self.p.poll() is None

    def stop(self, sig=signal.SIGTERM, grace=10.0):
        self.remember_descendants()
        if self.p.poll() is None:
            kill(self.pid, sig)
            try:
                self.p.wait(grace)
            except subprocess.TimeoutExpired:
                kill(self.pid, signal.SIGKILL)
                self.p.wait(5)
        deadline = now() + 3
        for pid, st in self.known.items():
            while alive(pid) and starttime(pid) == st and now() < deadline:
                time.sleep(0.05)
            if alive(pid) and starttime(pid) == st:
                kill(pid, signal.SIGKILL)
        self.logf.close()
        if self in Proc.registry:
            Proc.registry.remove(self)
        return self.p.returncode

    def tail(self, n=3):
        try:
            with open(self.log, "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
            return " / ".join(lines[-n:])
        except OSError:
            return ""

    @classmethod
    def stop_all(cls):
        for p in list(cls.registry):
            try:
                p.stop(grace=5)
            except Exception:  # noqa: BLE001 - best effort at exit
                pass


def run(argv, timeout, env=None, cwd=None):
    """Run a short command to completion, bounded in time; returns CompletedProcess."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
                          stdin=subprocess.DEVNULL)


def http_get(port, timeout=1.0, path="/"):
    """One GET `path` with Connection: close; returns the body or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                      .encode())
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 2") or head.startswith(b"HTTP/1.0 2"):
            return body.decode(errors="replace")
    except OSError:
        pass
    return None


def wait_until(pred, timeout, step=0.02):
    deadline = now() + timeout
    while now() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return None


def wait_http(port, timeout=20.0, proc=None):
    def ok():
        if proc is not None and not proc.running():
            raise Unavailable(f"exited with status {proc.p.returncode}: {proc.tail()}")
        return http_get(port, 0.5) is not None
    if not wait_until(ok, timeout, 0.05):
        raise Unavailable(f"no HTTP answer on 127.0.0.1:{port} within {timeout:.0f}s")


class DgramListener:
    """A bound AF_UNIX datagram socket (NOTIFY_SOCKET for herder, or the probe socket the trivial
    worker reports to), recording (monotonic time, message) from a thread."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.settimeout(0.2)
        self.msgs = []
        self.cv = threading.Condition()
        self.closed = False
        self.t = threading.Thread(target=self._loop, daemon=True)
        self.t.start()

    def _loop(self):
        while not self.closed:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            t = now()
            with self.cv:
                for line in data.decode(errors="replace").splitlines():
                    self.msgs.append((t, line))
                self.cv.notify_all()

    def mark(self):
        with self.cv:
            return len(self.msgs)

    def wait_for(self, pred, since=0, timeout=30.0):
        """First message at index >= since with pred(msg) true; returns (time, msg) or None."""
        deadline = now() + timeout
        with self.cv:
            i = since
            while True:
                while i < len(self.msgs):
                    if pred(self.msgs[i][1]):
                        return self.msgs[i]
                    i += 1
                left = deadline - now()
                if left <= 0:
                    return None
                self.cv.wait(left)

    def wait_count(self, pred, count, since=0, timeout=30.0):
        """Time of the count-th message (from since) with pred true, or None."""
        deadline = now() + timeout
        with self.cv:
            while True:
                hits = [t for t, m in self.msgs[since:] if pred(m)]
                if len(hits) >= count:
                    return hits[count - 1]
                left = deadline - now()
                if left <= 0:
                    return None
                self.cv.wait(min(left, 0.5))

    def close(self):
        self.closed = True
        self.sock.close()
