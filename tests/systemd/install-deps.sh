#!/usr/bin/env bash
# install-deps.sh -- host packages the systemd end-to-end suite needs: systemd-nspawn (systemd-container),
# debootstrap (to build the container's Debian rootfs) and nsenter (util-linux). Idempotent: does
# nothing when they are all present, so `.ci/run` can call it on every run.
#
# Note: installing systemd-container pulls the host's systemd packages up to the same exact version.
# That is harmless on hosts whose PID 1 is not systemd (our CI VMs); on a workstation it is an
# ordinary package upgrade.
set -euo pipefail

need=()
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v nsenter >/dev/null || need+=(util-linux)
command -v dpkg-deb >/dev/null || need+=(dpkg)
[ ${#need[@]} -eq 0 ] && exit 0

[ "$(id -u)" = 0 ] || { echo "install-deps: need root to apt-get install ${need[*]}" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
apt=(apt-get -o DPkg::Lock::Timeout=300 -y -qq)
echo "install-deps: installing ${need[*]}" >&2
# The package lists may be missing (fresh machine) or stale (404s on install): update, then retry once.
apt-cache show "${need[@]}" >/dev/null 2>&1 || "${apt[@]}" update
"${apt[@]}" install --no-install-recommends "${need[@]}" >/dev/null ||
    { "${apt[@]}" update && "${apt[@]}" install --no-install-recommends "${need[@]}" >/dev/null; }
