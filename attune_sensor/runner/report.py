"""The worker's report of the sensor processes it supervises, in attune_sensor.sensor_run, in
the platform's sensor_process vocabulary. Sent at the assignments cadence and only when
something changed: never a statement on the heartbeat path."""

import json

from ..schema import SENSOR_RUNS

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


def report(db, worker_id, states):
    """`states` from Supervisor.states(): this worker's rows become exactly these."""
    rows = [dict(state, sensor_ref=ref) for ref, state in sorted(states.items())]
    db.execute(REPORT_SQL, {"me": worker_id, "states": json.dumps(rows)})


def clear(db, worker_id):
    db.execute(CLEAR_SQL, {"me": worker_id})
