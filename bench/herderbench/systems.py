"""The systems under test: herder (shared socket or --reuseport), the bare "no supervisor"
launchers, Node's cluster module, pm2 cluster mode, gunicorn's arbiter and tini. Each one can
start, list its workers, reload (where it has a reload) and stop; every failure to do so is an
Unavailable whose message ends up in RESULTS.md."""
import json
import os
import signal
import time

from .procs import (DgramListener, Proc, Unavailable, children, free_port, kill, now, run,
                    wait_http, wait_until)


class System:
    label = "?"
    http = True

    def __init__(self, ctx, n):
        self.ctx = ctx
        self.n = n
        self.port = None
        self.procs = []

    def manager_pid(self):
        return self.procs[0].pid if self.procs else None

    def workers(self):
        return children(self.manager_pid())

    def reload(self, timeout=60.0):
        raise Unavailable(f"{self.label} has no reload")

    def stop(self):
        for p in reversed(self.procs):
            p.stop()
        self.procs = []

    def _log(self, name):
        return os.path.join(self.ctx.tmp, f"{name}-{self.port}.log")

    def _check_alive(self):
        for p in self.procs:
            if not p.running():
                raise Unavailable(f"{self.label} exited with status {p.p.returncode}: {p.tail()}")

    def wait_workers(self, count, exclude=(), timeout=60.0, step=0.02):
        """Until the manager has `count` workers, none of them in `exclude`."""
        ex = set(exclude)

        def ok():
            self._check_alive()
            w = self.workers()
            return len(w) == count and not (set(w) & ex)
        if not wait_until(ok, timeout, step):
            raise Unavailable(f"{self.label}: pool not back to {count} workers within {timeout:.0f}s")


class Herder(System):
    """herder --listen 127.0.0.1:PORT --workers N [--reuseport] --ready R [extra] -- CMD, with
    NOTIFY_SOCKET bound by us; SIGHUP reloads, completion = the next READY=1."""

    def __init__(self, ctx, n, cmd, reuseport=False, ready="exec", extra=(), http=True,
                 label=None, env=None):
        super().__init__(ctx, n)
        self.cmd = cmd
        self.reuseport = reuseport
        self.ready = ready
        self.extra = list(extra)
        self.http = http
        self.env = env or {}
        self.label = label or ("herder --reuseport" if reuseport else "herder")
        self.notify = None
        self.ready_at = None

    def start(self, ready_timeout=60.0):
        self.port = free_port()
        self.notify = DgramListener(os.path.join(self.ctx.tmp, f"notify-{self.port}.sock"))
        argv = [self.ctx.herder, "--listen", f"127.0.0.1:{self.port}", "--workers", str(self.n)]
        if self.reuseport:
            argv.append("--reuseport")
        argv += ["--ready", self.ready, *self.extra, "--", *self.cmd]
        env = dict(os.environ, NOTIFY_SOCKET=self.notify.path, HERDER_LOG="warn", **self.env)
        self.t_start = now()
        self.procs = [Proc(argv, self._log("herder"), env=env)]
        got = None
        deadline = now() + ready_timeout
        while now() < deadline and got is None:
            self._check_alive()
            got = self.notify.wait_for(lambda m: m == "READY=1", 0, 0.2)
        if got is None:
            raise Unavailable(f"herder sent no READY=1 within {ready_timeout:.0f}s "
                              f"({len(self.workers())} workers running)")
        self.ready_at = got[0]
        if self.http:
            wait_http(self.port, 20, self.procs[0])
        return self

    def reload(self, timeout=60.0):
        mark = self.notify.mark()
        kill(self.manager_pid(), signal.SIGHUP)
        got = self.notify.wait_for(lambda m: m == "READY=1", mark, timeout)
        self._check_alive()
        if got is None:
            raise Unavailable(f"herder sent no READY=1 within {timeout:.0f}s of SIGHUP")

    def stop(self):
        super().stop()
        if self.notify:
            self.notify.close()
            self.notify = None


class BareFd(System):
    """bench/apps/bare-launch.py: bind once, exec N copies with the socket at fd 3."""

    def __init__(self, ctx, n, cmd, label="bare: N copies on one fd"):
        super().__init__(ctx, n)
        self.cmd = cmd
        self.label = label

    def start(self):
        self.port = free_port()
        argv = [self.ctx.python, os.path.join(self.ctx.apps, "bare-launch.py"),
                f"127.0.0.1:{self.port}", str(self.n), "--", *self.cmd]
        self.procs = [Proc(argv, self._log("bare"))]
        wait_http(self.port, 20, self.procs[0])
        return self


class BareReuseport(System):
    """N copies of `herder-demo --listen 127.0.0.1:PORT`, each binding with SO_REUSEPORT."""

    def __init__(self, ctx, n, label="bare: N × demo --listen (SO_REUSEPORT)"):
        super().__init__(ctx, n)
        self.label = label

    def start(self):
        self.port = free_port()
        for i in range(self.n):
            self.procs.append(Proc([self.ctx.demo, "--listen", f"127.0.0.1:{self.port}"],
                                   self._log(f"demo{i}")))
            if i == 0:
                wait_http(self.port, 20, self.procs[0])
        time.sleep(0.3)
        self._check_alive()
        return self

    def manager_pid(self):
        return None

    def workers(self):
        return [p.pid for p in self.procs if p.running()]


class NodeCluster(System):
    """bench/apps/node-cluster.js: Node's cluster module; SIGUSR2 = rolling restart recipe."""

    def __init__(self, ctx, n, policy="rr"):
        super().__init__(ctx, n)
        self.policy = policy
        self.label = f"node cluster ({'round-robin' if policy == 'rr' else 'SCHED_NONE'})"

    def _count(self, word):
        try:
            with open(self.procs[0].log) as f:
                return f.read().split().count(word)
        except OSError:
            return 0

    def start(self, timeout=120.0):
        if not self.ctx.node:
            raise Unavailable("node not installed")
        self.port = free_port()
        env = dict(os.environ, PORT=str(self.port), HOST="127.0.0.1",
                   NODE_CLUSTER_SCHED_POLICY=self.policy)
        self.procs = [Proc([self.ctx.node, os.path.join(self.ctx.apps, "node-cluster.js"),
                            str(self.n)], self._log("cluster"), env=env)]
        if not wait_until(lambda: self._check_alive() or self._count("READY"), timeout, 0.05):
            raise Unavailable(f"node cluster not listening within {timeout:.0f}s")
        wait_http(self.port, 20, self.procs[0])
        return self

    def reload(self, timeout=60.0):
        before = self._count("RELOADED")
        kill(self.manager_pid(), signal.SIGUSR2)
        if not wait_until(lambda: self._count("RELOADED") > before, timeout, 0.02):
            raise Unavailable(f"node cluster rolling restart not done within {timeout:.0f}s")


class Pm2(System):
    """pm2 cluster mode (`pm2 start node-app.js -i N`), its daemon in a private PM2_HOME."""

    label = "pm2 cluster"

    def __init__(self, ctx, n, extra=(), env=None, label=None):
        super().__init__(ctx, n)
        self.daemon = None
        self.extra = list(extra)
        self.more_env = env or {}
        self.label = label or self.label

    def _pm2(self, *args, timeout=120.0):
        r = run([self.ctx.pm2, *args], timeout, env=self.env)
        if r.returncode != 0:
            raise Unavailable(f"pm2 {' '.join(args)} failed: {(r.stderr or r.stdout)[-300:]}")
        return r

    def start(self, timeout=180.0):
        if not self.ctx.pm2:
            raise Unavailable("pm2 not installed (bench/install-deps.sh)")
        self.port = free_port()
        self.home = os.path.join(self.ctx.tmp, f"pm2-{self.port}")
        # The daemon and the app inherit this environment (more_env: e.g. the app's LEAK_KB).
        self.env = dict(os.environ, PM2_HOME=self.home, PORT=str(self.port), HOST="127.0.0.1",
                        PM2_DISCRETE_MODE="true", **self.more_env)
        self._pm2("start", os.path.join(self.ctx.apps, "node-app.js"), "-i", str(self.n),
                  "--name", "app", *self.extra, timeout=timeout)
        try:
            with open(os.path.join(self.home, "pm2.pid")) as f:
                self.daemon = int(f.read().strip())
        except (OSError, ValueError):
            raise Unavailable("pm2 daemon pid file not found")
        wait_http(self.port, 30)
        if not wait_until(lambda: len(self.workers()) == self.n, timeout, 0.1):
            raise Unavailable(f"pm2: {len(self.workers())} of {self.n} workers")
        return self

    def manager_pid(self):
        return self.daemon

    def _check_alive(self):
        if self.daemon and not os.path.exists(f"/proc/{self.daemon}"):
            raise Unavailable("pm2 daemon died")

    def reload(self, timeout=120.0):
        self._pm2("reload", "app", timeout=timeout)

    def restarts(self):
        """The sum of the workers' restart counts (`pm2 jlist`: pm2_env.restart_time), which
        pm2 raises for a crash, a reload and a max_memory_restart alike."""
        try:
            apps = json.loads(self._pm2("jlist", timeout=60).stdout)
            return sum(int(a["pm2_env"]["restart_time"]) for a in apps)
        except (ValueError, KeyError, TypeError) as e:
            raise Unavailable(f"pm2 jlist: no restart counts ({e})")

    def daemon_log(self):
        try:
            with open(os.path.join(self.home, "pm2.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self):
        if self.daemon is None:
            return
        from .procs import descendants, starttime, alive
        known = {p: starttime(p) for p in [self.daemon, *descendants(self.daemon)]}
        try:
            run([self.ctx.pm2, "kill"], 60, env=self.env)
        except Exception:  # noqa: BLE001 - fall through to kill by pid
            pass
        for pid, st in known.items():
            if alive(pid) and starttime(pid) == st:
                kill(pid, signal.SIGKILL)
        self.daemon = None


class Gunicorn(System):
    """gunicorn's arbiter with N sync workers of bench/apps/wsgi_app.py; HUP reloads. gunicorn
    reports no completion: a reload is done when N workers run and none is an old one."""

    label = "gunicorn"

    def start(self):
        if not self.ctx.gunicorn:
            raise Unavailable("gunicorn not installed (bench/install-deps.sh)")
        self.port = free_port()
        argv = [self.ctx.gunicorn, "-w", str(self.n), "-b", f"127.0.0.1:{self.port}",
                "--chdir", self.ctx.apps, "--graceful-timeout", "30", "--log-level", "warning",
                "--backlog", "1024", "wsgi_app:app"]
        self.procs = [Proc(argv, self._log("gunicorn"))]
        wait_http(self.port, 30, self.procs[0])
        self.wait_workers(self.n)
        return self

    def reload(self, timeout=60.0):
        old = set(self.workers())
        kill(self.manager_pid(), signal.SIGHUP)
        self.wait_workers(self.n, exclude=old, timeout=timeout)
        time.sleep(0.2)  # the new workers' boot (import of the app) is not observable from outside


class Tini(System):
    """tini -- CMD: the weight of a bare init with one child."""

    label = "tini (1 child)"
    http = False

    def __init__(self, ctx, cmd):
        super().__init__(ctx, 1)
        self.cmd = cmd

    def start(self):
        if not self.ctx.tini:
            raise Unavailable("tini not installed (apt-get install tini)")
        self.port = free_port()
        self.procs = [Proc([self.ctx.tini, "-s", "--", *self.cmd], self._log("tini"))]
        self.wait_workers(1, timeout=10)
        return self
