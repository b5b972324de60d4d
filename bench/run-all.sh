#!/usr/bin/env bash
# Runs the benchmarks (each starts its own throwaway PostgreSQL) and prints their tables; with
# names (e.g. `bash bench/run-all.sh footprint queries`) only those. A bench that fails does not
# stop the others; the script then ends with the list of failures and exit code 1.
#
# Full size takes about 25 minutes on a 2-core machine. BENCH_QUICK=1 runs every bench at toy
# size (about a minute; its figures show only that the benches work). Size knobs, each in its
# script's docstring: BENCH_RUNS, BENCH_FOOTPRINT_BEATS, BENCH_COUNTED_HEARTBEATS,
# BENCH_HEARTBEATS, BENCH_FLEETS, BENCH_SCALE_SECONDS, BENCH_ROWS, BENCH_HEARTBEATS_TOTAL,
# BENCH_DETECTION_FLEETS, BENCH_DETECTION_SLACK, BENCH_WORKERS, BENCH_SENSORS, BENCH_FAILOVER,
# BENCH_IDLE, BENCH_WINDOW, BENCH_PLATFORM_SENSORS, BENCH_PLATFORM_WORKERS, BENCH_SYNC_SAMPLES.
set -uo pipefail
cd "$(dirname "$0")"
PY=../.venv/bin/python
ALL=(footprint heartbeat_cost fleet_scale table_health queries detection scheduling runner platform_sync)
if [ $# -gt 0 ]; then BENCHES=("$@"); else BENCHES=("${ALL[@]}"); fi
echo "# attune-sensor benchmarks, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -m), PostgreSQL $(ls /usr/lib/postgresql | sort -n | tail -1)${BENCH_QUICK:+, BENCH_QUICK=$BENCH_QUICK}"
failed=()
for bench in "${BENCHES[@]}"; do
  if [ ! -f "$bench.py" ]; then
    echo "run-all.sh: no bench named $bench (have: ${ALL[*]})" >&2
    exit 2
  fi
  echo
  echo "# $bench.py"
  started=$SECONDS
  if "$PY" -u "$bench.py"; then
    echo "($bench.py: $((SECONDS - started)) s)"
  else
    failed+=("$bench.py (exit $?)")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "run-all.sh: failed: ${failed[*]}" >&2
  exit 1
fi
