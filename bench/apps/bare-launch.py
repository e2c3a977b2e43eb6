#!/usr/bin/env python3
"""The "no supervisor" reference: bind once, start N copies of COMMAND, each with the socket at
fd 3 and LISTEN_FDS=1, LISTEN_PID=<its own pid> (sd_listen_fds(3)), then only wait.
No restarts, no reloads. SIGTERM/SIGINT are forwarded to the copies.

    bare-launch.py HOST:PORT N -- COMMAND [ARG]...
"""
import os
import signal
import socket
import sys


def main():
    addr, n, sep, *cmd = sys.argv[1:]
    assert sep == "--" and cmd, __doc__
    host, port = addr.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(1024)
    pids = []
    for _ in range(int(n)):
        pid = os.fork()
        if pid == 0:
            if sock.fileno() == 3:
                os.set_inheritable(3, True)  # dup2(3, 3) would leave FD_CLOEXEC set
            else:
                os.dup2(sock.fileno(), 3)  # the new fd has FD_CLOEXEC clear
            env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
            try:
                os.execvpe(cmd[0], cmd, env)
            finally:
                os._exit(127)
        pids.append(pid)
    sock.close()

    def forward(sig, _frame):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while pids:
        try:
            pid, _ = os.wait()
            pids.remove(pid)
        except ChildProcessError:
            break
        except InterruptedError:
            continue


if __name__ == "__main__":
    main()
