"""The /proc readers of the soak: a process's children, state, open fds, memory and limits.

Linux only and read-only: each returns None (or an empty answer) when the process is gone or
unreadable, never raises; none of them signals or changes a process.
"""
import os

from ..procs import children as proc_children  # noqa: F401 (the benchmarks' own reader)


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

