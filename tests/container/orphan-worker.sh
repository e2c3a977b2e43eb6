# orphan-worker.sh MARKS DEMO [ARG]... -- run by /bin/busybox sh as a herder worker.
# Leaves one orphan behind, then execs the demo worker (same pid, so LISTEN_PID still holds).
# The orphan: a subshell starts a sleeper in the background and exits at once, so the sleeper is
# reparented to PID 1 (herder). After 200 ms the sleeper writes MARKS/<its pid> = the ppid it
# then has (1 when PID 1 adopted it) and exits: only PID 1 can reap it. Neither keeps the
# listening socket (fd 3) open.
marks=$1; shift
(
    exec 3>&-
    /bin/busybox sh -c '
        /bin/busybox sleep 0.2
        read -r s < /proc/$$/stat
        set -- ${s##*) }
        echo "$2" > "$0/$$"
    ' "$marks" &
)
exec "$@"
