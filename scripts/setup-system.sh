#!/usr/bin/env bash
# System packages the tests need: Debian's `prometheus` (tests/test_prometheus_e2e.py runs the
# real server on a loopback port of its own) and Debian's `chromium` (tests/test_web_ui.py drives
# it with the playwright package; no browser is ever downloaded by playwright). Idempotent and
# non-interactive; does nothing (and touches no network) when a `prometheus` binary is on PATH
# and /usr/bin/chromium exists. Called by `scripts/setup.sh --test`.
#
# The package's own service is never started: a policy-rc.d that answers 101 ("action
# forbidden") is put in place for the install when there is none, and where systemd runs, the
# unit is stopped and disabled afterwards. The tests start their own Prometheus.
set -euo pipefail

PACKAGES=()
command -v prometheus >/dev/null 2>&1 || PACKAGES+=(prometheus)
[ -x /usr/bin/chromium ] || PACKAGES+=(chromium)
if [ "${#PACKAGES[@]}" -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  echo "setup-system.sh: installing Debian's ${PACKAGES[*]} needs root (or password-less sudo);" \
       "run: apt-get install -y --no-install-recommends ${PACKAGES[*]}" >&2
  exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup-system.sh: no apt-get here; install ${PACKAGES[*]} yourself (a prometheus binary," \
       "2.x or 3.x, on PATH; chromium as /usr/bin/chromium)" >&2
  exit 1
fi

POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
cleanup() {
  if [ "$ADDED_POLICY" = 1 ]; then "${SUDO[@]}" rm -f "$POLICY"; fi
}
trap cleanup EXIT
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\n# added by aistats scripts/setup-system.sh for one apt-get install\nexit 101\n' \
    | "${SUDO[@]}" tee "$POLICY" >/dev/null
  "${SUDO[@]}" chmod 755 "$POLICY"
  ADDED_POLICY=1
fi

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${PACKAGES[@]}" >/dev/null

# With systemd as init, the unit may be enabled for the next boot (policy-rc.d only stops the
# start now): stop and disable it, the tests run their own server.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  "${SUDO[@]}" systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi

command -v prometheus >/dev/null 2>&1 || {
  echo "setup-system.sh: prometheus installed but not on PATH" >&2
  exit 1
}
[ -x /usr/bin/chromium ] || {
  echo "setup-system.sh: chromium installed but /usr/bin/chromium is missing" >&2
  exit 1
}
echo "setup-system.sh: installed ${PACKAGES[*]}: $(prometheus --version 2>&1 | head -n 1);" \
     "$(/usr/bin/chromium --version 2>/dev/null | head -n 1)"
