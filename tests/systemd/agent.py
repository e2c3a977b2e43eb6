#!/usr/bin/env python3
"""The agent and the pool worker of the e2e suite's [9] (herder --agent, issue 14), run inside the
container under agent.service. Only what python3-minimal ships: socket, signal, os.

  agent.py agent    the singleton: one line in, one line out per connection on the socket at fd 3
                    (LISTEN_FDNAMES=agent), answering "agent pid=P n=N: <the line>"; sends READY=1
                    to herder after AGENT_READY_DELAY_MS (its start-up work, so the suite can see
                    that systemd's "active" waits for the agent); on SIGTERM logs and exits 0
  agent.py worker   a pool worker on the socket at fd 3: asks the agent at HERDER_AGENT_SOCKET once
                    before READY=1, and again for every HTTP request, whose answer is
                    "pid=W slot=S agent=<the agent's answer>". On SIGTERM (its drain) it waits
                    WORKER_DRAIN_MS, asks the agent once more, logs
                    "e2e worker S (pid W) draining: the agent answered '...'" and exits 0 -- or logs
                    "... the agent did not answer: ..." and exits 1: herder must keep the agent
                    until the last worker has exited.
Log lines go to stderr (the unit's journal); the suite matches them.
"""
import os, signal, socket, sys, time


class Stop(Exception):
    """Raised by the SIGTERM handler: interrupts accept() (PEP 475 retries only if it returns)."""


def on_term(signum, frame):
    # once: a second SIGTERM (herder's and systemd's, under KillMode=control-group) must not cut
    # the drain short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Stop()


def log(msg):
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def notify(msg):
    # sd_notify(3): one datagram to $NOTIFY_SOCKET (herder's, never systemd's); "@" = abstract
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(msg.encode(), addr)


def inherited_socket():
    # sd_listen_fds(3): fd 3, when LISTEN_PID is us
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        sys.exit("agent.py: expected one socket at fd 3 (LISTEN_FDS=%s LISTEN_PID=%s)"
                 % (os.environ.get("LISTEN_FDS"), os.environ.get("LISTEN_PID")))
    return socket.socket(fileno=3)


def read_line(s):
    data = b""
    while b"\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace")


def ask_agent(line):
    """One request to the agent at $HERDER_AGENT_SOCKET (herder's --listen syntax); its answer."""
    addr = os.environ["HERDER_AGENT_SOCKET"]
    if addr.startswith("unix:"):
        path = addr[len("unix:"):]
        target = "\0" + path[1:] if path.startswith("@") else path
        s = socket.socket(socket.AF_UNIX)
    else:
        host, _, port = addr.rpartition(":")
        host = host.strip("[]")
        target = (host, int(port))
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    with s:
        s.settimeout(5)
        s.connect(target)
        s.sendall(line.encode() + b"\n")
        return read_line(s)


def agent():
    me, n = os.getpid(), 0
    signal.signal(signal.SIGTERM, on_term)
    srv = inherited_socket()
    try:
        time.sleep(int(os.environ.get("AGENT_READY_DELAY_MS", "0")) / 1000)
        notify("READY=1\nSTATUS=answered 0")
        while True:
            conn, _ = srv.accept()
            with conn:
                try:
                    conn.settimeout(5)
                    line = read_line(conn)
                    n += 1
                    conn.sendall(("agent pid=%d n=%d: %s\n" % (me, n, line)).encode())
                except OSError as e:
                    log("e2e agent: a request failed: %r" % (e,))
    except Stop:
        log("e2e agent (pid %d): SIGTERM after %d requests, exiting 0" % (me, n))
    return 0


def serve(conn, slot, me):
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk
    body = "pid=%d slot=%s agent=%s\n" % (me, slot, ask_agent("worker %s (pid %d) serving" % (slot, me)))
    conn.sendall(("HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                  % (len(body), body)).encode())


def worker():
    slot, me = os.environ.get("HERDER_WORKER", "?"), os.getpid()
    signal.signal(signal.SIGTERM, on_term)
    srv = inherited_socket()
    try:
        ask_agent("worker %s (pid %d) starting" % (slot, me))
        notify("READY=1")
        while True:
            conn, _ = srv.accept()
            with conn:
                try:
                    serve(conn, slot, me)
                except OSError as e:
                    log("e2e worker %s (pid %d): a request failed: %r" % (slot, me, e))
    except Stop:
        pass
    # the drain: work that still needs the agent
    time.sleep(int(os.environ.get("WORKER_DRAIN_MS", "0")) / 1000)
    try:
        reply = ask_agent("worker %s (pid %d) draining" % (slot, me))
    except OSError as e:
        log("e2e worker %s (pid %d) draining: the agent did not answer: %r" % (slot, me, e))
        return 1
    log("e2e worker %s (pid %d) draining: the agent answered '%s'" % (slot, me, reply))
    return 0


if __name__ == "__main__":
    roles = {"agent": agent, "worker": worker}
    if len(sys.argv) != 2 or sys.argv[1] not in roles:
        sys.exit(__doc__)
    sys.exit(roles[sys.argv[1]]())
