#!/usr/bin/env bash
# shellcheck disable=SC2016  # sh -c / bash -c scripts in single quotes take their arguments as $1..
# nspawn.sh -- boot a real systemd (Debian, in a systemd-nspawn container) so herder's tests can drive
# units with systemctl and journalctl, even on machines whose own PID 1 is not systemd (our CI VMs).
#
# Adapted from the team's reference tool shared/tools/systemd-boot.sh (and its notes in
# shared/notes/real-systemd.md): same approach -- debootstrap once, boot with
# `systemd-nspawn --boot --register=no --keep-unit`, enter with nsenter -- trimmed to what herder's
# suite needs, with the rootfs cache keyed by suite + package list so bookworm and trixie coexist.
#
# Usage:
#   nspawn.sh build                       build the cached rootfs for SD_SUITE if missing (prints its path)
#   nspawn.sh start [NSPAWN-ARG]...       build if needed, boot in the background, wait until
#                                         `systemctl is-system-running` is running/degraded
#                                         (extra args go to systemd-nspawn, e.g. --bind-ro=HOST:CONT)
#   nspawn.sh exec CMD [ARG]...           run CMD inside; exit status is CMD's; stdio passes through
#   nspawn.sh copy HOST-FILE CONT-PATH    copy one file in (mode kept)
#   nspawn.sh status | logs | stop        is it up? / console output (while it runs) / orderly halt,
#                                         SIGKILL on timeout
#
# Environment (all optional):
#   SD_SUITE=bookworm         Debian suite (bookworm: systemd 252; trixie: systemd 257)
#   SD_CACHE=/var/tmp/herder-systemd   where rootfs trees are cached, one per suite+packages key
#   SD_MIRROR=                Debian mirror; default: the first .../debian URI in the host's apt sources
#   SD_EXTRA_PACKAGES=        more packages for debootstrap --include (comma list); part of the key
#   SD_NAME=herder-e2e        instance name: hostname inside, host cgroup, state dir; allows parallel runs
#   SD_BOOT_TIMEOUT=60        seconds to wait for the boot
#   SD_STOP_TIMEOUT=20        seconds to wait for an orderly halt before SIGKILL
#
# Needs root (CAP_SYS_ADMIN), systemd-nspawn, debootstrap and nsenter: see install-deps.sh.
set -euo pipefail

SD_SUITE=${SD_SUITE:-bookworm}
SD_CACHE=${SD_CACHE:-/var/tmp/herder-systemd}
SD_EXTRA_PACKAGES=${SD_EXTRA_PACKAGES:-}
SD_NAME=${SD_NAME:-herder-e2e}
SD_BOOT_TIMEOUT=${SD_BOOT_TIMEOUT:-60}
SD_STOP_TIMEOUT=${SD_STOP_TIMEOUT:-20}

# What a test needs inside: systemd as PID 1, dbus (systemctl's bus), procps (ps/pgrep for checks),
# python3-minimal (HTTP clients; curl is not in minbase).
PACKAGES=systemd,systemd-sysv,dbus,procps,python3-minimal${SD_EXTRA_PACKAGES:+,$SD_EXTRA_PACKAGES}
# Bump when the recipe in cmd_build changes: it is part of the cache key.
RECIPE=1
KEY=$(printf '%s\n' "$RECIPE" "$SD_SUITE" "$PACKAGES" | sha256sum | cut -c1-12)
ROOTFS=$SD_CACHE/$SD_SUITE-$KEY
STATE=/run/herder-nspawn/$SD_NAME
PIDFILE=$STATE/nspawn.pid
CONSOLE=$STATE/console.log
CGROUP=herder-nspawn-$SD_NAME
# Timers that would fire during a test, and have no business in a throwaway container.
MASK="apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer
e2scrub_reap.service systemd-timesyncd.service"

log() { printf 'nspawn.sh[%s]: %s\n' "$SD_NAME" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $SD_NAME =~ ^[A-Za-z0-9][A-Za-z0-9-]{0,30}$ ]] || die "SD_NAME must be letters, digits, dashes"
[ "$(id -u)" = 0 ] || die "must run as root"

# ------------------------------------------------------------------------------------------------ rootfs

# The Debian mirror the host's apt already uses (deb822 .sources or one-line .list); never a guess.
mirror() {
    [ -n "${SD_MIRROR:-}" ] && { echo "$SD_MIRROR"; return; }
    local u
    u=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }'
        cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { print $i; break } }')
    u=$(grep -E '/debian/?$' <<<"$u" | head -1) || die "no Debian mirror in the host's apt sources; set SD_MIRROR"
    echo "${u%/}"
}

# Remove a tree, first unmounting whatever a failed debootstrap left mounted inside it (/proc, /sys).
remove_tree() {
    local d=$1 m
    [ -e "$d" ] || return 0
    d=$(realpath "$d")
    [[ $d == "$SD_CACHE"/* ]] || die "refusing to remove $d (outside $SD_CACHE)"
    awk -v d="$d" 'index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r |
        while read -r m; do umount -l "$m" || true; done
    rm -rf --one-file-system -- "$d"
}

cmd_build() {
    mkdir -p "$SD_CACHE"
    exec 8>"$ROOTFS.lock"
    flock 8                                       # one build per key at a time; others wait and reuse it
    if [ -x "$ROOTFS/usr/lib/systemd/systemd" ] && [ -f "$ROOTFS/.built" ]; then
        echo "$ROOTFS"; return 0
    fi
    local tmp=$ROOTFS.tmp t0=$SECONDS m
    m=$(mirror)
    remove_tree "$tmp"
    log "building $SD_SUITE rootfs from $m (about 2 minutes, once; cached in $ROOTFS)"
    if ! debootstrap --variant=minbase --include="$PACKAGES" "$SD_SUITE" "$tmp" "$m" >"$ROOTFS.log" 2>&1; then
        tail -20 "$ROOTFS.log" >&2
        remove_tree "$tmp"
        die "debootstrap failed (log: $ROOTFS.log)"
    fi
    # shellcheck disable=SC2086
    systemctl --root="$tmp" mask $MASK >/dev/null 2>&1 || true
    rm -f "$tmp/etc/hostname"                     # so the hostname inside is $SD_NAME
    chroot "$tmp" apt-get clean
    rm -rf "$tmp"/var/lib/apt/lists/* "$tmp"/var/cache/apt/*.bin
    date -u +%FT%TZ >"$tmp/.built"
    remove_tree "$ROOTFS"
    mv "$tmp" "$ROOTFS"
    log "rootfs built in $((SECONDS - t0))s ($(du -sh "$ROOTFS" | cut -f1))"
    echo "$ROOTFS"
}

# ------------------------------------------------------------------------------------------------ running

# nspawn's pid from our pid file, if that pid is still our nspawn (guards against pid reuse).
nspawn_pid() {
    local p
    p=$(cat "$PIDFILE" 2>/dev/null) || return 1
    tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q "^systemd-nspawn .*-M $SD_NAME " || return 1
    echo "$p"
}

# The container's PID 1 as the host sees it: nspawn's child in another pid namespace whose comm is
# systemd (during set-up nspawn has short-lived helpers that are neither).
leader_pid() {
    local np c
    np=$(nspawn_pid) || return 1
    for c in $(cat /proc/"$np"/task/*/children 2>/dev/null); do
        [ "$(readlink "/proc/$c/ns/pid")" != "$(readlink /proc/self/ns/pid)" ] || continue
        [ "$(cat "/proc/$c/comm" 2>/dev/null)" = systemd ] && { echo "$c"; return 0; }
    done
    return 1
}

# Run in all the container's namespaces with a clean environment (no host CI variables leak in).
# systemctl -M / machinectl need machined on the host, which we do not have: hence nsenter.
# setsid: a new session, so nothing inside (a `kill 0`, a terminal signal) reaches the caller's group.
inside() {
    local l=$1; shift
    setsid -w nsenter --target "$l" --mount --uts --ipc --net --pid --cgroup --root --wd -- \
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 SYSTEMD_PAGER= SYSTEMD_COLORS=0 "$@"
}

# Host cgroup hierarchies systemd cares about: /sys/fs/cgroup on a unified host; name=systemd and the
# cgroup2 mount on a hybrid one (our CI VMs are hybrid).
cgroup_roots() {
    if [ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ]; then echo /sys/fs/cgroup; return; fi
    [ -d /sys/fs/cgroup/systemd ] && echo /sys/fs/cgroup/systemd
    [ -f /sys/fs/cgroup/unified/cgroup.procs ] && echo /sys/fs/cgroup/unified
    return 0
}

cleanup() {
    local r
    for r in $(cgroup_roots); do
        [ -d "$r/$CGROUP" ] && find "$r/$CGROUP" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
    # nspawn refuses to delete this itself when the host's /run is not a tmpfs
    rm -rf --one-file-system "/run/systemd/nspawn/propagate/$SD_NAME"
    rm -f "$PIDFILE"
}

cmd_start() {
    nspawn_pid >/dev/null && die "already running; stop it first"
    command -v systemd-nspawn >/dev/null && command -v debootstrap >/dev/null && command -v nsenter >/dev/null ||
        die "missing systemd-nspawn/debootstrap/nsenter: run tests/systemd/install-deps.sh"
    cmd_build >/dev/null
    exec 8>&-
    cleanup
    mkdir -p "$STATE"
    # A cgroup2-only container: systemd ≥ 256 refuses (taints) hybrid. The host's cgroup2 mount has no
    # controllers, so MemoryMax= etc. are accepted but not enforced -- tests must not rely on them.
    export SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1
    local opts=(--boot -D "$ROOTFS" -M "$SD_NAME"
        --register=no --keep-unit   # no systemd/machined on the host to register a scope with
        --volatile=overlay          # the cache is the read-only lower layer: every boot starts pristine
        --private-network           # only lo inside: fixed ports never clash with the host or other runs
        --console=passive --link-journal=no --resolv-conf=off --timezone=off)
    # --keep-unit means "stay in the cgroup I was started in": give nspawn a fresh one per instance, so
    # its payload/ and supervisor/ subtrees are ours to remove at stop. The launcher records its pid,
    # which exec keeps for nspawn.
    setsid bash -c 'for r in $1; do mkdir -p "$r/$2" && echo $$ >"$r/$2/cgroup.procs"; done
                    echo $$ >"$3"; shift 3; exec "$@"' \
        launch "$(cgroup_roots | tr '\n' ' ')" "$CGROUP" "$PIDFILE" systemd-nspawn "${opts[@]}" "$@" \
        >"$CONSOLE" 2>&1 </dev/null &
    local t0=$EPOCHREALTIME deadline=$((SECONDS + SD_BOOT_TIMEOUT)) l="" state=""
    while [ $SECONDS -lt $deadline ]; do
        if [ -s "$PIDFILE" ] && ! nspawn_pid >/dev/null; then
            tail -30 "$CONSOLE" >&2; cleanup; die "systemd-nspawn exited during boot"
        fi
        if l=$(leader_pid); then
            state=$(inside "$l" systemctl is-system-running 2>/dev/null) || true
            case $state in running|degraded) break ;; esac
        fi
        sleep 0.1
    done
    case $state in
        running|degraded) ;;
        *) [ -n "$l" ] && inside "$l" systemctl list-jobs --no-pager >&2
           tail -30 "$CONSOLE" >&2; cmd_stop; die "boot timed out after ${SD_BOOT_TIMEOUT}s (state: ${state:-none})" ;;
    esac
    [ "$state" = degraded ] && inside "$l" systemctl --failed --no-pager --no-legend >&2
    log "up: $SD_SUITE, system $state after $(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $t0 }")s"
}

cmd_exec() {
    local l
    l=$(leader_pid) || die "not running"
    inside "$l" "$@"
}

cmd_copy() {
    [ $# = 2 ] && [ -f "$1" ] || die "usage: copy HOST-FILE CONTAINER-PATH"
    cmd_exec sh -c 'mkdir -p "$(dirname "$1")" && cat >"$1" && chmod "$2" "$1"' sh "$2" "$(stat -c %a "$1")" <"$1"
}

cmd_stop() {
    local np l i
    np=$(nspawn_pid) || { cleanup; return 0; }
    l=$(leader_pid) || true
    kill -TERM "$np"                # nspawn turns this into SIGRTMIN+3 for the container: orderly halt
    for ((i = 0; i < SD_STOP_TIMEOUT * 10; i++)); do kill -0 "$np" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$np" 2>/dev/null; then
        log "no orderly halt within ${SD_STOP_TIMEOUT}s: SIGKILL to container pid 1 ($l) and nspawn ($np)"
        [ -n "$l" ] && kill -KILL "$l" 2>/dev/null    # takes the whole pid namespace with it
        kill -KILL "$np" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do kill -0 "$np" 2>/dev/null || break; sleep 0.1; done
    fi
    cleanup
    rm -rf "$STATE"                 # the console log goes too: dump it (logs) before stopping if needed
    log "stopped"
}

case ${1:-} in
    build) cmd_build ;;
    start) shift; cmd_start "$@" ;;
    exec) shift; [ $# -gt 0 ] || set -- bash; cmd_exec "$@" ;;
    copy) shift; cmd_copy "$@" ;;
    status) np=$(nspawn_pid) || { echo "$SD_NAME: not running"; exit 3; }
            echo "$SD_NAME: nspawn $np, system $(cmd_exec systemctl is-system-running || true)" ;;
    logs) cat "$CONSOLE" ;;
    stop) cmd_stop ;;
    *) sed -n '3,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
esac
