"""The worker's report of the sensor processes it supervises, in attune_sensor.sensor_run, in
the platform's sensor_process vocabulary. Sent at the assignments cadence and only when
something changed: never a statement on the heartbeat path."""

import json

from ..db.schema import SENSOR_RUNS

REPORT_SQL = f"""
WITH reported AS (
    SELECT * FROM jsonb_to_recordset(%(states)s::jsonb)
        AS s(sensor_ref text, status text, pid int, consecutive_failures int, last_exit_code int,
             last_signal int, restart_in float8, detail text)
), gone AS (
    DELETE FROM {SENSOR_RUNS} AS r
     WHERE r.worker_id = %(me)s AND NOT EXISTS (SELECT 1 FROM reported WHERE reported.sensor_ref = r.sensor_ref)
    RETURNING 1
)
INSERT INTO {SENSOR_RUNS} AS r (worker_id, sensor_ref, status, pid, consecutive_failures, last_exit_code,
                                last_signal, next_restart_at, detail, updated)
SELECT %(me)s, sensor_ref, status, pid, consecutive_failures, last_exit_code, last_signal,
       CASE WHEN restart_in IS NOT NULL THEN now() + make_interval(secs => restart_in) END, detail, now()
  FROM reported
ON CONFLICT (worker_id, sensor_ref) DO UPDATE
   SET status = EXCLUDED.status, pid = EXCLUDED.pid, consecutive_failures = EXCLUDED.consecutive_failures,
       last_exit_code = EXCLUDED.last_exit_code, last_signal = EXCLUDED.last_signal,
       next_restart_at = EXCLUDED.next_restart_at, detail = EXCLUDED.detail, updated = now()
"""

CLEAR_SQL = f"DELETE FROM {SENSOR_RUNS} WHERE worker_id = %(me)s"

# The same, in the platform's own sensor_process (its API and web UI read it), for the sensors
# it knows by ref: a row per (sensor, worker), its statuses being starting, running, backoff,
# failed and stopped. A sensor no longer run here is `stopped`, never deleted (the platform
# keeps its history of failures there).
PLATFORM_STATUS = {"starting": "starting", "waiting": "starting", "running": "running", "stopping": "running",
                   "backoff": "backoff", "failed": "failed"}
PLATFORM_REPORT_SQL = """
WITH reported AS (
    SELECT s.id AS sensor, r.* FROM jsonb_to_recordset(%(states)s::jsonb)
        AS r(sensor_ref text, status text, pid int, consecutive_failures int, last_exit_code int,
             last_signal int, restart_in float8, detail text)
      JOIN sensor AS s ON s.ref = r.sensor_ref
), stopped AS (
    UPDATE sensor_process AS p SET status = 'stopped', pid = NULL, next_restart_at = NULL,
           last_stopped_at = now()
     WHERE p.worker = %(me)s AND p.status <> 'stopped'
       AND NOT EXISTS (SELECT 1 FROM reported WHERE reported.sensor = p.sensor)
    RETURNING 1
)
INSERT INTO sensor_process AS p (sensor, sensor_ref, worker, worker_name, status, pid, consecutive_failures,
                                 last_exit_code, last_signal, last_started_at, next_restart_at, stderr_excerpt)
SELECT sensor, sensor_ref, %(me)s, %(name)s, status::sensor_process_status_enum, pid, consecutive_failures,
       last_exit_code, last_signal, CASE WHEN pid IS NOT NULL THEN now() END,
       CASE WHEN restart_in IS NOT NULL THEN now() + make_interval(secs => restart_in) END, detail
  FROM reported
ON CONFLICT (sensor, worker) DO UPDATE
   SET status = EXCLUDED.status, pid = EXCLUDED.pid, consecutive_failures = EXCLUDED.consecutive_failures,
       last_exit_code = EXCLUDED.last_exit_code, last_signal = EXCLUDED.last_signal,
       last_started_at = CASE WHEN EXCLUDED.pid IS DISTINCT FROM p.pid AND EXCLUDED.pid IS NOT NULL THEN now()
                              ELSE p.last_started_at END,
       last_stopped_at = CASE WHEN EXCLUDED.pid IS NULL AND p.pid IS NOT NULL THEN now() ELSE p.last_stopped_at END,
       next_restart_at = EXCLUDED.next_restart_at, stderr_excerpt = EXCLUDED.stderr_excerpt
"""


def report(db, worker_id, states, worker_name=None, platform=False):
    """`states` from Supervisor.states(): this worker's rows become exactly these; with
    `platform`, the platform's sensor_process rows too (one more statement)."""
    rows = [dict(state, sensor_ref=ref) for ref, state in sorted(states.items())]
    db.execute(REPORT_SQL, {"me": worker_id, "states": json.dumps(rows)})
    if platform:
        shown = [dict(row, status=PLATFORM_STATUS[row["status"]]) for row in rows]
        db.execute(PLATFORM_REPORT_SQL, {"me": worker_id, "name": worker_name, "states": json.dumps(shown)})


def clear(db, worker_id, platform=False):
    db.execute(CLEAR_SQL, {"me": worker_id})
    if platform:
        db.execute(PLATFORM_REPORT_SQL, {"me": worker_id, "name": None, "states": "[]"})
