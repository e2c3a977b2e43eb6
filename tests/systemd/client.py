#!/usr/bin/env python3
"""HTTP client the e2e suite runs *inside* the container (private network: only lo).

Only what python3-minimal ships (no json, no http.client: raw sockets and key=value output). Subcommands:
  get PATH                  one request; prints the body; exit 1 unless 200
  spread N                  up to 200 requests until N distinct worker pids answered; prints them
  load DIR                  4 threads of requests until DIR/stop exists (at most 120 s); writes
                            DIR/load.out (lines ok=N, failed=N, refused=N, reset=N, pids=P,P, error=...);
                            DIR/load.started after the first OK (refused: connect() said
                            ECONNREFUSED; reset: reset or closed with no answer; both counted
                            in failed too)
  slow MS DIR               GET /sleep?ms=MS; touches DIR/sent once the request is written, then
                            writes status and body to DIR/slow.out
  accepted PORT             exit 0 when the accept queue of the listening socket on PORT is empty,
                            i.e. every connection made so far has been accept()ed by a worker
"""
import os, socket, sys, threading, time

# E2E_PORT: the port of the unit under test (8080: app.socket; 8081: [8], the fd store unit)
HOST, PORT = "127.0.0.1", int(os.environ.get("E2E_PORT", "8080"))


def request(path, timeout=10):
    """Returns (status, body) or raises."""
    with socket.create_connection((HOST, PORT), timeout=timeout) as s:
        s.sendall(b"GET %s HTTP/1.1\r\nHost: e2e\r\nConnection: close\r\n\r\n" % path.encode())
        return read_response(s)


def read_response(s):
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body.decode(errors="replace")


def pid_of(body):
    for field in body.split():
        if field.startswith("pid="):
            return int(field[4:])
    return None


def cmd_get(path):
    status, body = request(path)
    sys.stdout.write(body)
    return 0 if status == 200 else 1


def cmd_spread(n):
    pids = set()
    for _ in range(200):
        status, body = request("/")
        if status == 200 and pid_of(body):
            pids.add(pid_of(body))
        if len(pids) >= int(n):
            break
    print(" ".join(str(p) for p in sorted(pids)))
    return 0 if len(pids) >= int(n) else 1


def cmd_load(d):
    stop, lock = os.path.join(d, "stop"), threading.Lock()
    res = {"ok": 0, "failed": 0, "refused": 0, "reset": 0, "errors": [], "pids": []}
    pids, deadline = set(), time.monotonic() + 120

    def worker():
        while not os.path.exists(stop) and time.monotonic() < deadline:
            try:
                status, body = request("/", timeout=10)
                err = None if status == 200 and pid_of(body) else "status %d body %r" % (status, body[:80])
            except OSError as e:
                err = repr(e)
            with lock:
                if err:
                    res["failed"] += 1
                    res["refused"] += err.startswith("ConnectionRefusedError")
                    # reset or closed without an answer: the server side died holding it
                    res["reset"] += err.startswith(("ConnectionResetError", "status 0 "))
                    res["errors"].append(err)
                else:
                    res["ok"] += 1
                    pids.add(pid_of(body))
                    if res["ok"] == 1:
                        open(os.path.join(d, "load.started"), "w").close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = os.path.join(d, "load.out")
    with open(out + ".tmp", "w") as f:
        f.write("ok=%d\nfailed=%d\nrefused=%d\nreset=%d\npids=%s\n" % (
            res["ok"], res["failed"], res["refused"], res["reset"], ",".join(map(str, sorted(pids)))))
        for e in res["errors"][:10]:
            f.write("error=%s\n" % e)
    os.rename(out + ".tmp", out)  # appears complete or not at all
    return 0


def cmd_slow(ms, d):
    out = os.path.join(d, "slow.out")
    try:
        with socket.create_connection((HOST, PORT), timeout=30) as s:
            s.sendall(b"GET /sleep?ms=%d HTTP/1.1\r\nHost: e2e\r\nConnection: close\r\n\r\n" % int(ms))
            open(os.path.join(d, "sent"), "w").close()
            status, body = read_response(s)
        text = "status=%d body=%s" % (status, body.strip())
    except OSError as e:
        text = "error=%r" % (e,)
    with open(out + ".tmp", "w") as f:
        f.write(text + "\n")
    os.rename(out + ".tmp", out)
    return 0


def cmd_accepted(port):
    # /proc/net/tcp{,6}: for a socket in LISTEN state (st 0A) rx_queue is the accept-queue length.
    # ListenStream=8080 binds [::]:8080 (dual stack), which only tcp6 lists.
    want, found = ":%04X" % int(port), False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[1].endswith(want) and fields[3] == "0A":
                    found = True
                    if int(fields[4].split(":")[1], 16) != 0:
                        return 1
    return 0 if found else 2


if __name__ == "__main__":
    cmds = {"get": cmd_get, "spread": cmd_spread, "load": cmd_load, "slow": cmd_slow, "accepted": cmd_accepted}
    if len(sys.argv) < 2 or sys.argv[1] not in cmds:
        sys.exit(__doc__)
    sys.exit(cmds[sys.argv[1]](*sys.argv[2:]))
