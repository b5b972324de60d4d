"""Sensor placement: each sensor on exactly one eligible worker, least-loaded first.

The platform does not assign (at start its sensor service runs every sensor with an enabled
rule, with no placement check); this decides, on the rows attune-sensor registered only (never
on the platform's own sensor rows, where nothing reads assignments: fleet.PLATFORM_ROW). One rule of
eligibility, in SQL functions of the own schema (migration 20261201000005; CHECKS names them):
active, not stale by its own interval, not cordoned, not unhealthy, offers the runtime, its
labels hold the selector, every `no_schedule` taint tolerated, the platform's affinity and
version constraint, and capacity left. `prefer_no_schedule` taints and preferred affinity terms
only rank workers. Placing runs in the server (attune_sensor.place_sensor, place_queued), whose
plans are kept per session.

Assignments live in attune-sensor's own table, `attune_sensor.assignment` (created by `migrate
run`, never in the platform's schema): one row per sensor ref, `worker_id` NULL while pending.
Every write holds the placement lock (transaction-scoped, advisory): `place` in shared mode, each
call claiming the worker it writes to and counting its room again under that claim, every other
writer alone (docs/design.md, "A lock per worker"), so concurrent placers can never over-fill a
worker, and the primary key on the sensor ref means a sensor is never assigned twice. Nothing
here deletes a sensor except `unplace`.

The order in which a placement tries workers is `attune_sensor.worker_load`: per worker and
runtime, the load ratio, kept by a trigger on the assignments and indexed, so a placement walks
the workers offering the sensor's runtime from the least loaded and stops at the first eligible
one, instead of counting every worker's sensors (docs/scheduling.md, "At scale"). `sync`
rebuilds it from the workers and the assignments. Capacity is always checked against the
assignments themselves.
"""

import json
import time

from .. import placement
from ..runner import launch
from ..errors import AttuneSensorError
from ..fleet import CAPACITY, GAUGES_DUE, PLACED_SENSORS, PLATFORM_ROW, STALE_EXPR  # CAPACITY: schema.capacity_of
from ..db.schema import ASSIGNMENTS, FLEET_GAUGES, SENSOR_RUNS, WALK_START, WORKER_LOAD

PLACEMENT_LOCK_KEY = 0x4174_7475_6E67
# How long a long-lived Scheduler walks the worker_load rows as they are before syncing them
# again (a worker that registered since is found by the daemons' own reconcile, which syncs);
# a placement that finds no worker syncs first if the last sync is older than SYNC_RETRY_AFTER.
SYNC_PERIOD = 10.0
SYNC_RETRY_AFTER = 1.0
# Pending sensors placed per round trip by reconcile: one statement under one lock, calling
# attune_sensor.place_queued for each (each sees the loads the ones before it left; the
# function's plans are kept per session, docs/design.md "Placement at scale").
PLACE_BATCH = 100
# The rows placement uses (fleet.PLACEABLE_ROLES, as the server's function says it).
ROLES = "attune_sensor.placeable(w.worker_role::text, w.meta)"

# Each test as a column, so that a refusal can say which one no worker passed: the functions of
# own migration 20261201000005, where the rule is written once (the placement functions call the
# same ones).
CHECKS = {
    "alive": "attune_sensor.alive(w.status::text, w.last_heartbeat, w.capabilities, %(multiplier)s)",
    "schedulable": "attune_sensor.schedulable({cordoned}, w.capabilities)",
    "runtime": "attune_sensor.offers_runtime(w.capabilities, %(runtime)s)",
    "selector": "attune_sensor.selector_holds(w.capabilities, %(selector)s::jsonb)",
    "tolerated": "attune_sensor.tolerated(w.capabilities, %(tolerations)s::jsonb)",
    # the platform's worker_affinity (required and anti_affinity terms) and the versions its
    # runtime_version_constraint accepts (platform/rules.py; migration 20261201000005)
    "affinity": "attune_sensor.affinity_holds(w.capabilities, %(affinity)s::jsonb)",
    "version": "attune_sensor.version_holds(w.capabilities, %(versions)s::jsonb)",
    "capacity": "attune_sensor.has_room(w.id, w.capabilities)",
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
# `place`: attune_sensor.place_sensor (own migrations 20261201000005 and 6) takes the lock in
# shared mode, walks, claims its worker and writes; its plans are kept per session.
PLACE_SQL = """
SELECT worker_name, placed_with
  FROM attune_sensor.place_sensor(%(ref)s, %(runtime)s, %(selector)s::jsonb, %(tolerations)s::jsonb,
                                  %(entrypoint)s::text, %(env)s::jsonb, %(multiplier)s, %(lock)s)
"""
# A failover pass's batch: each pending sensor as it is now, in order, each placement seeing the
# ones before it (the function is VOLATILE: each of its statements reads afresh).
PLACE_BATCH_SQL = """
SELECT pg_advisory_xact_lock(%(lock)s);
SELECT p.ref, attune_sensor.place_queued(p.ref, %(multiplier)s) FROM unnest(%(refs)s::text[]) AS p(ref)
"""

DIAGNOSE_SQL = """
SELECT {counts} FROM worker AS w WHERE {roles}
"""

# The end of both syncs: the walk_start rows of every runtime the load table holds (the syncs
# hold the lock alone), and what was dropped and kept.
MAKE_WALK_STARTS = """, made AS (
    INSERT INTO {walk_start} (runtime, ratio)
    SELECT runtime, '-Infinity'::float8 FROM (SELECT runtime FROM {worker_load} UNION SELECT runtime FROM kept) AS r
    ON CONFLICT (runtime) DO NOTHING
)
SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM kept)"""
LIVE_WORKERS = """
    SELECT w.id, w.capabilities -> 'runtimes' AS runtimes,
           CASE WHEN {capacity} BETWEEN 0 AND 1000000 THEN floor({capacity})::int ELSE 0 END AS capacity
      FROM worker AS w
     WHERE {roles} AND w.status = 'active' AND NOT {stale} AND jsonb_typeof(w.capabilities -> 'runtimes') = 'array'
"""
# The runtimes a live worker `w` (of LIVE_WORKERS) offers: the strings of its array, once each
# (offers_runtime looks for strings).
OFFERED = """(SELECT DISTINCT o.value #>> '{{}}' AS runtime FROM jsonb_array_elements(w.runtimes) AS o(value)
                   WHERE jsonb_typeof(o.value) = 'string')"""
# Rebuilt from the facts: a row per live worker (active and not stale: a dead worker not reaped
# yet would lead every walk, at load 0 once its sensors are released) and runtime it offers,
# with its capacity and its load counted from the assignments; every other row goes. One
# statement over the fleet: a daemon's pass, and a placement that found no worker. The rows of
# attune_sensor.walk_start are made here, under the lock held alone; a row added or a load
# counted lower sets them back (triggers of own migration 20261201000006).
SYNC_SQL = f"""
SELECT pg_advisory_xact_lock(%(lock)s);
WITH workers AS ({{live_workers}}), live AS (
    SELECT w.id, o.runtime, w.capacity FROM workers AS w CROSS JOIN LATERAL {OFFERED} AS o
), gone AS (
    DELETE FROM {{worker_load}} AS l
     WHERE NOT EXISTS (SELECT 1 FROM live WHERE live.id = l.worker_id AND live.runtime = l.runtime)
    RETURNING 1
), kept AS (
    INSERT INTO {{worker_load}} AS l (worker_id, runtime, capacity, load)
    SELECT w.id, w.runtime, w.capacity, {{load}} FROM live AS w
    ON CONFLICT (worker_id, runtime) DO UPDATE SET capacity = EXCLUDED.capacity, load = EXCLUDED.load
     WHERE (l.capacity, l.load) IS DISTINCT FROM (EXCLUDED.capacity, EXCLUDED.load)
    RETURNING l.runtime
){{made}}
"""
# What a long-lived placer needs every SYNC_PERIOD: rows for what live workers offer and have no
# row for (a worker that joined, a runtime added on a reload), a capacity that changed, no rows
# for workers gone or runtimes dropped, and a walk start no higher than the lowest row (a value
# written by hand): without counting every worker's sensors (the full sync's shape took 105 ms
# at 10,000 workers). Asked first without the lock (SYNC_NEEDED_SQL): only a sync that has
# something to do makes every placer wait (docs/design.md, "Where the walk starts"). A worker's
# rows are checked against its array with `?` and counted against its length; its runtimes are
# expanded only when the count differs.
SYNC_NEEDED_SQL = f"""
WITH workers AS ({{live_workers}}), held AS (
    SELECT l.worker_id, count(*) AS n,
           bool_or(w.id IS NULL OR l.capacity <> w.capacity OR NOT (w.runtimes ? l.runtime)) AS stale_rows
      FROM {{worker_load}} AS l LEFT JOIN workers AS w ON w.id = l.worker_id
     GROUP BY l.worker_id
)
SELECT (SELECT count(*) FROM held AS h FULL JOIN workers AS w ON w.id = h.worker_id
         WHERE h.worker_id IS NULL OR h.stale_rows
            OR w.id IS NOT NULL AND h.n <> jsonb_array_length(w.runtimes)
               AND h.n <> (SELECT count(*) FROM {OFFERED} AS o)) > 0
    OR EXISTS (SELECT 1 FROM {{walk_start}} AS s
                WHERE s.ratio > (SELECT min(l.ratio) FROM {{worker_load}} AS l WHERE l.runtime = s.runtime))
"""
# (counts over joins by hash, not EXISTS over the fleet: PostgreSQL plans an EXISTS to stop
# early, and walked the workers once per row of worker_load, 200 million steps at 10,000 workers)
SYNC_NEW_SQL = f"""
SELECT pg_advisory_xact_lock(%(lock)s);
WITH workers AS ({{live_workers}}), gone AS (
    DELETE FROM {{worker_load}} AS l
     WHERE NOT EXISTS (SELECT 1 FROM workers AS w WHERE w.id = l.worker_id AND w.runtimes ? l.runtime)
    RETURNING 1
), resized AS (
    UPDATE {{worker_load}} AS l SET capacity = w.capacity FROM workers AS w
     WHERE l.worker_id = w.id AND l.capacity <> w.capacity
    RETURNING 1
), kept AS (
    INSERT INTO {{worker_load}} AS l (worker_id, runtime, capacity, load)
    SELECT w.id, o.runtime, w.capacity, {{load}} FROM workers AS w CROSS JOIN LATERAL {OFFERED} AS o
     WHERE NOT EXISTS (SELECT 1 FROM {{worker_load}} AS m WHERE m.worker_id = w.id AND m.runtime = o.runtime)
    ON CONFLICT (worker_id, runtime) DO NOTHING
    RETURNING l.runtime
){{made}}
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
PENDING_SQL = f"SELECT sensor_ref FROM {ASSIGNMENTS} WHERE worker_id IS NULL ORDER BY created, sensor_ref " \
              "LIMIT %(limit)s"
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

# Rebalance in rounds in the server (attune_sensor.rebalance_moves, own migration
# 20261201000005): each call makes at most this many moves under one lock.
REBALANCE_BATCH = 500
REBALANCE_SQL = "SELECT * FROM attune_sensor.rebalance_moves(%(multiplier)s, %(limit)s, %(lock)s)"

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
        cordoned = "w.cordoned" if "cordoned" in table.columns else "NULL"
        self._checks = {name: sql.format(cordoned=cordoned) for name, sql in CHECKS.items()}
        live = LIVE_WORKERS.format(capacity=CAPACITY, roles=ROLES, stale=STALE_EXPR)
        made = MAKE_WALK_STARTS.format(worker_load=WORKER_LOAD, walk_start=WALK_START)
        self._sync_full, self._sync_new, self._sync_needed = (
            sql.format(live_workers=live, load=PLACED_SENSORS, worker_load=WORKER_LOAD, made=made, walk_start=WALK_START)
            for sql in (SYNC_SQL, SYNC_NEW_SQL, SYNC_NEEDED_SQL))
        # the same rule, for the sensor `a` being moved instead of one given as parameters
        def for_a(sql):
            return (sql.replace("%(runtime)s", "a.runtime").replace("%(selector)s::jsonb", "a.selector")
                    .replace("%(tolerations)s::jsonb", "a.tolerations").replace("%(affinity)s::jsonb", "a.affinity")
                    .replace("%(versions)s::jsonb", "a.versions"))
        may_run = for_a(" AND ".join(f"({self._checks[name]})" for name in ("runtime", "selector", "affinity", "version")))
        self._mine = MINE_SQL.format(assignments=ASSIGNMENTS, stale=STALE_EXPR, platform_row=PLATFORM_ROW,
                                     sensor_id=PLATFORM_SENSOR_ID if table.sensor_processes else "NULL::bigint")
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
        self._sync_if_due(SYNC_PERIOD, recount=False)
        worker, other = self._execute(PLACE_SQL, params)[0]
        if not worker and self._sync_if_due(SYNC_RETRY_AFTER, recount=True):
            worker, other = self._execute(PLACE_SQL, params)[0]  # a worker that joined may take it
        if other is not None:
            raise PlacementConflict(ref, worker, other, params)
        if worker:
            return worker
        reason = self._why_not(params) if explain else "no worker may take it now"
        raise NoEligibleWorker(f"sensor {ref!r} is pending: {reason}")

    def unplace(self, ref):
        """Forgets a sensor; True when it was known."""
        return bool(self._execute(UNPLACE_SQL, {"lock": PLACEMENT_LOCK_KEY, "ref": ref}))

    def origin(self, ref):
        """'manual', 'platform' (placed by the sync pass), or None when the sensor is not placed."""
        rows = self._execute(f"SELECT origin FROM {ASSIGNMENTS} WHERE sensor_ref = %(ref)s", {"ref": ref})
        return rows[0][0] if rows else None

    def assignments(self, worker=None, pending=False):
        rows = self._execute(LIST_SQL, {"worker": worker, "pending": pending})
        keys = ("sensor_ref", "runtime", "selector", "tolerations", "worker", "assigned_at", "entrypoint",
                "state", "pid", "detail", "origin")
        return [dict(zip(keys, row)) for row in rows]

    def mine(self, worker_id, held=()):
        """The worker's read: [{sensor_ref, runtime, entrypoint, env, assigned_at, startable,
        previous_worker}] placed on `worker_id`, and how many moved-away sensors it released
        (those not in `held`, the refs it may still be running)."""
        rows = self._execute(self._mine, {"me": worker_id, "held": list(held), "multiplier": self.multiplier})
        keys = ("sensor_ref", "runtime", "entrypoint", "env", "assigned_at", "startable", "previous_worker", "sensor_id",
                "triggers")
        return [dict(zip(keys, row)) for row in rows], (rows[0][-1] if rows else 0)

    def hand_over(self, worker_id):
        """A stopping worker whose sensors are stopped releases them; returns their refs."""
        return [row[0] for row in self._execute(HAND_OVER_SQL, {"lock": PLACEMENT_LOCK_KEY, "me": worker_id})]

    def rebalance(self, limit=100_000):
        """Evens out a skewed fleet (new workers joined, say) by moves that each make the fleet
        strictly more even, in rounds in the server (REBALANCE_SQL). First, what live workers may no longer run (a runtime
        dropped, a selector no longer matched, beyond a lowered capacity) goes where it may.
        Returns [(sensor_ref, from_worker, to_worker)]."""
        released = dict(self.release_ineligible())
        _, placed = self.reconcile()
        moves = [(ref, released[ref], placed[ref]) for ref in sorted(released) if ref in placed]
        while len(moves) < limit:
            batch = min(REBALANCE_BATCH, limit - len(moves))
            moved = self._execute(REBALANCE_SQL, {"lock": PLACEMENT_LOCK_KEY, "multiplier": self.multiplier,
                                                    "limit": batch})
            moves += [tuple(row) for row in moved]
            if len(moved) < batch:
                break
        return moves

    def release_ineligible(self, worker_id=None):
        """Sensors that live worker `worker_id` (every live worker: None) may no longer run go
        back to pending, that worker as their previous one (RELEASE_MINE_SQL).
        Returns [(sensor_ref, worker)]."""
        rows = self._execute(self._release_mine, {"lock": PLACEMENT_LOCK_KEY, "me": worker_id,
                                                    "multiplier": self.multiplier})
        return [tuple(row) for row in rows]

    def survey(self, worker_id):
        """A daemon's periodic look, one statement: (it holds sensors it may no longer run,
        a pending sensor could go to it now, the fleet's gauges are due for a refresh)."""
        rows = self._execute(self._survey, {"me": worker_id, "multiplier": self.multiplier})
        return tuple(bool(value) for value in rows[0]) if rows else (False, False, False)

    def reconcile(self, limit=10_000, budget=None, worker_id=None):
        """Failover: sensors of workers that died, left or were deleted go back to pending (and,
        with `worker_id`, those that live worker may no longer run), then pending sensors are
        placed where possible, oldest first, up to `limit` of them or, after the first batch of
        PLACE_BATCH, until `budget` seconds have passed. Returns (released refs, {ref: worker}
        placed); `unfinished` then says whether it stopped early with pending sensors it did
        not try, `still_pending` how many are left."""
        deadline = None if budget is None else self.clock() + budget
        released = [row[0] for row in self._execute(
            RELEASE_SQL, {"lock": PLACEMENT_LOCK_KEY, "multiplier": self.multiplier})]
        if worker_id is not None:
            released += [ref for ref, _ in self.release_ineligible(worker_id)]
        self.sync()
        pending = self._execute(PENDING_SQL, {"limit": limit})
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
        rows = self._execute(PENDING_COUNT_SQL)
        shown = []
        for runtime, selector, tolerations, affinity, versions, count, _ in rows[:groups]:
            params = {"runtime": runtime, "selector": json.dumps(selector), "tolerations": json.dumps(tolerations),
                      "affinity": json.dumps(affinity), "versions": None if versions is None else json.dumps(versions),
                      "multiplier": self.multiplier}
            shown.append((count, self._why_not(params, "a worker has room for them now: the next pass places them")))
        return (int(rows[0][6]) if rows else 0), shown

    def sync(self, recount=True):
        """Brings worker_load up to the workers: one statement over the fleet (a few
        milliseconds per thousand workers). Without `recount`, only rows for live workers that
        have none are added, changed capacities taken and the rows of workers gone removed
        (SYNC_NEW_SQL), and only when SYNC_NEEDED_SQL, asked without the lock, finds one."""
        params = {"lock": PLACEMENT_LOCK_KEY, "multiplier": self.multiplier}
        if recount:
            self._execute(self._sync_full, params)
        elif self._execute(self._sync_needed, params)[0][0]:
            self._execute(self._sync_new, params)
        self._synced_at = self.clock()

    # --- helpers ------------------------------------------------------------------------
    def _execute(self, sql, params=None):
        """Every statement of placement at READ COMMITTED: each reads after taking its locks,
        with a fresh snapshot, whatever isolation the database or role defaults to."""
        return self.db.execute(sql, params, read_committed=True)


    def _place_batch(self, sensors):
        """[(ref, ...)] as PENDING_SQL reads them -> {ref: worker} of those placed; the others
        stay pending. One round trip under one lock (PLACE_BATCH_SQL). What the row says it runs
        is kept as it is: the worker checks it (runner/launch.py)."""
        rows = self._execute(PLACE_BATCH_SQL, {"lock": PLACEMENT_LOCK_KEY, "multiplier": self.multiplier,
                                                 "refs": [ref for ref, *_ in sensors]})
        return {ref: worker for ref, worker in rows if worker is not None}

    def _sync_if_due(self, period, recount):
        if self._synced_at is not None and self.clock() - self._synced_at < period:
            return False
        self.sync(recount)
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
        row = self._execute(DIAGNOSE_SQL.format(counts=counts, roles=ROLES), params)[0]
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
