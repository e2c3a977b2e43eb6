#!/usr/bin/env bash
# install-deps.sh -- host packages the container end-to-end suite (tests/container/e2e.sh) needs:
# podman (builds the Dockerfile and runs the image), runc (crun, podman's default runtime on Debian,
# rejects a hybrid cgroup layout), busybox-static (a static sh for the orphan-making worker inside
# the FROM-scratch test image), curl, python3 (JSON checks) and unshare (util-linux).
# Idempotent: does nothing when everything is present, so `.ci/run` can call it on every run.
#
# It does not edit /etc/containers/containers.conf: e2e.sh passes `--runtime runc` and explicit
# `--ulimit`s on every podman call, so a workstation's podman setup is left as it was.
set -euo pipefail

need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
file -L /bin/busybox 2>/dev/null | grep -q "statically linked" || need+=(busybox-static)
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null || need+=(python3)
python3 -c "import yaml" 2>/dev/null || need+=(python3-yaml)
command -v unshare >/dev/null || need+=(util-linux)
command -v file >/dev/null || need+=(file)
[ ${#need[@]} -eq 0 ] && exit 0

[ "$(id -u)" = 0 ] || { echo "install-deps: need root to apt-get install ${need[*]}" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
apt=(apt-get -o DPkg::Lock::Timeout=300 -y -qq)
echo "install-deps: installing ${need[*]}" >&2
# The package lists may be missing (fresh machine) or stale (404s on install): update, then retry once.
apt-cache show "${need[@]}" >/dev/null 2>&1 || "${apt[@]}" update
"${apt[@]}" install --no-install-recommends "${need[@]}" >/dev/null ||
    { "${apt[@]}" update && "${apt[@]}" install --no-install-recommends "${need[@]}" >/dev/null; }
