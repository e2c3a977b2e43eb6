#!/usr/bin/env bash
# Install what bench/run needs. Idempotent: re-running only checks.
#   wrk, tini           Debian packages (apt-get)
#   pm2, sticky-session, @socket.io/sticky
#                       npm, pinned in bench/package.json + package-lock.json, into bench/node_modules
#   gunicorn            PyPI, pinned below, into bench/.venv
# A peer that fails to install (pm2, the sticky masters, gunicorn, tini) is reported here and marked missing in
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
  # npm ci again when a package of package.json is not there yet (one added since the last run)
  if [ ! -x node_modules/.bin/pm2 ] || [ ! -f node_modules/sticky-session/package.json ] \
     || [ ! -f node_modules/@socket.io/sticky/package.json ]; then
    npm ci --no-audit --no-fund --loglevel=error \
      || echo "install-deps: npm ci failed; pm2 and the sticky masters will be reported missing" >&2
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
for p in sticky-session @socket.io/sticky; do
  [ -f node_modules/$p/package.json ] && echo "ok: $p $(node -p "require('./node_modules/$p/package.json').version")" || echo "missing: $p"
done
[ -x .venv/bin/gunicorn ] && echo "ok: gunicorn $(.venv/bin/gunicorn --version)" || echo "missing: gunicorn"
command -v wrk >/dev/null || status=1
exit $status
