#!/usr/bin/env bash
# Installs what the test suite, the .deb build and the systemd end-to-end test need on a fresh
# Debian 12 machine, then a virtualenv (.venv) with the Python dependencies. With --demo, only
# what packaging/demo.sh needs (PostgreSQL and the virtualenv). Idempotent: a second run only
# checks. Needs network access to the Debian archive and PyPI on its first run.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO_PACKAGES=(postgresql-15 python3-venv)
APT_PACKAGES=(
  # a throwaway PostgreSQL for the tests (initdb, pg_ctl)
  postgresql-15 postgresql-contrib
  # building and checking the .deb
  build-essential debhelper dh-python python3-all python3-setuptools pybuild-plugin-pyproject python3-pytest python3-hypothesis
  python3-psycopg2 python3-yaml python3-sdnotify python3-pythonjsonlogger
  lintian fakeroot
  # booting a real systemd for the end-to-end test
  systemd-container debootstrap
  # PgBouncer for the transaction-pooling test
  pgbouncer
  python3-venv iproute2 procps git make
)

if [ "${1:-}" = "--demo" ]; then
  APT_PACKAGES=("${DEMO_PACKAGES[@]}")
fi
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  echo "install-deps: installing ${#missing[@]} Debian package(s): ${missing[*]}" >&2
  apt-get update -qq
  # --no-install-recommends keeps the machine small
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # postgresql-common creates and starts a "main" cluster when it installs the server; ours
  # use their own. Only a cluster this very run created is stopped, never one that was there.
  if printf '%s\n' "${missing[@]}" | grep -qx postgresql-15 && command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster 15 main stop 2>/dev/null || true
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "install-deps: creating the virtualenv .venv" >&2
  "$PY" -m venv .venv
fi
if [ "${1:-}" = "--demo" ]; then
  # the demo runs the daemon only: its four runtime libraries, from setup.cfg
  .venv/bin/pip install -q --disable-pip-version-check --config-settings editable_mode=compat -e .
  exit 0
fi
.venv/bin/pip install -q --disable-pip-version-check -r packaging/requirements-dev.txt
# compat mode: a plain .pth entry; the default import-hook finder adds ~10 ms to every start
.venv/bin/pip install -q --disable-pip-version-check --no-deps --config-settings editable_mode=compat -e .
