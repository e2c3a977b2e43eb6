#!/usr/bin/env python3
# herder's agent: one process beside the pool, keeping the hit count of all the workers. It serves
# one line each way on the socket herder holds for it (--agent-listen) and hands it at fd 3.
import os, signal, socket, sys, threading

listener = socket.socket(fileno=3)   # LISTEN_FDS=1, LISTEN_FDNAMES=agent
hits, lock = 0, threading.Lock()     # the whole pool's state: only one agent runs

def serve(conn):
    global hits
    with conn, conn.makefile("rwb") as f:
        for line in f:                   # a request per line, an answer per line
            if line.strip() != b"hit":
                f.write(b"error: unknown request\n")
            else:
                with lock:
                    hits += 1
                    f.write(b"%d\n" % hits)
            f.flush()

def notify(message):                 # sd_notify(3): one datagram to $NOTIFY_SOCKET
    path = os.environ["NOTIFY_SOCKET"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), "\0" + path[1:] if path[0] == "@" else path)

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # herder stops the agent after the pool
notify("READY=1")                    # --agent-ready notify: now herder starts the workers
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
