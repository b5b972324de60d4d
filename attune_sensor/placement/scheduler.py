"""Sensor placement: each sensor on exactly one eligible worker, least-loaded first.

The platform does not assign (at start its sensor service runs every sensor with an enabled
rule, with no placement check); this decides, on the rows attune-sensor registered only (never
on the platform's own sensor rows, where nothing reads assignments: fleet.PLATFORM_ROW). One rule of
eligibility, in SQL, in one place (ELIGIBLE): active, not stale by its own interval, not
cordoned, not unhealthy, offers the runtime, its labels hold the selector, every `no_schedule`
taint tolerated, and capacity left. `prefer_no_schedule` taints only rank a worker lower.

Assignments live in attune-sensor's own table, `attune_sensor.assignment` (created by `migrate
run`, never in the platform's schema): one row per sensor ref, `worker_id` NULL while pending.
Every placement takes one transaction-scoped advisory lock and then reads with a fresh snapshot,
so concurrent placers can never over-fill a worker, and the primary key on the sensor ref means
a sensor is never assigned twice. Nothing here deletes a sensor except `unplace`.

The order in which a placement tries workers is `attune_sensor.worker_load`: per worker and
runtime, the load ratio, kept by a trigger on the assignments and indexed, so a placement walks
the workers offering the sensor's runtime from the least loaded and stops at the first eligible
one, instead of counting every worker's sensors (docs/scheduling.md, "At scale"). `sync`
rebuilds it from the workers and the assignments. Capacity is always checked against the
assignments themselves.
"""

import json
import time
import uuid

from .. import placement
from ..runner import launch
from ..errors import AttuneSensorError
from ..fleet import CAPACITY, GAUGES_DUE, PLACEABLE_ROLES, PLACED_SENSORS, PLATFORM_ROW, STALE_EXPR  # CAPACITY: schema.capacity_of
from ..db.schema import ASSIGNMENTS, FLEET_GAUGES, SENSOR_RUNS, WORKER_LOAD, stale_condition

PLACEMENT_LOCK_KEY = 0x4174_7475_6E67
# How long a long-lived Scheduler walks the worker_load rows as they are before syncing them
# again (a worker that registered since is found by the daemons' own reconcile, which syncs);
# a placement that finds no worker syncs first if the last sync is older than SYNC_RETRY_AFTER.
SYNC_PERIOD = 10.0
SYNC_RETRY_AFTER = 1.0
# Pending sensors placed per round trip by reconcile: one transaction, one lock, the placement
# statement prepared once and executed for each sensor (each sees the loads the ones before it
# left), then one read of where they went. Planning the statement is most of a placement's
# server time; a batch plans it once. The prepared statement lives in that one transaction's
# query (PgBouncer's transaction pooling keeps it on one server connection) and is deallocated
# at its end; its name is unique, since a statement left by a failed batch outlives the rollback.
PLACE_BATCH = 100
_PER_SENSOR_PARAMS = ("ref", "runtime", "selector", "tolerations", "affinity", "versions")
_PREPARED_PARAMS = _PER_SENSOR_PARAMS + ("multiplier",)
_PREPARED_TYPES = "text, text, jsonb, jsonb, jsonb, jsonb, float8"
# Sensor processes a worker reported running (runner/report.py): a sensor placed again after
# `unplace` waits for that worker as a moved one does (docs/design.md, "At most one copy").
_STILL_RUNNING = f"""(SELECT r.worker_id FROM {SENSOR_RUNS} AS r JOIN worker AS p ON p.id = r.worker_id
                      WHERE r.sensor_ref = %(ref)s AND r.status IN ('starting', 'running', 'backoff', 'stopping')
                        AND NOT {stale_condition("p", "%(multiplier)s")} LIMIT 1)"""

TAINTS = ("jsonb_array_elements(CASE WHEN jsonb_typeof(w.capabilities -> 'taints') = 'array' "
          "THEN w.capabilities -> 'taints' ELSE '[]'::jsonb END)")
# The platform's toleration_matches_taint: the same key always (no toleration tolerates every
# taint), the same effect when it names one, and with `equal` the same value.
TOLERATES = """EXISTS (SELECT 1 FROM jsonb_array_elements(%(tolerations)s::jsonb) AS tol
    WHERE tol ->> 'key' = t ->> 'key'
      AND (tol ->> 'effect' IS NULL OR tol ->> 'effect' = coalesce(t ->> 'effect', 'no_schedule'))
      AND (coalesce(tol ->> 'operator', 'equal') = 'exists'
           OR (tol ->> 'value') IS NOT DISTINCT FROM (t ->> 'value')))"""

# Each test as a column, so that a refusal can say which one no worker passed.
CHECKS = {
    "alive": f"w.status = 'active' AND NOT {STALE_EXPR}",
    "schedulable": "NOT {cordoned} AND coalesce(w.capabilities -> 'health' ->> 'status', 'healthy') "
                   "IN ('healthy', 'degraded')",
    "runtime": "jsonb_typeof(w.capabilities -> 'runtimes') = 'array' AND w.capabilities -> 'runtimes' ? %(runtime)s",
    "selector": "attune_sensor.worker_labels(w.capabilities) @> %(selector)s::jsonb",
    "tolerated": f"NOT EXISTS (SELECT 1 FROM {TAINTS} AS t WHERE coalesce(t ->> 'effect', 'no_schedule') = "
                 f"'no_schedule' AND NOT {TOLERATES})",
    # the platform's worker_affinity (required and anti_affinity terms) and the versions its
    # runtime_version_constraint accepts (platform/rules.py; SQL in migration 20261201000003)
    "affinity": "%(affinity)s::jsonb = '{{}}'::jsonb "
                "OR attune_sensor.affinity_allows(attune_sensor.worker_labels(w.capabilities), %(affinity)s::jsonb)",
    "version": "%(versions)s::jsonb IS NULL OR attune_sensor.offers_version(w.capabilities, %(versions)s::jsonb)",
    "capacity": f"{PLACED_SENSORS} < {CAPACITY}",
}
WHY_NOT = {
    "alive": "no live sensor worker",
    "schedulable": "every live worker is cordoned or unhealthy",
    "runtime": "no schedulable worker offers runtime {runtime!r}",
    "selector": "no worker with runtime {runtime!r} has labels matching {selector}",
    "tolerated": "every matching worker has a no_schedule taint the sensor does not tolerate",
    "affinity": "no matching worker satisfies the sensor's worker_affinity (required or anti_affinity terms)",
    "version": "no matching worker has a version of runtime {runtime!r} its runtime_version_constraint accepts",
    "capacity": "every eligible worker is full (max_concurrent_sensors)",
}
PENALIZED = f"EXISTS (SELECT 1 FROM {TAINTS} AS t WHERE t ->> 'effect' = 'prefer_no_schedule' AND NOT {TOLERATES})"

# The walk: worker_load's index for the sensor's runtime, in ratio order; the first eligible
# worker without an untolerated prefer_no_schedule taint, else the first with one. A worker
# with no worker_load row yet (registered since the last sync) is not walked: Scheduler.place
# syncs and walks again before it calls a sensor pending. OFFSET 0 keeps the planner from
# flattening the per-worker test into a join: left to itself it estimates the jsonb tests as
# rare, scans every worker that offers the runtime and sorts them all.
_WALK = """SELECT w.id, w.name FROM {worker_load} AS l
      CROSS JOIN LATERAL (SELECT w.id, w.name FROM worker AS w
                           WHERE w.id = l.worker_id AND {roles} AND {eligible} AND {penalized_or_not}
                          OFFSET 0) AS w
      WHERE l.runtime = %(runtime)s AND NOT {has_preferred}
      ORDER BY l.ratio, l.worker_id LIMIT 1"""
# A sensor with preferred affinity terms: the workers are ranked by the weights of the terms
# they match (the platform's preferred_affinity_score), then by taint, then by load. Every
# eligible worker offering the runtime is scored: a walk cannot stop at the first.
HAS_PREFERRED = "(jsonb_array_length(coalesce(%(affinity)s::jsonb -> 'preferred', '[]'::jsonb)) > 0)"
_SCORED_WALK = """SELECT w.id, w.name FROM {worker_load} AS l
      CROSS JOIN LATERAL (SELECT w.id, w.name,
                                 attune_sensor.affinity_score(attune_sensor.worker_labels(w.capabilities),
                                                              %(affinity)s::jsonb) AS score,
                                 {penalized} AS penalized
                            FROM worker AS w
                           WHERE w.id = l.worker_id AND {roles} AND {eligible}
                          OFFSET 0) AS w
      WHERE l.runtime = %(runtime)s AND {has_preferred}
      ORDER BY w.score DESC, w.penalized, l.ratio, l.worker_id LIMIT 1"""
PLACE_SQL = """
SELECT pg_advisory_xact_lock(%(lock)s);
WITH chosen AS (
    ({walk_scored})
    UNION ALL
    ({walk_preferred})
    UNION ALL
    ({walk_penalized})
    LIMIT 1
), placed AS (
    INSERT INTO {assignments} AS a (sensor_ref, runtime, selector, tolerations, entrypoint, env, worker_id,
                                    assigned_at, previous_worker_id)
    VALUES (%(ref)s, %(runtime)s, %(selector)s::jsonb, %(tolerations)s::jsonb, %(entrypoint)s::text,
            %(env)s::jsonb, (SELECT id FROM chosen), CASE WHEN EXISTS (SELECT 1 FROM chosen) THEN now() END,
            {still_running})
    ON CONFLICT (sensor_ref) DO UPDATE
       SET runtime = EXCLUDED.runtime, selector = EXCLUDED.selector, tolerations = EXCLUDED.tolerations,
           entrypoint = EXCLUDED.entrypoint, env = EXCLUDED.env,
           worker_id = EXCLUDED.worker_id, assigned_at = EXCLUDED.assigned_at
     WHERE a.worker_id IS NULL
    RETURNING a.worker_id
)
-- (the statement's own insert is not visible to its reads: a sensor placed before is looked up,
-- one placed now is named by `chosen`)
SELECT CASE WHEN EXISTS (SELECT 1 FROM placed WHERE worker_id IS NOT NULL) THEN (SELECT name FROM chosen)
            ELSE (SELECT w.name FROM {assignments} AS a JOIN worker AS w ON w.id = a.worker_id
                   WHERE a.sensor_ref = %(ref)s) END,
       -- placed before with something else: what it was placed with (the row is left as it is)
       (SELECT jsonb_build_object('runtime', a.runtime, 'selector', a.selector, 'tolerations', a.tolerations,
                                  'entrypoint', a.entrypoint, 'env', a.env)
          FROM {assignments} AS a
         WHERE a.sensor_ref = %(ref)s AND a.worker_id IS NOT NULL
           AND (a.runtime, a.selector, a.tolerations, a.entrypoint, a.env) IS DISTINCT FROM
               (%(runtime)s, %(selector)s::jsonb, %(tolerations)s::jsonb, %(entrypoint)s::text, %(env)s::jsonb))
"""

DIAGNOSE_SQL = """
SELECT {counts} FROM worker AS w WHERE {roles}
"""

# Rebuilt from the facts: a row per live worker (active and not stale: a dead worker not reaped
# yet would lead every walk, at load 0 once its sensors are released) and runtime it offers,
# with its capacity and its load counted from the assignments; every other row goes. One
# statement over the fleet.
SYNC_SQL = """
SELECT pg_advisory_xact_lock(%(lock)s);
WITH workers AS (
    SELECT w.id, w.capabilities -> 'runtimes' AS runtimes, {load} AS load,
           CASE WHEN {capacity} BETWEEN 0 AND 1000000 THEN floor({capacity})::int ELSE 0 END AS capacity
      FROM worker AS w
     WHERE {roles} AND w.status = 'active' AND NOT {stale} AND jsonb_typeof(w.capabilities -> 'runtimes') = 'array'
), live AS (
    SELECT DISTINCT ON (id, runtime) id, runtime, capacity, load
      FROM workers CROSS JOIN jsonb_array_elements_text(runtimes) AS r(runtime)
), gone AS (
    DELETE FROM {worker_load} AS l
     WHERE NOT EXISTS (SELECT 1 FROM live WHERE live.id = l.worker_id AND live.runtime = l.runtime)
    RETURNING 1
), kept AS (
    INSERT INTO {worker_load} AS l (worker_id, runtime, capacity, load)
    SELECT id, runtime, capacity, load FROM live
    ON CONFLICT (worker_id, runtime) DO UPDATE SET capacity = EXCLUDED.capacity, load = EXCLUDED.load
     WHERE (l.capacity, l.load) IS DISTINCT FROM (EXCLUDED.capacity, EXCLUDED.load)
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM kept)
"""

# Assignments whose worker is gone, inactive or stale go back to pending (never deleted). A
# worker that is inactive but not stale may still run them (an operator set its status): it
# stays their previous worker until it stops them or turns stale (docs/design.md, "At most one
# copy"); a stopping daemon has stopped its sensors before it says so (hand_over). So do those
# on a row of the platform's own sensor service (placed there by an earlier version): nothing
# there reads assignments, so it is nobody's previous worker.
RELEASE_SQL = f"""
SELECT pg_advisory_xact_lock(%(lock)s);
UPDATE {ASSIGNMENTS} AS a SET worker_id = NULL, assigned_at = NULL,
       previous_worker_id = coalesce(a.previous_worker_id,
           (SELECT w.id FROM worker AS w WHERE w.id = a.worker_id AND NOT {STALE_EXPR} AND NOT {PLATFORM_ROW}))
 WHERE a.worker_id IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM worker AS w WHERE w.id = a.worker_id AND w.status = 'active' AND NOT {STALE_EXPR}
                      AND NOT {PLATFORM_ROW})
RETURNING a.sensor_ref
"""

# The batch's statement (reconcile): places a sensor that is still pending as it was read, and
# nothing else. It never inserts: a sensor unplaced since the pending list was read stays
# forgotten, and one placed again meanwhile with another runtime, selector or tolerations waits
# for the next pass, which reads it as it is now.
PLACE_PENDING_SQL = """
WITH chosen AS (
    ({walk_scored})
    UNION ALL
    ({walk_preferred})
    UNION ALL
    ({walk_penalized})
    LIMIT 1
)
UPDATE {assignments} AS a SET worker_id = chosen.id, assigned_at = now(),
       previous_worker_id = coalesce(a.previous_worker_id, {still_running})
  FROM chosen
 WHERE a.sensor_ref = %(ref)s AND a.worker_id IS NULL AND a.runtime = %(runtime)s
   AND a.selector = %(selector)s::jsonb AND a.tolerations = %(tolerations)s::jsonb
   AND a.affinity = %(affinity)s::jsonb AND a.versions IS NOT DISTINCT FROM %(versions)s::jsonb
RETURNING a.sensor_ref
"""

# A live worker keeps only what it may still run (docs/scheduling.md, "What a worker keeps"): a
# sensor whose runtime it no longer offers or whose selector its labels no longer hold, and
# beyond its capacity the last ones by ref (those its supervisor stops first), go back to
# pending with this worker as their previous worker: it may still run them, and the next one
# starts them only once it said it stopped them (docs/design.md, "At most one copy"). A cordon,
# a health status and a no_schedule taint only keep new sensors away: they keep what is placed.
RELEASE_MINE_SQL = """
SELECT pg_advisory_xact_lock(%(lock)s);
WITH mine AS (
    SELECT a.sensor_ref, a.worker_id, ({may_run}) AS may_run, {capacity} AS capacity
      FROM {assignments} AS a JOIN worker AS w ON w.id = a.worker_id
     WHERE a.worker_id IS NOT NULL AND (%(me)s::bigint IS NULL OR a.worker_id = %(me)s::bigint)
       AND w.status = 'active' AND NOT {stale}
), beyond AS (
    SELECT m.sensor_ref, m.worker_id FROM mine AS m WHERE NOT m.may_run
    UNION ALL
    SELECT k.sensor_ref, k.worker_id
      FROM (SELECT sensor_ref, worker_id, capacity,
                   row_number() OVER (PARTITION BY worker_id ORDER BY sensor_ref) AS n
              FROM mine WHERE may_run) AS k
     WHERE k.n > k.capacity
)
UPDATE {assignments} AS a SET worker_id = NULL, assigned_at = NULL,
       previous_worker_id = coalesce(a.previous_worker_id, a.worker_id)
  FROM beyond WHERE a.sensor_ref = beyond.sensor_ref AND a.worker_id = beyond.worker_id
RETURNING a.sensor_ref, (SELECT w.name FROM worker AS w WHERE w.id = beyond.worker_id)
"""

# A daemon's look at the fleet, at its assignments cadence (one statement, never on the
# heartbeat path): whether it holds sensors it may no longer run, and whether a pending sensor
# could go to it now (it is eligible and has room: capacity or eligibility appeared).
SURVEY_SQL = """
SELECT EXISTS (SELECT 1 FROM {assignments} AS a WHERE a.worker_id = w.id AND NOT ({may_run}))
           OR {placed} > {capacity},
       ({alive}) AND ({schedulable}) AND {placed} < {capacity}
           AND EXISTS (SELECT 1 FROM {assignments} AS a
                        WHERE a.worker_id IS NULL AND ({may_run}) AND ({tolerated})),
       -- the fleet's gauges are due: this daemon may refresh them, and learn of stranded sensors
       (SELECT {gauges_due} FROM {fleet_gauges})
  FROM worker AS w WHERE w.id = %(me)s
"""

# Pending: no worker, or a worker id whose row is gone (deleted by hand): its sensors are
# placed by the next pass, which releases them first.
PENDING_SQL = f"SELECT sensor_ref, runtime, selector, tolerations, affinity, versions FROM {ASSIGNMENTS} " \
              "WHERE worker_id IS NULL ORDER BY created, sensor_ref LIMIT %(limit)s"
PENDING_COUNT_SQL = f"""
SELECT runtime, selector, tolerations, affinity, versions, count(*), sum(count(*)) OVER () FROM {ASSIGNMENTS} AS a
 WHERE a.worker_id IS NULL OR NOT EXISTS (SELECT 1 FROM worker AS w WHERE w.id = a.worker_id)
 GROUP BY runtime, selector, tolerations, affinity, versions ORDER BY count(*) DESC, runtime LIMIT 100
"""

# The worker's side (the service, at its assignments cadence): the sensors placed on it, each
# with whether it may start now, in the same statement as its word that the sensors moved away
# from it which it no longer holds are stopped (the handover of a planned move). A sensor may
# start when no previous worker is named, or that worker is this one, gone, or stale (it stops
# its sensors before that: runner/fence.py).
MINE_SQL = """
WITH stopped AS (
    UPDATE {assignments} SET previous_worker_id = NULL
     WHERE previous_worker_id = %(me)s AND worker_id IS DISTINCT FROM %(me)s AND NOT (sensor_ref = ANY(%(held)s))
    RETURNING sensor_ref
)
SELECT a.sensor_ref, left(a.runtime, 64),
       -- what the worker may read of a row anyone could have written: bounded here, checked there
       CASE WHEN octet_length(a.entrypoint) <= 4096 THEN a.entrypoint
            WHEN a.entrypoint IS NOT NULL THEN '(entrypoint too long)' END,
       CASE WHEN octet_length(a.env::text) <= 300000 THEN a.env ELSE '{{"(env too large)": ""}}'::jsonb END,
       a.assigned_at,
       a.previous_worker_id IS NULL OR a.previous_worker_id = a.worker_id
         OR NOT EXISTS (SELECT 1 FROM worker AS w WHERE w.id = a.previous_worker_id AND NOT {stale}
                           AND NOT {platform_row}),
       (SELECT w.name FROM worker AS w WHERE w.id = a.previous_worker_id),
       {sensor_id} AS sensor_id,
       a.triggers::text,
       (SELECT count(*) FROM stopped)
  FROM {assignments} AS a
 WHERE a.worker_id = %(me)s
 ORDER BY a.sensor_ref
"""
# On the platform's database a sensor it knows by ref runs with its id (ATTUNE_SENSOR_ID).
PLATFORM_SENSOR_ID = "(SELECT s.id FROM sensor AS s WHERE s.ref = a.sensor_ref)"

# A stopping worker, its sensors stopped: they go back to pending with no previous worker to
# wait for, and it is no longer the previous worker of any sensor.
HAND_OVER_SQL = f"""
SELECT pg_advisory_xact_lock(%(lock)s);
UPDATE {ASSIGNMENTS}
   SET worker_id = CASE WHEN worker_id = %(me)s THEN NULL ELSE worker_id END,
       assigned_at = CASE WHEN worker_id = %(me)s THEN NULL ELSE assigned_at END,
       previous_worker_id = CASE WHEN previous_worker_id = %(me)s THEN NULL ELSE previous_worker_id END
 WHERE worker_id = %(me)s OR previous_worker_id = %(me)s
RETURNING sensor_ref
"""

PLACED_SQL = f"""
SELECT a.sensor_ref, w.name FROM {ASSIGNMENTS} AS a JOIN worker AS w ON w.id = a.worker_id
 WHERE a.sensor_ref = ANY(%(refs)s)
"""

LIST_SQL = f"""
SELECT a.sensor_ref, a.runtime, a.selector, a.tolerations, w.name, a.assigned_at, a.entrypoint,
       r.status, r.pid, r.detail, a.origin
  FROM {ASSIGNMENTS} AS a LEFT JOIN worker AS w ON w.id = a.worker_id
  LEFT JOIN {SENSOR_RUNS} AS r ON r.worker_id = a.worker_id AND r.sensor_ref = a.sensor_ref
 WHERE (%(worker)s::text IS NULL OR w.name = %(worker)s::text)
   AND (NOT %(pending)s OR w.id IS NULL)
 ORDER BY a.sensor_ref
"""

UNPLACE_SQL = f"""
SELECT pg_advisory_xact_lock(%(lock)s);
DELETE FROM {ASSIGNMENTS} WHERE sensor_ref = %(ref)s RETURNING sensor_ref
"""

# One move of a rebalance: among the most loaded schedulable workers (by ratio), one sensor
# that another worker eligible for it would hold at a strictly lower ratio than its own now.
# Moving only when that is true makes every move even the fleet out, so a rebalance ends, and
# moves no sensor that is already where balance wants it. Sources and targets are found in
# worker_load's order (as a placement walks it), so a step costs the same at 10,000 workers as
# at 10: no worker's load is counted but the candidates'.
REBALANCE_STEP_SQL = """
SELECT pg_advisory_xact_lock(%(lock)s);
WITH candidates AS (
    SELECT DISTINCT top.worker_id AS id
      FROM (SELECT l.worker_id FROM {worker_load} AS l ORDER BY l.ratio DESC, l.worker_id LIMIT 60) AS top
), sources AS (
    -- the counter chose whom to look at; their sensors, counted, decide
    SELECT w.id, c.load::float8 / c.capacity AS ratio
      FROM candidates JOIN worker AS w ON w.id = candidates.id
     CROSS JOIN LATERAL (SELECT {placed} AS load, {capacity} AS capacity) AS c
     WHERE ({schedulable}) AND c.load > 0 AND c.capacity > 0
     ORDER BY ratio DESC, w.id LIMIT 20
), move AS (
    SELECT a.sensor_ref, s.id AS source_id, dst.id AS target_id
      FROM sources AS s
      JOIN {assignments} AS a ON a.worker_id = s.id
      CROSS JOIN LATERAL (
          SELECT w.id, w.ratio_after FROM {worker_load} AS l
           CROSS JOIN LATERAL (SELECT w.id, ({placed} + 1)::float8 / {capacity} AS ratio_after FROM worker AS w
                                WHERE w.id = l.worker_id AND w.id <> s.id AND {roles} AND ({eligible_for_a})
                               OFFSET 0) AS w
           WHERE l.runtime = a.runtime
           ORDER BY l.ratio, l.worker_id LIMIT 1) AS dst
     WHERE dst.ratio_after < s.ratio - 1e-9
       -- a sensor with preferred affinity terms stays where its preferences placed it
       AND jsonb_array_length(coalesce(a.affinity -> 'preferred', '[]'::jsonb)) = 0
     ORDER BY s.ratio DESC, dst.ratio_after, a.sensor_ref
     LIMIT 1
)
UPDATE {assignments} AS a SET worker_id = move.target_id, assigned_at = now(),
       previous_worker_id = coalesce(a.previous_worker_id, move.source_id)
  FROM move WHERE a.sensor_ref = move.sensor_ref
RETURNING a.sensor_ref, (SELECT name FROM worker WHERE id = move.source_id),
          (SELECT name FROM worker WHERE id = move.target_id)
"""


class NoEligibleWorker(AttuneSensorError):
    """The sensor is recorded as pending: no worker may take it now."""


class PlacementConflict(ValueError):
    """`place` of a sensor already placed with another runtime, selector, tolerations,
    entrypoint or env: refused, the placement is left as it is (docs/scheduling.md, "Commands
    and API"). A ValueError: the command line's usage error (exit 2)."""

    def __init__(self, ref, worker, placed, params):
        asked = {"runtime": params["runtime"], "selector": json.loads(params["selector"]),
                 "tolerations": json.loads(params["tolerations"]), "entrypoint": params["entrypoint"],
                 "env": json.loads(params["env"])}
        differ = [key for key in asked if asked[key] != placed.get(key)]
        shown = ", ".join(f"{key} {_short(placed.get(key))}" for key in differ if key != "env")
        super().__init__(f"sensor {ref!r} is already placed on {worker} with {shown or 'another env'}"
                         f" (differs: {', '.join(differ)}); 'unplace' it first to place it with other settings")
        self.worker = worker


def _short(value):
    text = " ".join(json.dumps(value).split()) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Scheduler:
    """Places sensors on sensor workers. `table` comes from schema.attach(db)."""

    def __init__(self, db, table, stale_multiplier=3.0, clock=time.monotonic):
        self.db = db
        self.table = table
        self.multiplier = stale_multiplier
        self.clock = clock
        self.unfinished = False  # the last reconcile stopped at its limit or budget
        self._synced_at = None
        cordoned = "w.cordoned" if "cordoned" in table.columns else "false"
        self._checks = {name: sql.format(cordoned=cordoned) for name, sql in CHECKS.items()}
        eligible = " AND ".join(f"({sql})" for sql in self._checks.values())
        walks = {name: _WALK.format(worker_load=WORKER_LOAD, roles=PLACEABLE_ROLES, eligible=eligible,
                                    penalized_or_not=condition, has_preferred=HAS_PREFERRED)
                 for name, condition in (("walk_preferred", f"NOT {PENALIZED}"), ("walk_penalized", PENALIZED))}
        walks["walk_scored"] = _SCORED_WALK.format(worker_load=WORKER_LOAD, roles=PLACEABLE_ROLES, eligible=eligible,
                                                   penalized=PENALIZED, has_preferred=HAS_PREFERRED)
        self._place = PLACE_SQL.format(assignments=ASSIGNMENTS, still_running=_STILL_RUNNING, **walks)
        self._prepared_place = PLACE_PENDING_SQL.format(assignments=ASSIGNMENTS, still_running=_STILL_RUNNING,
                                                        **walks)  # $n for %(name)s
        for n, key in enumerate(_PREPARED_PARAMS, 1):
            self._prepared_place = self._prepared_place.replace(f"%({key})s", f"${n}")
        self._sync = SYNC_SQL.format(capacity=CAPACITY, load=PLACED_SENSORS, roles=PLACEABLE_ROLES, worker_load=WORKER_LOAD,
                                     stale=STALE_EXPR)
        # the same rule, for the sensor `a` being moved instead of one given as parameters
        def for_a(sql):
            return (sql.replace("%(runtime)s", "a.runtime").replace("%(selector)s::jsonb", "a.selector")
                    .replace("%(tolerations)s::jsonb", "a.tolerations").replace("%(affinity)s::jsonb", "a.affinity")
                    .replace("%(versions)s::jsonb", "a.versions"))
        may_run = for_a(" AND ".join(f"({self._checks[name]})" for name in ("runtime", "selector", "affinity", "version")))
        self._mine = MINE_SQL.format(assignments=ASSIGNMENTS, stale=STALE_EXPR, platform_row=PLATFORM_ROW,
                                     sensor_id=PLATFORM_SENSOR_ID if table.sensor_processes else "NULL::bigint")
        self._rebalance_step = REBALANCE_STEP_SQL.format(
            worker_load=WORKER_LOAD, schedulable=self._checks["schedulable"], assignments=ASSIGNMENTS, roles=PLACEABLE_ROLES,
            eligible_for_a=for_a(eligible), placed=PLACED_SENSORS, capacity=CAPACITY)
        self._release_mine = RELEASE_MINE_SQL.format(assignments=ASSIGNMENTS, may_run=may_run, capacity=CAPACITY,
                                                     stale=STALE_EXPR)
        self._survey = SURVEY_SQL.format(assignments=ASSIGNMENTS, may_run=may_run, placed=PLACED_SENSORS,
                                         capacity=CAPACITY, alive=self._checks["alive"],
                                         schedulable=self._checks["schedulable"],
                                         tolerated=for_a(self._checks["tolerated"]),
                                         gauges_due=GAUGES_DUE, fleet_gauges=FLEET_GAUGES)

    def place(self, ref, runtime, selector=None, tolerations=(), explain=True, entrypoint=None, env=None):
        """Places one sensor and returns its worker's name (where it already is, if placed
        before). Raises NoEligibleWorker and records the sensor as pending; with `explain`, the
        message says which test no worker passed (one more statement over the fleet).
        `entrypoint` (under the worker's packs_base_dir) and `env` are what the worker runs."""
        params = self._params(ref, runtime, selector, tolerations, entrypoint, env)
        self._sync_if_due(SYNC_PERIOD)
        worker, other = self.db.execute(self._place, params)[0]
        if not worker and self._sync_if_due(SYNC_RETRY_AFTER):
            worker, other = self.db.execute(self._place, params)[0]  # a worker that joined may take it
        if other is not None:
            raise PlacementConflict(ref, worker, other, params)
        if worker:
            return worker
        reason = self._why_not(params) if explain else "no worker may take it now"
        raise NoEligibleWorker(f"sensor {ref!r} is pending: {reason}")

    def unplace(self, ref):
        """Forgets a sensor; True when it was known."""
        return bool(self.db.execute(UNPLACE_SQL, {"lock": PLACEMENT_LOCK_KEY, "ref": ref}))

    def origin(self, ref):
        """'manual', 'platform' (placed by the sync pass), or None when the sensor is not placed."""
        rows = self.db.execute(f"SELECT origin FROM {ASSIGNMENTS} WHERE sensor_ref = %(ref)s", {"ref": ref})
        return rows[0][0] if rows else None

    def assignments(self, worker=None, pending=False):
        rows = self.db.execute(LIST_SQL, {"worker": worker, "pending": pending})
        keys = ("sensor_ref", "runtime", "selector", "tolerations", "worker", "assigned_at", "entrypoint",
                "state", "pid", "detail", "origin")
        return [dict(zip(keys, row)) for row in rows]

    def mine(self, worker_id, held=()):
        """The worker's read: [{sensor_ref, runtime, entrypoint, env, assigned_at, startable,
        previous_worker}] placed on `worker_id`, and how many moved-away sensors it released
        (those not in `held`, the refs it may still be running)."""
        rows = self.db.execute(self._mine, {"me": worker_id, "held": list(held), "multiplier": self.multiplier})
        keys = ("sensor_ref", "runtime", "entrypoint", "env", "assigned_at", "startable", "previous_worker", "sensor_id",
                "triggers")
        return [dict(zip(keys, row)) for row in rows], (rows[0][-1] if rows else 0)

    def hand_over(self, worker_id):
        """A stopping worker whose sensors are stopped releases them; returns their refs."""
        return [row[0] for row in self.db.execute(HAND_OVER_SQL, {"lock": PLACEMENT_LOCK_KEY, "me": worker_id})]

    def rebalance(self, limit=100_000):
        """Evens out a skewed fleet (new workers joined, say) one move at a time, each making
        the fleet strictly more even. First, what live workers may no longer run (a runtime
        dropped, a selector no longer matched, beyond a lowered capacity) goes where it may.
        Returns [(sensor_ref, from_worker, to_worker)]."""
        released = dict(self.release_ineligible())
        _, placed = self.reconcile()
        moves = [(ref, released[ref], placed[ref]) for ref in sorted(released) if ref in placed]
        while len(moves) < limit:
            moved = self.db.execute(self._rebalance_step, {"lock": PLACEMENT_LOCK_KEY, "multiplier": self.multiplier})
            if not moved:
                break
            moves.append(tuple(moved[0]))
        return moves

    def release_ineligible(self, worker_id=None):
        """Sensors that live worker `worker_id` (every live worker: None) may no longer run go
        back to pending, that worker as their previous one (RELEASE_MINE_SQL).
        Returns [(sensor_ref, worker)]."""
        rows = self.db.execute(self._release_mine, {"lock": PLACEMENT_LOCK_KEY, "me": worker_id,
                                                    "multiplier": self.multiplier})
        return [tuple(row) for row in rows]

    def survey(self, worker_id):
        """A daemon's periodic look, one statement: (it holds sensors it may no longer run,
        a pending sensor could go to it now, the fleet's gauges are due for a refresh)."""
        rows = self.db.execute(self._survey, {"me": worker_id, "multiplier": self.multiplier})
        return tuple(bool(value) for value in rows[0]) if rows else (False, False, False)

    def reconcile(self, limit=10_000, budget=None, worker_id=None):
        """Failover: sensors of workers that died, left or were deleted go back to pending (and,
        with `worker_id`, those that live worker may no longer run), then pending sensors are
        placed where possible, oldest first, up to `limit` of them or, after the first batch of
        PLACE_BATCH, until `budget` seconds have passed. Returns (released refs, {ref: worker}
        placed); `unfinished` then says whether it stopped early with pending sensors it did
        not try, `still_pending` how many are left."""
        deadline = None if budget is None else self.clock() + budget
        released = [row[0] for row in self.db.execute(
            RELEASE_SQL, {"lock": PLACEMENT_LOCK_KEY, "multiplier": self.multiplier})]
        if worker_id is not None:
            released += [ref for ref, _ in self.release_ineligible(worker_id)]
        self.sync()
        pending = self.db.execute(PENDING_SQL, {"limit": limit})
        placed = {}
        self.unfinished = len(pending) == limit
        for start in range(0, len(pending), PLACE_BATCH):
            placed.update(self._place_batch(pending[start:start + PLACE_BATCH]))  # at least one per pass
            if deadline is not None and self.clock() >= deadline and start + PLACE_BATCH < len(pending):
                self.unfinished = True
                break
        return released, placed

    def pending_summary(self, groups=3):
        """(sensors pending, [(count, why)] for the largest `groups` kinds of them): why a kind
        stays pending is the first test no worker passed, one statement per kind shown."""
        rows = self.db.execute(PENDING_COUNT_SQL)
        shown = []
        for runtime, selector, tolerations, affinity, versions, count, _ in rows[:groups]:
            params = {"runtime": runtime, "selector": json.dumps(selector), "tolerations": json.dumps(tolerations),
                      "affinity": json.dumps(affinity), "versions": None if versions is None else json.dumps(versions),
                      "multiplier": self.multiplier}
            shown.append((count, self._why_not(params, "a worker has room for them now: the next pass places them")))
        return (int(rows[0][6]) if rows else 0), shown

    def sync(self):
        """Brings worker_load up to the workers: one statement over the fleet (a few
        milliseconds per thousand workers)."""
        self.db.execute(self._sync, {"lock": PLACEMENT_LOCK_KEY, "multiplier": self.multiplier})
        self._synced_at = self.clock()

    # --- helpers ------------------------------------------------------------------------

    def _place_batch(self, sensors):
        """[(ref, runtime, selector, tolerations, affinity, versions)] as PENDING_SQL reads them ->
        {ref: worker} of those placed; the others stay pending. One round trip, one transaction,
        the same statement as place(). What the row says it runs is kept as it is: the worker
        checks it (runner/launch.py)."""
        name = "attune_place_" + uuid.uuid4().hex
        params = {"lock": PLACEMENT_LOCK_KEY, "multiplier": self.multiplier, "refs": [ref for ref, *_ in sensors]}
        statements = ["SELECT pg_advisory_xact_lock(%(lock)s)", "SET LOCAL plan_cache_mode = force_generic_plan",
                      f"PREPARE {name}({_PREPARED_TYPES}) AS {self._prepared_place}"]
        for n, (ref, runtime, selector, tolerations, affinity, versions) in enumerate(sensors):
            # as the row holds them: a platform sensor's selector and tolerations are the platform's
            # (platform/rules.py), which `place`'s own checks would refuse more of
            one = {"ref": ref, "runtime": runtime, "selector": json.dumps(selector),
                   "tolerations": json.dumps(tolerations), "affinity": json.dumps(affinity),
                   "versions": None if versions is None else json.dumps(versions)}
            params.update((f"{key}_{n}", one[key]) for key in _PER_SENSOR_PARAMS)
            arguments = [f"%({key}_{n})s" if key in _PER_SENSOR_PARAMS else f"%({key})s" for key in _PREPARED_PARAMS]
            statements.append(f"EXECUTE {name}({', '.join(arguments)})")
        statements += [f"DEALLOCATE {name}", PLACED_SQL]
        return dict(self.db.execute(";\n".join(statements), params))

    def _sync_if_due(self, period):
        if self._synced_at is not None and self.clock() - self._synced_at < period:
            return False
        self.sync()
        return True

    def _params(self, ref, runtime, selector, tolerations, entrypoint=None, env=None):
        if not isinstance(ref, str) or not 0 < len(ref) <= 255 or any(ord(c) < 32 for c in ref):
            raise ValueError("a sensor ref is 1-255 characters without control characters")
        if entrypoint is not None:
            try:
                launch.check_entrypoint_text(entrypoint)
                env = launch.check_env(dict(env or {}))
            except launch.LaunchRefused as exc:
                raise ValueError(str(exc)) from None
        elif env:
            raise ValueError("--env needs --entrypoint: a placement without one runs nothing")
        return {"lock": PLACEMENT_LOCK_KEY, "ref": ref, "runtime": runtime, "multiplier": self.multiplier,
                "affinity": "{}", "versions": None,
                "selector": json.dumps(placement.labels(dict(selector or {}))),
                "tolerations": json.dumps([toleration(t) for t in tolerations]),
                "entrypoint": entrypoint, "env": json.dumps(dict(env or {}))}

    def _why_not(self, params, otherwise="every eligible worker is full"):
        counts = ", ".join(
            f"count(*) FILTER (WHERE {' AND '.join(f'({self._checks[n]})' for n in list(self._checks)[:i + 1])})"
            for i in range(len(self._checks)))
        row = self.db.execute(DIAGNOSE_SQL.format(counts=counts, roles=PLACEABLE_ROLES), params)[0]
        for name, count in zip(self._checks, row):
            if count == 0:
                return WHY_NOT[name].format(runtime=params["runtime"], selector=params["selector"])
        return otherwise  # place(): filled between the two statements


def toleration(value):
    """`key[=value][:effect]` or a mapping -> the platform's toleration {key, operator, value?,
    effect?}: with a value the operator is `equal`, without one `exists`."""
    if isinstance(value, dict):
        if "operator" in value:
            operator = value["operator"]
            if operator not in ("equal", "exists"):
                raise ValueError(f"a toleration's operator is equal or exists, got {operator!r}")
            if not value.get("key"):  # the platform's rule: no toleration tolerates every taint
                raise ValueError("a toleration names the key of the taint it tolerates")
            clean = {"key": placement.label_key(value["key"]), "operator": operator}
            if value.get("value") is not None:
                clean["value"] = placement.label_value(value["value"], clean["key"])
            if value.get("effect"):
                clean["effect"] = placement.taint({"key": clean["key"], "effect": value["effect"]})["effect"]
            return clean
        parsed = placement.taint(value)
    else:
        text = str(value)
        parsed = placement.parse_taint(text)
        if ":" not in text:
            parsed.pop("effect")  # no effect named: tolerates every effect
    clean = {"key": parsed["key"], "operator": "equal" if "value" in parsed else "exists"}
    if "value" in parsed:
        clean["value"] = parsed["value"]
    if "effect" in parsed:
        clean["effect"] = parsed["effect"]
    return clean
