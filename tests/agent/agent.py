#!/usr/bin/python3
"""The agent of tests/agent.rs: a line server on the socket herder hands it at fd 3.

It checks what herder gives an agent (HERDER_AGENT=1, LISTEN_FDS=1 with LISTEN_PID its own pid,
LISTEN_FDNAMES=agent when set), answers every connection's line with
"agent <pid> <counter> state=<ready|starting>" and closes it, and says READY=1 on NOTIFY_SOCKET.
It accepts from the start: a connection made before its READY=1 is answered "state=starting",
so a worker started too early says so instead of only being slow.

Knobs (environment):
  AGENT_READY_DELAY_MS  wait this long before READY=1 (default 0)
  AGENT_FAIL=1          exit 1 at once, serving nothing
  AGENT_SLOW_START_FILE when this file exists at start, wait 1 s before accepting anything
                        (connections queue in the kernel meanwhile), then go on as usual
  AGENT_READY_GATE      wait until this file exists before READY=1 (after the delay, if any)
  AGENT_RETIRE_DIR      on SIGUSR1: accept nothing more, send STOPPING=1, and exit 0 once the
                        file retire-<its pid> exists there (an agent retiring on its own)
  AGENT_PAUSE_DIR       once the file pause-<its pid> exists there, accept nothing more; when
                        what it had accepted is answered, log "paused" (what comes later waits
                        in the kernel's queue; the file names one agent, not its replacement)
On SIGTERM it stops accepting, answers what it had accepted and exits 0; SIGUSR1/SIGUSR2 are logged.
Every line it prints starts with "fixture-agent[PID]" so it never looks like one of herder's.
"""

import os
import select
import signal
import socket
import struct
import sys
import threading
import time

PID = os.getpid()


def log(msg):
    sys.stderr.write(f"fixture-agent[{PID}] {msg}\n")
    sys.stderr.flush()


def mono_ns():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def notify(msg):
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        s.sendto(msg.encode(), addr)
    finally:
        s.close()
    return True


def main():
    log(f"started mono_ns={mono_ns()}")
    if os.environ.get("AGENT_FAIL") == "1":
        log("failing on purpose: exit 1")
        sys.exit(1)
    problems = []
    if os.environ.get("HERDER_AGENT") != "1":
        problems.append(f"HERDER_AGENT={os.environ.get('HERDER_AGENT')!r}")
    if os.environ.get("LISTEN_FDS") != "1":
        problems.append(f"LISTEN_FDS={os.environ.get('LISTEN_FDS')!r}")
    if os.environ.get("LISTEN_PID") != str(PID):
        problems.append(f"LISTEN_PID={os.environ.get('LISTEN_PID')!r} (pid {PID})")
    names = os.environ.get("LISTEN_FDNAMES")
    if names is not None and names != "agent":
        problems.append(f"LISTEN_FDNAMES={names!r}")
    if "HERDER_WORKER" in os.environ:
        problems.append(f"HERDER_WORKER={os.environ['HERDER_WORKER']!r}")
    if problems:
        log("bad environment: " + ", ".join(problems) + ": exit 3")
        sys.exit(3)
    log(f"socket {os.environ.get('HERDER_AGENT_SOCKET')}")

    lsock = socket.socket(fileno=3)
    lock = threading.Lock()
    state = {"counter": 0, "ready": False, "stopping": False, "in_flight": 0}
    pause = os.environ.get("AGENT_PAUSE_DIR")
    pause = pause and os.path.join(pause, f"pause-{PID}")

    def serve(conn):
        try:
            conn.settimeout(30)
            data = b""
            while b"\n" not in data and len(data) < 4096:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            with lock:
                state["counter"] += 1
                n = state["counter"]
                ready = "ready" if state["ready"] else "starting"
            conn.sendall(f"agent {PID} {n} state={ready}\n".encode())
        except OSError as e:
            log(f"connection error: {e}")
        finally:
            conn.close()
            with lock:
                state["in_flight"] -= 1

    def paused():
        """Whether to accept nothing more; logs "paused" once nothing is in flight."""
        if not (pause and os.path.exists(pause)):
            return False
        wait_idle()
        log("paused: accepting nothing, nothing in flight")
        return True

    def wait_idle():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with lock:
                if state["in_flight"] == 0:
                    return
            time.sleep(0.005)

    # accept(2) gives up after 50 ms (SO_RCVTIMEO), so that the loop sees a stop or a pause
    # without a blocking accept that would take one more connection later. (Not a timeout
    # in Python's sense: that sets O_NONBLOCK on the listening socket itself, which herder
    # hands on to the next agent.)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 50_000))

    def accept_loop():
        while not state["stopping"]:
            if pause and paused():
                return
            try:
                conn, _ = lsock.accept()
            except BlockingIOError:
                continue
            except OSError as e:
                log(f"accept failed: {e}")
                time.sleep(0.01)
                continue
            with lock:
                state["in_flight"] += 1
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    # The handlers only set flags that the main thread polls: a handler that took a lock (as
    # threading.Event.set does) could deadlock against the main thread holding it, and a
    # main thread blocked for long would see a signal another thread received only late.
    flags = {"stop": False, "retire": False}
    signal.signal(signal.SIGTERM, lambda *_: flags.update(stop=True))
    retire_dir = os.environ.get("AGENT_RETIRE_DIR")

    def on_usr1(*_):
        log("got SIGUSR1")
        if retire_dir:
            flags.update(retire=True, stop=True)

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGUSR2, lambda *_: log("got SIGUSR2"))

    slow = os.environ.get("AGENT_SLOW_START_FILE")
    if slow and os.path.exists(slow):
        log("slow start: accepting nothing for 1 s")
        time.sleep(1)
        log(f"accepting mono_ns={mono_ns()}")
    delay = int(os.environ.get("AGENT_READY_DELAY_MS", "0"))
    if delay <= 0:
        state["ready"] = True
    acceptor = threading.Thread(target=accept_loop, daemon=True)
    acceptor.start()
    if delay > 0:
        time.sleep(delay / 1000)
        with lock:
            state["ready"] = True
    gate = os.environ.get("AGENT_READY_GATE")
    if gate:
        log(f"waiting for {gate} before READY=1")
        while not os.path.exists(gate):
            time.sleep(0.01)
    t = mono_ns()
    sent = notify("READY=1")
    log(f"ready mono_ns={t} notified={sent}")
    while not flags["stop"]:
        time.sleep(0.05)
    state["stopping"] = True
    if flags["retire"]:
        # Accept nothing more first, then say so: what comes after waits in the kernel's
        # queue for the replacement.
        acceptor.join(5)
        wait_idle()
        notify("STOPPING=1")
        log("retiring: accepting nothing more, sent STOPPING=1")
        release = os.path.join(retire_dir, f"retire-{PID}")
        while not os.path.exists(release):
            time.sleep(0.01)
        log("retired: exiting 0")
        sys.stderr.flush()
        os._exit(0)
    log("got SIGTERM: accepting nothing more, answering what it has")
    acceptor.join(5)
    wait_idle()
    log("drained: exiting 0")
    sys.stderr.flush()
    os._exit(0)


main()
