#!/usr/bin/python3
"""The worker of tests/agent.rs: HTTP/1.1 (one request a connection) on the socket at fd 3.

At start-up it logs when it started (CLOCK_MONOTONIC, comparable with the agent's), asks the
agent at HERDER_AGENT_SOCKET once and logs the answer or the failure, then says READY=1.
  GET /       -> "pid=<pid> slot=<slot>"
  GET /agent  -> the agent's answer to one line (503 and the error when that fails)
SIGUSR1/SIGUSR2 are logged. On SIGTERM it stops accepting, answers what it had accepted, asks
the agent once more (its last request, during its drain), logs the answer or the failure, and
exits 0.
Every line it prints starts with "fixture-worker[SLOT/PID]".

Knobs: WORKER_AGENT_TIMEOUT_MS, how long to wait for the agent's answer (default 20000).
"""

import os
import signal
import socket
import struct
import sys
import threading
import time

PID = os.getpid()
SLOT = os.environ.get("HERDER_WORKER", "?")
TIMEOUT = int(os.environ.get("WORKER_AGENT_TIMEOUT_MS", "20000")) / 1000


def log(msg):
    sys.stderr.write(f"fixture-worker[{SLOT}/{PID}] {msg}\n")
    sys.stderr.flush()


def agent_address(text):
    """(family, address) of an address in herder's --listen syntax."""
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if path.startswith("@"):
            path = "\0" + path[1:]
        return socket.AF_UNIX, path
    if text.startswith("["):
        host, _, port = text[1:].rpartition("]:")
        return socket.AF_INET6, (host, int(port))
    host, _, port = text.rpartition(":")
    return socket.AF_INET, (host, int(port))


def ask_agent(what):
    """The agent's answer line, or raises with what went wrong."""
    text = os.environ.get("HERDER_AGENT_SOCKET")
    if not text:
        raise RuntimeError("HERDER_AGENT_SOCKET is not set")
    family, addr = agent_address(text)
    s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(TIMEOUT)
        s.connect(addr)
        s.sendall(f"{what} from worker {SLOT} pid {PID}\n".encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    reply = data.decode(errors="replace").strip()
    if not reply.startswith("agent "):
        raise RuntimeError(f"unexpected answer {reply!r}")
    return reply


def respond(conn, code, body):
    reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[code]
    conn.sendall(
        (
            f"HTTP/1.1 {code} {reason}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n{body}"
        ).encode()
    )


def serve(conn):
    try:
        conn.settimeout(30)
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        path = data.split(b" ", 2)[1].decode() if data.count(b" ") >= 2 else "/"
        if path == "/":
            respond(conn, 200, f"pid={PID} slot={SLOT}\n")
        elif path == "/agent":
            try:
                respond(conn, 200, ask_agent("request") + "\n")
            except Exception as e:  # noqa: BLE001 - the error is the answer
                respond(conn, 503, f"agent request failed: {e!r}\n")
        else:
            respond(conn, 404, "not found\n")
    except OSError:
        pass
    finally:
        conn.close()


def main():
    log(f"started mono_ns={time.clock_gettime_ns(time.CLOCK_MONOTONIC)}")
    fds = os.environ.get("LISTEN_FDS", "")
    if not fds.isdigit() or int(fds) < 1:
        log(f"no sockets: LISTEN_FDS={os.environ.get('LISTEN_FDS')!r}: exit 3")
        sys.exit(3)
    if os.environ.get("LISTEN_PID") != str(PID):
        log(f"LISTEN_PID={os.environ.get('LISTEN_PID')!r} is not {PID}: exit 3")
        sys.exit(3)
    log(f"agent socket {os.environ.get('HERDER_AGENT_SOCKET')}")
    try:
        log(f"start-up agent reply: {ask_agent('hello')}")
    except Exception as e:  # noqa: BLE001
        log(f"start-up agent request failed: {e!r}")

    lsock = socket.socket(fileno=3)
    # The handler only sets a flag the main thread polls (see agent.py for why).
    flags = {"stop": False}
    signal.signal(signal.SIGTERM, lambda *_: flags.update(stop=True))
    # herder forwards USR1 and USR2 to the workers and to the agent.
    signal.signal(signal.SIGUSR1, lambda *_: log("got SIGUSR1"))
    signal.signal(signal.SIGUSR2, lambda *_: log("got SIGUSR2"))

    lock = threading.Lock()
    in_flight = []

    def handle(conn):
        try:
            serve(conn)
        finally:
            with lock:
                in_flight.remove(threading.current_thread())

    # accept(2) gives up after 50 ms (SO_RCVTIMEO) so that a draining worker stops accepting
    # at once instead of taking one more connection from a blocking accept. (Python's own
    # timeout would set O_NONBLOCK on the listening socket, shared by the whole pool.)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 50_000))

    def accept_loop():
        while not flags["stop"]:
            try:
                conn, _ = lsock.accept()
            except BlockingIOError:
                continue
            except OSError as e:
                log(f"accept failed: {e}")
                time.sleep(0.01)
                continue
            t = threading.Thread(target=handle, args=(conn,), daemon=True)
            with lock:
                in_flight.append(t)
            t.start()

    acceptor = threading.Thread(target=accept_loop, daemon=True)
    acceptor.start()
    addr = os.environ.get("NOTIFY_SOCKET")
    if addr:
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        n.sendto(b"READY=1", addr)
        n.close()
    while not flags["stop"]:
        time.sleep(0.05)
    # Draining: no new connections, the ones accepted are answered; the agent must still
    # answer too.
    acceptor.join(5)
    with lock:
        left = list(in_flight)
    for t in left:
        t.join(30)
    try:
        log(f"last agent reply: {ask_agent('last request')}")
    except Exception as e:  # noqa: BLE001
        log(f"last agent request failed: {e!r}")
    os._exit(0)


main()
