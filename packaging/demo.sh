#!/usr/bin/env bash
# Runs the daemon against a throwaway local PostgreSQL that this script starts, so a newcomer
# sees a worker register and heartbeat, and a sample sensor placed on it and running, within a
# minute. Ctrl-C stops the daemon (which
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
# A pack with one shell sensor, as the platform lays packs out: {packs_base_dir}/{pack}/sensors/
mkdir -p "$state/packs/demo/sensors"
cat > "$state/packs/demo/sensors/hello.sh" <<'SH'
# A sample sensor: what it prints reaches the daemon's log, tagged with its ref.
echo "hello from $ATTUNE_SENSOR_REF (pid $$), polling every ${ATTUNE_SENSOR_POLL_INTERVAL}s"
while true; do sleep 5; echo "still watching (pid $$)"; done
SH
cat > "$state/config.yaml" <<YAML
log:
  level: info
packs_base_dir: $state/packs
api:
  token_file: none
sensor:
  worker_name: sensor-demo
  heartbeat_interval: ${DEMO_HEARTBEAT_INTERVAL:-5}
  poll_interval: 5
YAML
echo "--- attune-sensor migrate run"
"$BIN/attune-sensor" --config "$state/config.yaml" migrate run
echo "--- attune-sensor place demo.hello --runtime shell --entrypoint demo/sensors/hello.sh"
echo "    (no worker yet: it waits as pending and is placed, then started, when the worker registers)"
"$BIN/attune-sensor" --config "$state/config.yaml" place demo.hello --runtime shell \
  --entrypoint demo/sensors/hello.sh || true
echo "--- attune-sensor run (Ctrl-C to stop; the worker is then marked inactive)"
"$BIN/attune-sensor" --config "$state/config.yaml" run &
daemon_pid=$!
if [ -n "${DEMO_SECONDS:-}" ]; then
  sleep "$DEMO_SECONDS"
  echo "--- attune-sensor workers"
  "$BIN/attune-sensor" --config "$state/config.yaml" workers
  echo "--- attune-sensor assignments"
  "$BIN/attune-sensor" --config "$state/config.yaml" assignments
  exit 0
fi
wait "$daemon_pid"
