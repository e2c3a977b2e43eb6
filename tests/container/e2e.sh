#!/usr/bin/env bash
# e2e.sh -- herder as PID 1, proven with real processes (issue 5, "Prove" 1-4):
#
#   part "ns":     herder as PID 1 of a fresh pid namespace (`unshare --pid --fork --mount-proc`),
#                  on any Linux root machine, with HERDER_BIN / HERDER_DEMO_BIN (default: the
#                  static binaries the podman part builds), plus a negative control: a PID 1 that
#                  does not reap leaves a zombie, and the zombie check sees it.
#   part "podman": the real image (top-level Dockerfile, `--target prebuilt` from host-built static
#                  binaries: nothing can be pulled here) run by podman with `--runtime runc`.
#
# Both check: several workers serve; SIGTERM / `podman stop` drains an in-flight request and exits
# 0 well inside the grace; SIGHUP / `podman kill -s HUP` rolls every worker with no failed request;
# orphans are reparented to herder and reaped; exit status 0 / 1 / 2 / 3 per the table; /readyz
# turns 503 at SIGTERM while requests are still served through --shutdown-delay; /status is valid
# JSON matching the pool; --user nobody workers run as uid 65534 (in the container, on port 80).
#
#   part "manifest": packaging/kubernetes.yaml's grace-period arithmetic and probe ports hold.
#   part "source" (opt-in, minutes): the default `docker build .` path, the Rust image replaced by
#                  a stand-in made of this host's toolchain (nothing can be pulled here).
#
# Usage: tests/container/e2e.sh [manifest] [ns] [podman]   (default all; needs root; run
#        tests/container/install-deps.sh first). Prints PASS/FAIL lines and "N passed, N failed";
#        exits 1 on any failure, 77 when a prerequisite is missing (the Rust wrapper decides
#        whether that is a skip). Every wait polls for evidence with a deadline; everything it
#        starts is stopped by pid or container name, and removed, on exit.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

PARTS=("$@")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(manifest ns podman)
BUSYBOX=/bin/busybox
T_START=$(now)

missing() { echo "e2e: missing prerequisite: $*" >&2; exit 77; }
[ "$(id -u)" = 0 ] || missing "root (unshare --pid, podman)"
for tool in unshare curl python3 awk find; do command -v "$tool" >/dev/null || missing "$tool"; done
file -L "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' || missing "static $BUSYBOX (busybox-static)"
if [[ " ${PARTS[*]} " == *" podman "* || " ${PARTS[*]} " == *" source "* ]]; then
    command -v podman >/dev/null || missing "podman (tests/container/install-deps.sh)"
    command -v runc >/dev/null || missing "runc (tests/container/install-deps.sh)"
fi

WORK=$(mktemp -d /tmp/herder-e2e.XXXXXX)
chmod 755 "$WORK"
BG_PIDS=()     # our background children (unshare, curl, podman stop, loops): killed by pid
CONTAINERS=()  # container names: removed
IMAGE=""       # image tag: removed
IMAGES_EXTRA=()
cleanup() {
    local p c
    # Only processes that are still our children: a pid we already reaped may be someone else's.
    for p in "${BG_PIDS[@]}"; do [ "$(stat_field "$p" 2)" = $$ ] && kill -KILL "$p" 2>/dev/null; done
    for p in "${BG_PIDS[@]}"; do wait "$p" 2>/dev/null; done
    for c in "${CONTAINERS[@]}"; do pm rm -f -t 0 "$c" >/dev/null 2>&1; done
    for c in "$IMAGE" "${IMAGES_EXTRA[@]}"; do [ -n "$c" ] && pm rmi -f "$c" >/dev/null 2>&1; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Ports 18000-18999, from a per-run offset; a port something listens on is skipped.
NEXT_PORT=$((18000 + ($$ % 80) * 12))
next_port() {
    while ss -Hltn "sport = :$NEXT_PORT" 2>/dev/null | grep -q .; do NEXT_PORT=$((NEXT_PORT + 1)); done
    printf -v "$1" '%s' "$NEXT_PORT"; NEXT_PORT=$((NEXT_PORT + 1))
}

# wait_exit PID SECONDS: wait for our child PID to end, by a deadline; sets RC (124 on timeout).
wait_exit() {
    if wait_for "$2" dead "$1"; then wait "$1"; RC=$?; else RC=124; fi
}
# slow_request URL MS: start a slow GET in the background; its output goes to $WORK/slow.out.
slow_request() {
    curl -s -m 30 -o "$WORK/slow.out" -w '%{http_code}' "$1/sleep?ms=$2" >"$WORK/slow.code" 2>/dev/null &
    SLOW_PID=$!; BG_PIDS+=("$SLOW_PID")
}
# slow_finish: wait for the slow GET (a deadline: curl -m 30); its status code into SLOW_CODE.
slow_finish() { wait "$SLOW_PID"; SLOW_CODE=$(cat "$WORK/slow.code" 2>/dev/null); }
# request_loop URL SECONDS: GET / in a bounded loop until $WORK/stop-loop exists or the deadline
# passes; counts answers other than 200 into $WORK/loop.fail.
request_loop() {
    local url=$1 deadline n=0 bad=0
    deadline=$(awk -v n="$(now)" -v s="$2" 'BEGIN { printf "%.3f", n + s }')
    while [ ! -e "$WORK/stop-loop" ] && lt "$(now)" "$deadline"; do
        n=$((n + 1)); [ "$(http_code "$url/")" = 200 ] || bad=$((bad + 1))
    done
    echo "$n $bad" >"$WORK/loop.result"
}
start_loop() { rm -f "$WORK/stop-loop" "$WORK/loop.result"; request_loop "$1" "$2" & LOOP_PID=$!; BG_PIDS+=("$LOOP_PID"); }
stop_loop() { touch "$WORK/stop-loop"; wait "$LOOP_PID"; read -r LOOP_N LOOP_BAD <"$WORK/loop.result"; }
# marks DIR: the orphans orphan-worker.sh left: "PID PPID" lines.
marks() { local f; for f in "$1"/*; do [ -e "$f" ] && printf '%s %s\n' "${f##*/}" "$(cat "$f")"; done; }
marks_at_least() { [ "$(marks "$1" | wc -l)" -ge "$2" ]; }
marks_all_ppid1() { [ -z "$(marks "$1" | awk '$2 != 1')" ]; }
# orphans_gone DIR HERDER_HOSTPID: no child of herder has the (namespace) pid of a marked orphan:
# a zombie that was never reaped would still be there.
orphans_gone() {
    local c
    for c in $(children_of "$2" | awk '{ print $1 }'); do
        [ -e "$1/$(pid_in_ns "$c")" ] && return 1
    done
    return 0
}
# worker_uids HOSTPID: uids of herder's live children.
worker_uids() {
    local c
    for c in $(children_of "$1" | awk '$2 != "Z" { print $1 }'); do uid_of "$c"; done | sort -u
}
# served_by_several URL HOSTPID: >= 2 distinct workers answer 12 GET /, all of them herder's.
served_by_several() {
    local served pids
    served=$(served_pids "$1" 12); pids=$(tree_pids "$2" herder-demo)
    [ "$(grep -c . <<<"$served")" -ge 2 ] || { echo "fewer than 2 workers answered: $served" >&2; return 1; }
    [ -z "$(comm -23 <(sort <<<"$served") <(sort <<<"$pids"))" ] ||
        { echo "served pids $served not all herder's workers $pids" >&2; return 1; }
}
# status_matches URL HOSTPID N: /status is valid JSON, N slots all ready, herder's pid 1, and its
# slots' pids exactly the workers herder runs.
status_matches() {
    local s; s=$(status "$1") || return 1
    [ "$(awk '{ print $2, $3, $5 }' <<<"$s")" = "$3 $3 1" ] ||
        { echo "/status: $s, want $3 slots all ready, herder pid 1" >&2; return 1; }
    [ "$(worker_pids "$1")" = "$(tree_pids "$2" herder-demo)" ] ||
        { echo "/status pids $(worker_pids "$1" | xargs) != workers $(tree_pids "$2" herder-demo | xargs)" >&2; return 1; }
}
ready_code() { is_code "$2" "$1/readyz"; }
# served_while_lame URL HEALTH: after /readyz said 503, GET / still answers 200 three times.
served_while_lame() {
    local i
    for i in 1 2 3; do
        [ "$(http_code "$1/")" = 200 ] || { echo "GET / failed during the shutdown delay" >&2; return 1; }
        [ "$(http_code "$2/readyz")" = 503 ] || { echo "/readyz not 503 during the delay" >&2; return 1; }
    done
}
show_log() { echo "---- $1 (last lines) ----" >&2; tail -n 25 "$2" >&2 2>/dev/null; }

# ================================ part ns: unshare --pid ========================================
# ns_start NAME HERDER-ARGS...: herder as PID 1 of a new pid namespace; sets NS_UNSHARE (host
# pid of unshare, our child) and NS_HERDER (host pid of herder, PID 1 inside).
ns_start() {
    local name=$1; shift
    unshare --pid --fork --kill-child --mount-proc "$HERDER" "$@" >"$WORK/$name.log" 2>&1 &
    # unshare --kill-child: killing unshare (by pid, in cleanup) takes herder and its namespace along.
    NS_UNSHARE=$!; BG_PIDS+=("$NS_UNSHARE")
    NS_HERDER=""
    wait_for 5 only_child "$NS_UNSHARE" && NS_HERDER=$(only_child "$NS_UNSHARE")
}

part_ns() {
    local P H URL HURL old t0 el base
    HERDER=${HERDER_BIN:-$STATIC_DIR/herder}
    DEMO=${HERDER_DEMO_BIN:-$STATIC_DIR/herder-demo}
    log "part ns: herder=$HERDER demo=$DEMO"
    [ -x "$HERDER" ] && [ -x "$DEMO" ] || { fail "ns: binaries exist" "$HERDER $DEMO"; return; }

    # --- a pool of 3 workers, each leaving an orphan behind ---
    next_port P; next_port H; URL=http://127.0.0.1:$P; HURL=http://127.0.0.1:$H
    mkdir -p "$WORK/marks-ns"
    ns_start ns-serve --listen "127.0.0.1:$P" --health "127.0.0.1:$H" --workers 3 \
        -- "$BUSYBOX" sh "$HERE/orphan-worker.sh" "$WORK/marks-ns" "$DEMO"
    if [ -z "$NS_HERDER" ]; then fail "ns: herder started"; show_log ns-serve "$WORK/ns-serve.log"; return; fi
    check "ns: herder is PID 1 of its pid namespace" test "$(pid_in_ns "$NS_HERDER")" = 1
    check "ns: 3 workers run and GET / answers" wait_for 15 serving "$URL" "$NS_HERDER" 3
    check "ns: several workers serve GET /" served_by_several "$URL" "$NS_HERDER"
    check "ns: /readyz 200 once the pool is up" wait_for 5 ready_code "$HURL" 200
    check "ns: /livez 200" is_code 200 "$HURL/livez"
    check "ns: /status valid JSON: 3 slots ready, the pids herder runs" status_matches "$HURL" "$NS_HERDER" 3
    check "ns: orphans reparented to PID 1 (herder)" \
        eval 'wait_for 5 marks_at_least "$WORK/marks-ns" 3 && marks_all_ppid1 "$WORK/marks-ns"'
    check "ns: every orphan reaped, no zombie under herder" \
        eval 'wait_for 3 orphans_gone "$WORK/marks-ns" "$NS_HERDER" && wait_for 3 no_zombies_under "$NS_HERDER"'

    # --- SIGHUP rolls every worker, no request fails meanwhile ---
    old=$(tree_pids "$NS_HERDER" herder-demo)
    start_loop "$URL" 30
    kill -HUP "$NS_HERDER"
    check "ns: SIGHUP rolls the pool (3 workers, all new pids)" wait_for 20 rolled "$URL" "$NS_HERDER" "$old" 3
    stop_loop
    check "ns: no request failed during the roll ($LOOP_N sent)" test "$LOOP_BAD" = 0 -a "$LOOP_N" -gt 0
    check "ns: orphans of the new workers reaped too" \
        eval 'wait_for 5 marks_at_least "$WORK/marks-ns" 6 && wait_for 3 orphans_gone "$WORK/marks-ns" "$NS_HERDER" && no_zombies_under "$NS_HERDER"'

    # --- SIGTERM drains an in-flight request, exit 0 ---
    base=$(socket_fds "$NS_HERDER")
    slow_request "$URL" 1500
    if wait_for 5 socket_fds_above "$base" "$NS_HERDER"; then
        t0=$(now); kill -TERM "$NS_HERDER"
        slow_finish
        check "ns: SIGTERM: the in-flight slow request completes (200)" test "$SLOW_CODE" = 200
        wait_exit "$NS_UNSHARE" 15; el=$(elapsed_since "$t0")
        check "ns: SIGTERM: herder exits 0 after the drain (${el}s)" test "$RC" = 0
    else
        fail "ns: slow request accepted by a worker"
    fi
    [ "$FAILED" -eq 0 ] || show_log ns-serve "$WORK/ns-serve.log"

    # --- lame duck: /readyz 503 at SIGTERM, still serving through --shutdown-delay ---
    next_port P; next_port H; URL=http://127.0.0.1:$P; HURL=http://127.0.0.1:$H
    ns_start ns-lame --listen "127.0.0.1:$P" --health "127.0.0.1:$H" --workers 2 --shutdown-delay 2s -- "$DEMO"
    if wait_for 15 serving "$URL" "$NS_HERDER" 2; then
        check "ns: lame duck: /readyz 200 before SIGTERM" wait_for 5 ready_code "$HURL" 200
        t0=$(now); kill -TERM "$NS_HERDER"
        check "ns: /readyz turns 503 at SIGTERM" wait_for 1 ready_code "$HURL" 503
        check "ns: GET / still served during --shutdown-delay" served_while_lame "$URL" "$HURL"
        check "ns: /livez still 200 during --shutdown-delay" is_code 200 "$HURL/livez"
        wait_exit "$NS_UNSHARE" 15; el=$(elapsed_since "$t0")
        check "ns: exits 0 after the delay and the drain (${el}s >= 2s)" eval "[ $RC = 0 ] && ! lt $el 2"
    else
        fail "ns: lame-duck pool up"; show_log ns-lame "$WORK/ns-lame.log"
    fi

    # --- the exit status table ---
    "$HERDER" --no-such-flag >"$WORK/usage.log" 2>&1; RC=$?
    check "ns: exit 2 on a usage error" test "$RC" = 2
    check "ns: the usage error is one line on stderr" test "$(grep -c . "$WORK/usage.log")" -le 2
    next_port P
    ns_start ns-giveup --listen "127.0.0.1:$P" --workers 2 --restart-limit 2 --restart-window 60s -- "$BUSYBOX" false
    wait_exit "$NS_UNSHARE" 40
    check "ns: exit 1 when restarts exceed --restart-limit (gave up)" test "$RC" = 1
    next_port P
    ns_start ns-stuck --listen "127.0.0.1:$P" --workers 1 --drain-timeout 1s \
        -- "$BUSYBOX" sh "$HERE/ignore-term-worker.sh"
    if wait_for 15 tree_count_is "$NS_HERDER" busybox 1; then
        t0=$(now); kill -TERM "$NS_HERDER"; wait_exit "$NS_UNSHARE" 15; el=$(elapsed_since "$t0")
        check "ns: exit 3 when a worker had to be SIGKILLed after --drain-timeout 1s (${el}s)" \
            eval "[ $RC = 3 ] && lt $el 5"
    else
        fail "ns: stuck worker started"; show_log ns-stuck "$WORK/ns-stuck.log"
    fi

    # --- a second SIGTERM stops at once ---
    next_port P; URL=http://127.0.0.1:$P
    ns_start ns-force --listen "127.0.0.1:$P" --workers 1 --drain-timeout 30s -- "$DEMO"
    if wait_for 15 serving "$URL" "$NS_HERDER" 1; then
        base=$(socket_fds "$NS_HERDER")
        slow_request "$URL" 20000
        wait_for 5 socket_fds_above "$base" "$NS_HERDER"
        kill -TERM "$NS_HERDER"
        wait_for 3 grep -q 'draining' "$WORK/ns-force.log"
        t0=$(now); kill -TERM "$NS_HERDER"; wait_exit "$NS_UNSHARE" 10; el=$(elapsed_since "$t0")
        check "ns: a second SIGTERM stops at once (${el}s, exit $RC)" eval "lt $el 3 && [ $RC != 124 ]"
        kill -KILL "$SLOW_PID" 2>/dev/null
    else
        fail "ns: force pool up"; show_log ns-force "$WORK/ns-force.log"
    fi

    # --- --user nobody ---
    next_port P; URL=http://127.0.0.1:$P
    ns_start ns-user --listen "127.0.0.1:$P" --workers 2 --user nobody -- "$DEMO"
    if wait_for 15 serving "$URL" "$NS_HERDER" 2; then
        check "ns: --user nobody: workers run as uid 65534" test "$(worker_uids "$NS_HERDER")" = 65534
        check "ns: --user nobody: herder stays root" test "$(uid_of "$NS_HERDER")" = 0
        kill -TERM "$NS_HERDER"; wait_exit "$NS_UNSHARE" 15
        check "ns: --user nobody: exits 0" test "$RC" = 0
    else
        fail "ns: --user nobody pool up"; show_log ns-user "$WORK/ns-user.log"
    fi

    # --- two herders as PID 1 of their own pid namespaces, one network namespace (a pod of two
    #     containers, or `--network host`): each one's pool must start cleanly ---
    local P2 U1 H1
    next_port P; next_port P2
    ns_start ns-twin1 --listen "127.0.0.1:$P" --workers 3 -- "$DEMO"; U1=$NS_UNSHARE; H1=$NS_HERDER
    if wait_for 15 serving "http://127.0.0.1:$P" "$H1" 3; then
        ns_start ns-twin2 --listen "127.0.0.1:$P2" --workers 3 -- "$DEMO"
        check "ns: a second PID-1 herder in the same network namespace starts its pool" \
            wait_for 15 serving "http://127.0.0.1:$P2" "$NS_HERDER" 3
        check "ns: second PID-1 herder in the same network namespace: no failed worker start" eval "! grep 'cannot start worker' '$WORK/ns-twin2.log' >&2"
        [ -n "$NS_HERDER" ] && kill -TERM "$NS_HERDER"; wait_exit "$NS_UNSHARE" 15
    else
        fail "ns: first twin pool up"; show_log ns-twin1 "$WORK/ns-twin1.log"
    fi
    kill -TERM "$H1"; wait_exit "$U1" 15

    # --- negative control: a PID 1 that does not reap leaves a zombie, and the check sees it ---
    unshare --pid --fork --kill-child --mount-proc "$BUSYBOX" sh -c \
        "( $BUSYBOX sleep 0.1 & ); exec $BUSYBOX sleep 30" >/dev/null 2>&1 &
    NS_UNSHARE=$!; BG_PIDS+=("$NS_UNSHARE")
    local init=""; wait_for 5 only_child "$NS_UNSHARE" && init=$(only_child "$NS_UNSHARE")
    check "control: a non-reaping PID 1 (sleep) leaves a zombie the check detects" \
        eval "[ -n '$init' ] && wait_for 5 has_zombies_under '$init'"
    [ -n "$init" ] && kill -KILL "$init"
    wait_exit "$NS_UNSHARE" 5
}

# ================================ part podman: the real image ===================================
pm() { podman --runtime runc "$@"; }

# build_static: herder and herder-demo, statically linked, in target/container (not the other
# builds' target dir). musl when the target is installed (or can be); glibc +crt-static otherwise.
build_static() {
    local target=x86_64-unknown-linux-musl flags=""
    # HERDER_STATIC=glibc forces the fallback (to test the path a machine without rustup's
    # network takes).
    if [ "${HERDER_STATIC:-}" = glibc ]; then
        target=""
    elif ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
        timeout 180 rustup target add "$target" >&2 || target=""
    fi
    if [ -z "$target" ]; then target=x86_64-unknown-linux-gnu; flags="-C target-feature=+crt-static"; fi
    log "building static binaries for $target"
    (cd "$ROOT" && RUSTFLAGS="$flags" cargo build --release --bins --target "$target" \
        --target-dir "$ROOT/target/container" >&2) || return 1
    STATIC_DIR=$ROOT/target/container/$target/release
    file -L "$STATIC_DIR/herder" "$STATIC_DIR/herder-demo" | grep -v -q 'dynamically linked'
}

build_image() {
    local ctx=$WORK/ctx
    mkdir -p "$ctx/bin" "$ctx/packaging/container"
    cp "$ROOT/packaging/container/passwd" "$ROOT/packaging/container/group" "$ctx/packaging/container/"
    cp "$STATIC_DIR/herder" "$STATIC_DIR/herder-demo" "$ctx/bin/"
    IMAGE=localhost/herder-e2e:$$
    pm build -q --layers=false --target prebuilt --build-arg BIN_DIR=bin -f "$ROOT/Dockerfile" -t "$IMAGE" "$ctx" >&2
}

# Explicit ulimits no higher than ours: the runtime cannot raise limits here (no CAP_SYS_RESOURCE),
# and podman itself runs the runtime under nproc 32768, so ask for at most 4096 of each.
lim() { local v; v=$(ulimit "$1"); [ "$v" = unlimited ] || [ "$v" -gt 4096 ] && v=4096; echo "$v"; }
ULIMITS=(--ulimit "nofile=$(lim -Sn):$(lim -Sn)" --ulimit "nproc=$(lim -Su):$(lim -Su)")
# ctr_run NAME PODMAN-RUN-FLAGS... -- IMAGE-ARGS...: start a container detached; sets CTR_PID
# (host pid of its PID 1, i.e. herder).
ctr_run() {
    local name=$1 flags=(); shift
    while [ $# -gt 0 ] && [ "$1" != -- ]; do flags+=("$1"); shift; done
    shift
    CONTAINERS+=("$name")
    pm run -d --name "$name" "${ULIMITS[@]}" "${flags[@]}" "$IMAGE" "$@" >/dev/null 2>"$WORK/$name.err" ||
        { cat "$WORK/$name.err" >&2; CTR_PID=""; return 1; }
    CTR_PID=$(pm inspect -f '{{.State.Pid}}' "$name")
}
# ctr_exit NAME SECONDS: the container's exit status once it has stopped (124: still running).
ctr_exit() {
    RC=$(timeout "$2" podman --runtime runc wait "$1" 2>/dev/null) || RC=124
}
ctr_logs() { echo "---- podman logs $1 ----" >&2; pm logs "$1" 2>&1 | tail -n 25 >&2; }

part_podman() {
    local P H URL HURL old t0 el base failed_before n
    build_image || { fail "podman: build the image (--target prebuilt)"; return; }
    pass "podman: image built from the Dockerfile (--target prebuilt, FROM scratch)"
    check "podman: image entrypoint is herder, example CMD the demo worker" eval \
        "pm image inspect -f '{{.Config.Entrypoint}} {{.Config.Cmd}}' '$IMAGE' | grep -q 'herder .*-- /usr/local/bin/herder-demo'"
    local size; size=$(pm image inspect -f '{{.Size}}' "$IMAGE")
    check "podman: image is small ($((size / 1024)) KiB < 20 MiB)" test "$size" -lt $((20 * 1024 * 1024))

    # --- the image as a user runs it: default ENTRYPOINT and CMD (a worker per CPU) ---
    failed_before=$FAILED
    n=$(nproc)
    next_port P; next_port H; URL=http://127.0.0.1:$P; HURL=http://127.0.0.1:$H
    ctr_run c-default -p "127.0.0.1:$P:8080" -p "127.0.0.1:$H:8081" -- ||
        { fail "podman: run the default image"; return; }
    check "podman: herder is the container's PID 1" test "$(pid_in_ns "$CTR_PID")" = 1
    check "podman: $n workers (one per CPU) run and GET / answers on the published port" \
        wait_for 15 serving "$URL" "$CTR_PID" "$n"
    check "podman: several workers serve GET /" served_by_several "$URL" "$CTR_PID"
    check "podman: /readyz 200 on the published health port" wait_for 5 ready_code "$HURL" 200
    check "podman: /status valid JSON: $n slots ready, the pids herder runs" status_matches "$HURL" "$CTR_PID" "$n"
    old=$(tree_pids "$CTR_PID" herder-demo)
    start_loop "$URL" 30
    pm kill -s HUP c-default >/dev/null
    check "podman: kill -s HUP rolls the pool (all pids new)" wait_for 20 rolled "$URL" "$CTR_PID" "$old" "$n"
    stop_loop
    check "podman: no request failed during the roll ($LOOP_N sent)" test "$LOOP_BAD" = 0 -a "$LOOP_N" -gt 0
    base=$(socket_fds "$CTR_PID")
    slow_request "$URL" 1500
    if wait_for 5 socket_fds_above "$base" "$CTR_PID"; then
        t0=$(now)
        pm stop -t 10 c-default >/dev/null 2>&1 & BG_PIDS+=($!)
        slow_finish
        check "podman: stop drains the in-flight slow request (200)" test "$SLOW_CODE" = 200
        ctr_exit c-default 15; el=$(elapsed_since "$t0")
        check "podman: stop: exit 0 in ${el}s, well inside the 10s grace" eval "[ $RC = 0 ] && lt $el 6"
    else
        fail "podman: slow request accepted by a worker"
    fi
    [ "$FAILED" = "$failed_before" ] || ctr_logs c-default

    # --- orphans inside the container ---
    failed_before=$FAILED
    mkdir -p "$WORK/marks-ctr"
    next_port P; URL=http://127.0.0.1:$P
    ctr_run c-orphans -p "127.0.0.1:$P:8080" \
        -v "$BUSYBOX:/bin/busybox:ro" -v "$HERE:/e2e:ro" -v "$WORK/marks-ctr:/marks" -- \
        --workers 3 -- /bin/busybox sh /e2e/orphan-worker.sh /marks /usr/local/bin/herder-demo ||
        { fail "podman: run the orphan-making pool"; return; }
    check "podman: orphan-making pool serves" wait_for 15 serving "$URL" "$CTR_PID" 3
    check "podman: orphans reparented to PID 1 (herder)" \
        eval 'wait_for 5 marks_at_least "$WORK/marks-ctr" 3 && marks_all_ppid1 "$WORK/marks-ctr"'
    check "podman: every orphan reaped, no zombie in the container" \
        eval 'wait_for 3 orphans_gone "$WORK/marks-ctr" "$CTR_PID" && wait_for 3 no_zombies_under "$CTR_PID"'
    pm stop -t 10 c-orphans >/dev/null 2>&1
    ctr_exit c-orphans 15
    check "podman: orphan pool: stop exits 0" test "$RC" = 0
    [ "$FAILED" = "$failed_before" ] || ctr_logs c-orphans

    # --- lame duck ---
    failed_before=$FAILED
    next_port P; next_port H; URL=http://127.0.0.1:$P; HURL=http://127.0.0.1:$H
    ctr_run c-lame -p "127.0.0.1:$P:8080" -p "127.0.0.1:$H:8081" -- \
        --workers 2 --shutdown-delay 3s --drain-timeout 5s -- /usr/local/bin/herder-demo ||
        { fail "podman: run the lame-duck pool"; return; }
    if wait_for 15 serving "$URL" "$CTR_PID" 2; then
        check "podman: lame duck: /readyz 200 before stop" wait_for 5 ready_code "$HURL" 200
        t0=$(now)
        pm stop -t 10 c-lame >/dev/null 2>&1 & BG_PIDS+=($!)
        check "podman: /readyz turns 503 at podman stop" wait_for 2 ready_code "$HURL" 503
        check "podman: GET / still served during --shutdown-delay" served_while_lame "$URL" "$HURL"
        ctr_exit c-lame 15; el=$(elapsed_since "$t0")
        check "podman: lame duck: exit 0 after the 3s delay (${el}s, inside the 10s grace)" \
            eval "[ $RC = 0 ] && ! lt $el 3 && lt $el 9"
    else
        fail "podman: lame-duck pool up"
    fi
    [ "$FAILED" = "$failed_before" ] || ctr_logs c-lame

    # --- --user nobody, port 80 ---
    failed_before=$FAILED
    next_port P; URL=http://127.0.0.1:$P
    ctr_run c-user -p "127.0.0.1:$P:80" --entrypoint /usr/local/bin/herder -- \
        --listen 0.0.0.0:80 --user nobody --workers 2 -- /usr/local/bin/herder-demo ||
        { fail "podman: run the --user nobody pool"; return; }
    check "podman: --user nobody: GET / served on port 80" wait_for 15 serving "$URL" "$CTR_PID" 2
    check "podman: --user nobody: workers run as uid 65534" test "$(worker_uids "$CTR_PID")" = 65534
    check "podman: --user nobody: herder (PID 1) stays root" test "$(uid_of "$CTR_PID")" = 0
    pm stop -t 10 c-user >/dev/null 2>&1; ctr_exit c-user 15
    check "podman: --user nobody: stop exits 0" test "$RC" = 0
    [ "$FAILED" = "$failed_before" ] || ctr_logs c-user

    # --- the exit status table ---
    failed_before=$FAILED
    ctr_run c-usage -- --no-such-flag; ctr_exit c-usage 15
    check "podman: exit 2 on a usage error" test "$RC" = 2
    ctr_run c-giveup -v "$BUSYBOX:/bin/busybox:ro" -- --workers 2 --restart-limit 2 -- /bin/busybox false
    ctr_exit c-giveup 40
    check "podman: exit 1 when herder gives up (restart limit)" test "$RC" = 1
    ctr_run c-stuck -v "$BUSYBOX:/bin/busybox:ro" -v "$HERE:/e2e:ro" -- \
        --workers 1 --drain-timeout 1s -- /bin/busybox sh /e2e/ignore-term-worker.sh
    if wait_for 15 tree_count_is "$CTR_PID" busybox 1; then
        t0=$(now); pm stop -t 10 c-stuck >/dev/null 2>&1; ctr_exit c-stuck 15; el=$(elapsed_since "$t0")
        check "podman: exit 3 when a worker had to be SIGKILLed (${el}s)" eval "[ $RC = 3 ] && lt $el 5"
    else
        fail "podman: stuck worker started"
    fi
    [ "$FAILED" = "$failed_before" ] || { ctr_logs c-usage; ctr_logs c-giveup; ctr_logs c-stuck; }
}

# ================================ part source: the default `docker build .` path ===============
# The build stage wants the official Rust image, which cannot be pulled here. A stand-in takes its
# place: an empty root filesystem (podman import) whose /usr, rustup and cargo homes are this
# host's, bind-mounted into every RUN (`podman build -v`). The Dockerfile itself is unchanged:
# same stages, same commands, the repository as the context (.dockerignore applies), default
# target. Opt-in (a full release build from scratch, some minutes): e2e.sh source.
part_source() {
    local root=$WORK/standin tag=localhost/herder-e2e-src:$$ base=localhost/herder-e2e-rust:$$ out
    mkdir -p "$root"/{tmp,root,etc,proc,dev,sys,run}
    chmod 1777 "$root/tmp"
    ln -s usr/bin "$root/bin"; ln -s usr/sbin "$root/sbin"; ln -s usr/lib "$root/lib"; ln -s usr/lib64 "$root/lib64"
    grep -E '^(root|nobody):' /etc/passwd >"$root/etc/passwd"; grep -E '^(root|nogroup):' /etc/group >"$root/etc/group"
    tar -C "$root" -cf "$WORK/standin.tar" . &&
        pm import -q -c 'ENV PATH=/root/.cargo/bin:/usr/local/bin:/usr/bin:/bin HOME=/root' \
            "$WORK/standin.tar" "$base" >/dev/null || { fail "source: stand-in Rust image"; return; }
    IMAGES_EXTRA+=("$base" "$tag")
    local rustup=${RUSTUP_HOME:-$HOME/.rustup} cargo=${CARGO_HOME:-$HOME/.cargo}
    log "source: podman build (default target) with a stand-in for the Rust image"
    if pm build -q --layers=false --build-arg "RUST_IMAGE=$base" -v /usr:/usr:ro -v /etc/ssl:/etc/ssl:ro -v /etc/alternatives:/etc/alternatives:ro \
        -v "$rustup:/root/.rustup:ro" -v "$cargo:/root/.cargo" -t "$tag" "$ROOT" >"$WORK/source.log" 2>&1; then
        pass "source: the default Dockerfile path builds herder from the checkout"
    else
        fail "source: the default Dockerfile path builds"; show_log "podman build" "$WORK/source.log"; return
    fi
    out=$(pm run --rm "${ULIMITS[@]}" "$tag" --version 2>&1)
    check "source: the built image runs herder ($out)" eval "grep -q '^herder ' <<<'$out'"
}

# ================================ part manifest: the k8s example's arithmetic ==================
part_manifest() {
    local line py
    for py in python3 /usr/bin/python3 ""; do "$py" -c 'import yaml' 2>/dev/null && break; done
    [ -n "$py" ] || { fail "manifest: a python3 with the yaml module (python3-yaml)"; return; }
    while read -r line; do
        case $line in PASS\ *) pass "${line#PASS }" ;; FAIL\ *) fail "${line#FAIL }" ;; *) echo "$line" ;; esac
    done < <("$py" "$HERE/check-manifest.py" "$ROOT" 2>&1)
}

# ================================ main ==========================================================
STATIC_DIR=""
if [[ " ${PARTS[*]} " == *" podman "* ]] || { [[ " ${PARTS[*]} " == *" ns "* ]] && [ -z "${HERDER_BIN:-}" ]; }; then
    build_static || { fail "build static herder and herder-demo"; }
fi
for part in "${PARTS[@]}"; do
    case $part in
    manifest) part_manifest ;;
    source) part_source ;;
    ns) part_ns ;;
    podman) [ -n "$STATIC_DIR" ] && part_podman ;;
    *) echo "e2e: unknown part $part (manifest, ns, podman, source)" >&2; exit 2 ;;
    esac
done

log "done in $(elapsed_since "$T_START")s"
[ "$FAILED" -eq 0 ] || printf 'failed: %s\n' "${FAILED_NAMES[@]}"
printf '%d passed, %d failed\n' "$PASSED" "$FAILED"
[ "$FAILED" -eq 0 ]
