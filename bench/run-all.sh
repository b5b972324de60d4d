#!/usr/bin/env bash
# Runs every benchmark (each starts its own throwaway PostgreSQL) and prints their tables.
# About 8 minutes on a 2-core machine. Knobs: BENCH_RUNS, BENCH_FLEETS, BENCH_SCALE_SECONDS,
# BENCH_HEARTBEATS_TOTAL, BENCH_ROWS (see each script).
set -euo pipefail
cd "$(dirname "$0")"
PY=../.venv/bin/python
echo "# attune-sensor benchmarks, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -m), PostgreSQL $(ls /usr/lib/postgresql | sort -n | tail -1)"
for bench in footprint heartbeat_cost fleet_scale table_health queries detection; do
  "$PY" -u "$bench.py"
done
