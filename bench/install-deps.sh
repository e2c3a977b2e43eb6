#!/usr/bin/env bash
# Install what bench/run needs. Idempotent: re-running only checks.
#   wrk, tini           Debian packages (apt-get)
#   pm2                 npm, pinned in bench/package.json + package-lock.json, into bench/node_modules
#   gunicorn            PyPI, pinned below, into bench/.venv
# A peer that fails to install (pm2, gunicorn, tini) is reported here and marked missing in
# RESULTS.md by bench/run; only a missing wrk (the load generator) makes this script fail.
set -u
cd "$(dirname "$0")"
GUNICORN_VERSION=23.0.0
status=0

apt_pkgs=()
command -v wrk  >/dev/null || apt_pkgs+=(wrk)
command -v tini >/dev/null || apt_pkgs+=(tini)
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then apt_pkgs+=(python3-venv); fi
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null; then
    SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get -o DPkg::Lock::Timeout=120 update -qq || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=120 install -y -qq "${apt_pkgs[@]}" \
      || echo "install-deps: apt-get install ${apt_pkgs[*]} failed" >&2
  else
    echo "install-deps: no apt-get; install ${apt_pkgs[*]} yourself" >&2
  fi
fi

if command -v npm >/dev/null; then
  if [ ! -x node_modules/.bin/pm2 ]; then
    npm ci --no-audit --no-fund --loglevel=error \
      || echo "install-deps: npm ci (pm2) failed; pm2 will be reported missing" >&2
  fi
else
  echo "install-deps: npm not found; pm2 will be reported missing" >&2
fi

if [ ! -x .venv/bin/gunicorn ]; then
  python3 -m venv .venv && .venv/bin/pip install -q "gunicorn==$GUNICORN_VERSION" \
    || echo "install-deps: gunicorn venv failed; gunicorn will be reported missing" >&2
fi

for t in wrk tini node; do command -v $t >/dev/null && echo "ok: $t $(command -v $t)" || echo "missing: $t"; done
# (not `pm2 --version`: that starts a pm2 daemon as a side effect)
[ -x node_modules/.bin/pm2 ] && echo "ok: pm2 $(node -p 'require("./node_modules/pm2/package.json").version')" || echo "missing: pm2"
[ -x .venv/bin/gunicorn ] && echo "ok: gunicorn $(.venv/bin/gunicorn --version)" || echo "missing: gunicorn"
command -v wrk >/dev/null || status=1
exit $status
