#!/usr/bin/env bash
# Runs the daemon against a throwaway local PostgreSQL that this script starts, so a newcomer
# sees a worker register and heartbeat within a minute. Ctrl-C stops the daemon (which
# deregisters), then the database, and removes everything it created.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "--- installing what the demo needs (PostgreSQL 15, a virtualenv; a minute on the first run)"
bash packaging/install-deps.sh --demo
BIN=.venv/bin
state=$(mktemp -d /tmp/attune-demo-XXXXXX)
chmod 755 "$state"  # the postgres user must reach its data directory
cleanup() {
  # Whatever happened to our output (Ctrl-C on "demo.sh | tee log" closes the pipe first), every
  # step below must still run: no exit on error, and a dead pipe is ignored, not fatal.
  set +e
  trap '' PIPE
  [ -n "${daemon_pid:-}" ] && kill -TERM "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
  if [ -n "${DATABASE_URL:-}" ]; then
    echo "--- the worker table after stop:"
    "$BIN/attune-sensor" --config "$state/config.yaml" workers || true
  fi
  "$BIN/python" packaging/pgcluster.py stop "$state/pg" >/dev/null 2>&1 || true
  rm -rf "$state"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

echo "--- starting a throwaway PostgreSQL in $state/pg"
DATABASE_URL=$("$BIN/python" packaging/pgcluster.py start "$state/pg")
export DATABASE_URL
cat > "$state/config.yaml" <<YAML
log:
  level: info
sensor:
  worker_name: sensor-demo
  heartbeat_interval: ${DEMO_HEARTBEAT_INTERVAL:-5}
YAML
echo "--- attune-sensor migrate run"
"$BIN/attune-sensor" --config "$state/config.yaml" migrate run
echo "--- attune-sensor run (Ctrl-C to stop; the worker is then marked inactive)"
"$BIN/attune-sensor" --config "$state/config.yaml" run &
daemon_pid=$!
if [ -n "${DEMO_SECONDS:-}" ]; then
  sleep "$DEMO_SECONDS"
  echo "--- attune-sensor workers"
  "$BIN/attune-sensor" --config "$state/config.yaml" workers
  exit 0
fi
wait "$daemon_pid"
