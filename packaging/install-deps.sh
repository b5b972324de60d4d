#!/usr/bin/env bash
# Installs everything the test suite, the .deb build and the systemd end-to-end test need
# on a fresh Debian 12 machine, then a virtualenv (.venv) with the Python dependencies.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

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
  apt-get update -qq
  # --no-install-recommends keeps the machine small; postgresql-15 alone would not start a cluster
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's postgresql-common creates a "main" cluster on install; the tests start their own.
if command -v pg_lsclusters >/dev/null && pg_lsclusters -h 2>/dev/null | grep -q online; then
  pg_ctlcluster 15 main stop 2>/dev/null || true
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -r packaging/requirements-dev.txt
# compat mode: a plain .pth entry; the default import-hook finder adds ~10 ms to every start
.venv/bin/pip install -q --disable-pip-version-check --no-deps --config-settings editable_mode=compat -e .
