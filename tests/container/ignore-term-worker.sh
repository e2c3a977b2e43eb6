# ignore-term-worker.sh -- run by /bin/busybox sh as a herder worker that never drains: SIGTERM
# is ignored (and stays ignored across exec, so the sleeps ignore it too). herder must SIGKILL it
# after --drain-timeout and exit 3.
trap '' TERM
exec 3>&-
while :; do /bin/busybox sleep 1; done
