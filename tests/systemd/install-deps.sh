#!/usr/bin/env bash
# install-deps.sh -- what the systemd end-to-end suite needs on the host: systemd-nspawn
# (systemd-container), debootstrap (to build the container's Debian rootfs), nsenter (util-linux),
# and cargo-deb (to build the .deb the suite installs). Idempotent: does nothing when they are all
# present, so `.ci/run` can call it on every run. A cold `cargo install cargo-deb` takes ~2.5 min on
# 2 cores; cache ~/.cargo/bin between CI runs to skip it.
#
# Note: installing systemd-container pulls the host's systemd packages up to the same exact version.
# That is harmless on hosts whose PID 1 is not systemd (our CI VMs); on a workstation it is an
# ordinary package upgrade.
set -euo pipefail

# Pinned so a new cargo-deb release cannot change our package behind our back.
CARGO_DEB_VERSION=3.8.0

need=()
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v nsenter >/dev/null || need+=(util-linux)
command -v dpkg-deb >/dev/null || need+=(dpkg)
if [ ${#need[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || { echo "install-deps: need root to apt-get install ${need[*]}" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt=(apt-get -o DPkg::Lock::Timeout=300 -y -qq)
    echo "install-deps: installing ${need[*]}" >&2
    # The package lists may be missing (fresh machine) or stale (404s on install): update, then retry once.
    apt-cache show "${need[@]}" >/dev/null 2>&1 || "${apt[@]}" update
    "${apt[@]}" install --no-install-recommends "${need[@]}" >/dev/null ||
        { "${apt[@]}" update && "${apt[@]}" install --no-install-recommends "${need[@]}" >/dev/null; }
fi

if ! command -v cargo-deb >/dev/null; then
    command -v cargo >/dev/null || { echo "install-deps: cargo not found, cannot install cargo-deb" >&2; exit 1; }
    echo "install-deps: cargo install cargo-deb $CARGO_DEB_VERSION" >&2
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" --quiet
fi
