# lib.sh -- helpers for e2e.sh: check bookkeeping, polling with deadlines, HTTP, and a host-side view
# of process trees (/proc) so the same zombie and uid checks work for a podman container and for
# an `unshare --pid` namespace alike. Sourced, not run.

PASSED=0
FAILED=0
FAILED_NAMES=()

log() { printf '%s e2e: %s\n' "$(date +%T.%3N)" "$*" >&2; }
pass() { PASSED=$((PASSED + 1)); printf 'PASS %s\n' "$1"; }
fail() {
    FAILED=$((FAILED + 1)); FAILED_NAMES+=("$1")
    printf 'FAIL %s%s\n' "$1" "${2:+: $2}"
}
# check NAME CMD...: run CMD, PASS if it succeeds, else FAIL with its last stderr line.
check() {
    local name=$1 err; shift
    if err=$("$@" 2>&1 >/dev/null); then pass "$name"; else fail "$name" "$(tail -n1 <<<"$err")"; fi
}
now() { date +%s.%N; }
elapsed_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
lt() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a < b) }'; }

# wait_for SECONDS CMD...: poll CMD every 50 ms until it succeeds; 1 when the deadline passes.
wait_for() {
    local deadline; deadline=$(awk -v n="$(now)" -v s="$1" 'BEGIN { printf "%.3f", n + s }'); shift
    until "$@" >/dev/null 2>&1; do
        lt "$(now)" "$deadline" || return 1
        sleep 0.05
    done
}

# http URL: print "CODE BODY" (BODY on one line); CODE 000 when the connection failed.
http() {
    local out code
    out=$(curl -s -m "${HTTP_TIMEOUT:-5}" -w '\n%{http_code}' "$1" 2>/dev/null)
    code=${out##*$'\n'}
    printf '%s %s\n' "${code:-000}" "$(head -n1 <<<"${out%$'\n'*}")"
}
http_code() { local r; r=$(http "$1"); printf '%s\n' "${r%% *}"; }
is_code() { [ "$(http_code "$2")" = "$1" ]; }

# ---- processes, seen from the host's /proc ------------------------------------------------------
# stat_field PID N: field N (1-based, after the comm) of /proc/PID/stat; 1 = state, 2 = ppid.
stat_field() {
    local s a
    read -r s 2>/dev/null <"/proc/$1/stat" || return 1
    read -ra a <<<"${s##*) }"
    printf '%s\n' "${a[$(($2 - 1))]}"
}
# children PID: host pids whose parent is PID.
children() {
    local p s a
    for p in /proc/[0-9]*; do
        read -r s 2>/dev/null <"$p/stat" || continue
        read -ra a <<<"${s##*) }"
        [ "${a[1]}" = "$PARENT" ] && printf '%s %s\n' "${p#/proc/}" "${a[0]}"
    done
    return 0
}
children_of() { PARENT=$1 children; }
# zombies_under PID: the number of zombie children of PID (orphans reparented to PID 1 that it
# has not reaped show up here).
zombies_under() { children_of "$1" | awk '$2 == "Z"' | wc -l; }
no_zombies_under() { [ "$(zombies_under "$1")" -eq 0 ]; }
has_zombies_under() { [ "$(zombies_under "$1")" -gt 0 ]; }
# the single child of PID (e.g. herder under `unshare --fork`), once it exists.
only_child() { local c; c=$(children_of "$1" | awk '{ print $1 }'); [ -n "$c" ] && printf '%s\n' "$c"; }
# socket_fds PID...: sockets open in the children of each PID (an accepted connection in a
# worker raises it: evidence that a request is in flight, not merely queued).
socket_fds() {
    local p c n=0
    for p in "$@"; do
        for c in $(children_of "$p" | awk '$2 != "Z" { print $1 }'); do
            n=$((n + $(find "/proc/$c/fd" -lname 'socket:*' 2>/dev/null | wc -l)))
        done
    done
    echo "$n"
}
socket_fds_above() { [ "$(socket_fds "$2")" -gt "$1" ]; }
uid_of() { awk '/^Uid:/ { print $2 }' "/proc/$1/status" 2>/dev/null; }
# pid_in_ns HOSTPID: the pid a process has in its innermost pid namespace.
pid_in_ns() { awk '/^NSpid:/ { print $NF }' "/proc/$1/status" 2>/dev/null; }
alive() { kill -0 "$1" 2>/dev/null && [ "$(stat_field "$1" 1)" != Z ]; }
dead() { ! alive "$1"; }

# ---- herder's health endpoint -------------------------------------------------------------------
# status URL: herder's /status, validated and normalised by status.py to one line:
#   STATE N_SLOTS N_READY PID,PID,... HERDER_PID
status() {
    local body
    body=$(curl -s -m 5 "$1/status") || return 1
    python3 "$HERE/status.py" <<<"$body"
}
# worker_pids URL: the pids /status reports, one a line, sorted.
worker_pids() { status "$1" | awk '{ print $4 }' | tr , '\n' | sort -n; }
# pool_ready URL N: /status shows N slots, all ready.
pool_ready() { status "$1" | awk -v n="$2" '$2 == n && $3 == n { ok = 1 } END { exit !ok }'; }
# served_pids URL COUNT: the distinct pids that answered COUNT sequential GET /.
served_pids() {
    local i
    for ((i = 0; i < $2; i++)); do http "$1/" ; done |
        awk '$1 == 200 { for (i = 2; i <= NF; i++) if ($i ~ /^pid=/) print substr($i, 5) }' | sort -un
}
# all_new OLD NEW: no pid of the list OLD appears in the list NEW (both newline-separated).
all_new() { [ -n "$2" ] && [ -z "$(comm -12 <(sort <<<"$1") <(sort <<<"$2"))" ]; }

# ---- the pool as the process tree shows it (independent of /status) -----------------------------
# tree_pids HOSTPID COMM: namespace pids of HOSTPID's live children whose comm is COMM, sorted.
tree_pids() {
    local c
    for c in $(children_of "$1" | awk '$2 != "Z" { print $1 }'); do
        [ "$(cat "/proc/$c/comm" 2>/dev/null)" = "$2" ] && pid_in_ns "$c"
    done | sort -n
}
tree_count_is() { [ "$(tree_pids "$1" "$2" | grep -c .)" -eq "$3" ]; }
# serving URL HOSTPID N: N herder-demo workers run under herder and GET / answers 200.
serving() { tree_count_is "$2" herder-demo "$3" && is_code 200 "$1/"; }
# rolled URL HOSTPID OLD N: N workers, none of them from OLD, and GET / answers.
rolled() { serving "$1" "$2" "$4" && all_new "$3" "$(tree_pids "$2" herder-demo)"; }
