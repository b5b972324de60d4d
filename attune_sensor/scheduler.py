"""Sensor placement: each sensor on exactly one eligible worker, least-loaded first.

The platform only filters (every matching worker starts a sensor); this decides. One rule of
eligibility, in SQL, in one place (ELIGIBLE): active, not stale by its own interval, not
cordoned, not unhealthy, offers the runtime, its labels hold the selector, every `no_schedule`
taint tolerated, and capacity left. `prefer_no_schedule` taints only rank a worker lower.

Assignments live in attune-sensor's own table, `attune_sensor.assignment` (created by `migrate
run`, never in the platform's schema): one row per sensor ref, `worker_id` NULL while pending.
Every placement takes one transaction-scoped advisory lock and then reads with a fresh snapshot,
so concurrent placers can never over-fill a worker, and the primary key on the sensor ref means
a sensor is never assigned twice. Nothing here deletes a sensor except `unplace`.
"""

import json

from . import placement
from .errors import AttuneSensorError
from .fleet import LISTED_ROLES, STALE_EXPR
from .schema import ASSIGNMENTS

PLACEMENT_LOCK_KEY = 0x4174_7475_6E67

CAPACITY = ("(CASE WHEN jsonb_typeof(w.capabilities -> 'max_concurrent_sensors') = 'number' "
            "THEN (w.capabilities ->> 'max_concurrent_sensors')::numeric ELSE 0 END)")
LOAD = f"(SELECT count(*) FROM {ASSIGNMENTS} AS a WHERE a.worker_id = w.id)"
TAINTS = ("jsonb_array_elements(CASE WHEN jsonb_typeof(w.capabilities -> 'taints') = 'array' "
          "THEN w.capabilities -> 'taints' ELSE '[]'::jsonb END)")
TOLERATES = """EXISTS (SELECT 1 FROM jsonb_array_elements(%(tolerations)s::jsonb) AS tol
    WHERE (tol ->> 'effect' IS NULL OR tol ->> 'effect' = coalesce(t ->> 'effect', 'no_schedule'))
      AND CASE coalesce(tol ->> 'operator', 'equal')
          WHEN 'exists' THEN coalesce(tol ->> 'key', '') IN ('', t ->> 'key')
          ELSE tol ->> 'key' = t ->> 'key' AND (tol ->> 'value') IS NOT DISTINCT FROM (t ->> 'value') END)"""

# Each test as a column, so that a refusal can say which one no worker passed.
CHECKS = {
    "alive": f"w.status = 'active' AND NOT {STALE_EXPR}",
    "schedulable": "NOT {cordoned} AND coalesce(w.capabilities -> 'health' ->> 'status', 'healthy') "
                   "IN ('healthy', 'degraded')",
    "runtime": "jsonb_typeof(w.capabilities -> 'runtimes') = 'array' AND w.capabilities -> 'runtimes' ? %(runtime)s",
    "selector": "(CASE WHEN jsonb_typeof(w.capabilities -> 'labels') = 'object' THEN w.capabilities -> 'labels' "
                "ELSE '{{}}'::jsonb END) @> %(selector)s::jsonb",
    "tolerated": f"NOT EXISTS (SELECT 1 FROM {TAINTS} AS t WHERE coalesce(t ->> 'effect', 'no_schedule') = "
                 f"'no_schedule' AND NOT {TOLERATES})",
    "capacity": f"{LOAD} < {CAPACITY}",
}
WHY_NOT = {
    "alive": "no live sensor worker",
    "schedulable": "every live worker is cordoned or unhealthy",
    "runtime": "no schedulable worker offers runtime {runtime!r}",
    "selector": "no worker with runtime {runtime!r} has labels matching {selector}",
    "tolerated": "every matching worker has a no_schedule taint the sensor does not tolerate",
    "capacity": "every eligible worker is full (max_concurrent_sensors)",
}
PENALIZED = f"EXISTS (SELECT 1 FROM {TAINTS} AS t WHERE t ->> 'effect' = 'prefer_no_schedule' AND NOT {TOLERATES})"

PLACE_SQL = """
SELECT pg_advisory_xact_lock(%(lock)s);
WITH chosen AS (
    SELECT w.id, w.name FROM worker AS w
     WHERE {roles} AND {eligible}
     ORDER BY {penalized}, {load}::float8 / {capacity}, w.name
     LIMIT 1
), placed AS (
    INSERT INTO {assignments} AS a (sensor_ref, runtime, selector, tolerations, worker_id, assigned_at)
    VALUES (%(ref)s, %(runtime)s, %(selector)s::jsonb, %(tolerations)s::jsonb, (SELECT id FROM chosen),
            CASE WHEN EXISTS (SELECT 1 FROM chosen) THEN now() END)
    ON CONFLICT (sensor_ref) DO UPDATE
       SET runtime = EXCLUDED.runtime, selector = EXCLUDED.selector, tolerations = EXCLUDED.tolerations,
           worker_id = EXCLUDED.worker_id, assigned_at = EXCLUDED.assigned_at
     WHERE a.worker_id IS NULL
    RETURNING a.worker_id
)
-- (the statement's own insert is not visible to its reads: a sensor placed before is looked up,
-- one placed now is named by `chosen`)
SELECT CASE WHEN EXISTS (SELECT 1 FROM placed WHERE worker_id IS NOT NULL) THEN (SELECT name FROM chosen)
            ELSE (SELECT w.name FROM {assignments} AS a JOIN worker AS w ON w.id = a.worker_id
                   WHERE a.sensor_ref = %(ref)s) END
"""

DIAGNOSE_SQL = """
SELECT {counts} FROM worker AS w WHERE {roles}
"""

# Assignments whose worker is gone, inactive or stale go back to pending (never deleted).
RELEASE_SQL = """
SELECT pg_advisory_xact_lock(%(lock)s);
UPDATE {assignments} AS a SET worker_id = NULL, assigned_at = NULL
 WHERE a.worker_id IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM worker AS w WHERE w.id = a.worker_id AND w.status = 'active' AND NOT {stale})
RETURNING a.sensor_ref
"""

PENDING_SQL = f"SELECT sensor_ref, runtime, selector, tolerations FROM {ASSIGNMENTS} WHERE worker_id IS NULL " \
              "ORDER BY created, sensor_ref LIMIT %(limit)s"

LIST_SQL = f"""
SELECT a.sensor_ref, a.runtime, a.selector, a.tolerations, w.name, a.assigned_at
  FROM {ASSIGNMENTS} AS a LEFT JOIN worker AS w ON w.id = a.worker_id
 WHERE (%(worker)s::text IS NULL OR w.name = %(worker)s::text)
   AND (NOT %(pending)s OR a.worker_id IS NULL)
 ORDER BY a.sensor_ref
"""

UNPLACE_SQL = f"DELETE FROM {ASSIGNMENTS} WHERE sensor_ref = %s RETURNING sensor_ref"

# One move of a rebalance: among the most loaded workers (by load / capacity), one sensor that
# another worker eligible for it would hold at a strictly lower ratio than its own now. Moving
# only when that is true makes every move even the fleet out, so a rebalance ends, and moves
# no sensor that is already where balance wants it.
REBALANCE_STEP_SQL = """
SELECT pg_advisory_xact_lock(%(lock)s);
WITH loads AS (
    SELECT w.id, w.name, {load} AS load, {capacity} AS capacity FROM worker AS w
     WHERE {roles} AND ({alive}) AND ({schedulable}) AND {capacity} > 0
), sources AS (
    SELECT * FROM loads WHERE load > 0 ORDER BY load::float8 / capacity DESC, name LIMIT 20
), move AS (
    SELECT a.sensor_ref, s.name AS source, dst.id AS target_id, dst.name AS target
      FROM sources AS s
      JOIN {assignments} AS a ON a.worker_id = s.id
      CROSS JOIN LATERAL (
          SELECT d.id, d.name, d.load, d.capacity FROM worker AS w JOIN loads AS d ON d.id = w.id
           WHERE w.id <> s.id AND ({eligible_for_a})
           ORDER BY (d.load + 1)::float8 / d.capacity, d.name LIMIT 1) AS dst
     WHERE (dst.load + 1)::float8 / dst.capacity < s.load::float8 / s.capacity - 1e-9
     ORDER BY s.load::float8 / s.capacity DESC, (dst.load + 1)::float8 / dst.capacity, a.sensor_ref
     LIMIT 1
)
UPDATE {assignments} AS a SET worker_id = move.target_id, assigned_at = now()
  FROM move WHERE a.sensor_ref = move.sensor_ref
RETURNING a.sensor_ref, move.source, move.target
"""


class NoEligibleWorker(AttuneSensorError):
    """The sensor is recorded as pending: no worker may take it now."""


class Scheduler:
    """Places sensors on sensor workers. `table` comes from schema.attach(db)."""

    def __init__(self, db, table, stale_multiplier=3.0):
        self.db = db
        self.table = table
        self.multiplier = stale_multiplier
        cordoned = "w.cordoned" if "cordoned" in table.columns else "false"
        self._checks = {name: sql.format(cordoned=cordoned) for name, sql in CHECKS.items()}
        eligible = " AND ".join(f"({sql})" for sql in self._checks.values())
        self._place = PLACE_SQL.format(roles=LISTED_ROLES, eligible=eligible, penalized=PENALIZED, load=LOAD,
                                       capacity=CAPACITY, assignments=ASSIGNMENTS)
        # the same rule, for the sensor `a` being moved instead of one given as parameters
        for_a = (eligible.replace("%(runtime)s", "a.runtime").replace("%(selector)s::jsonb", "a.selector")
                 .replace("%(tolerations)s::jsonb", "a.tolerations"))
        self._rebalance_step = REBALANCE_STEP_SQL.format(
            load=LOAD, capacity=CAPACITY, roles=LISTED_ROLES, alive=self._checks["alive"],
            schedulable=self._checks["schedulable"], assignments=ASSIGNMENTS, eligible_for_a=for_a)

    def place(self, ref, runtime, selector=None, tolerations=()):
        """Places one sensor and returns its worker's name (where it already is, if placed
        before). Raises NoEligibleWorker, saying why, and records the sensor as pending."""
        params = self._params(ref, runtime, selector, tolerations)
        worker = self.db.execute(self._place, params)[0][0]
        if worker:
            return worker
        raise NoEligibleWorker(f"sensor {ref!r} is pending: {self._why_not(params)}")

    def unplace(self, ref):
        """Forgets a sensor; True when it was known."""
        return bool(self.db.execute(UNPLACE_SQL, (ref,)))

    def assignments(self, worker=None, pending=False):
        rows = self.db.execute(LIST_SQL, {"worker": worker, "pending": pending})
        keys = ("sensor_ref", "runtime", "selector", "tolerations", "worker", "assigned_at")
        return [dict(zip(keys, row)) for row in rows]

    def rebalance(self, limit=100_000):
        """Evens out a skewed fleet (new workers joined, say) one move at a time, each making
        the fleet strictly more even. Returns [(sensor_ref, from_worker, to_worker)]."""
        moves = []
        while len(moves) < limit:
            moved = self.db.execute(self._rebalance_step, {"lock": PLACEMENT_LOCK_KEY, "multiplier": self.multiplier})
            if not moved:
                break
            moves.append(tuple(moved[0]))
        return moves

    def reconcile(self, limit=10_000):
        """Failover: sensors of workers that died or left go back to pending, then every pending
        sensor is placed where possible. Returns (released refs, {ref: worker} placed)."""
        released = [row[0] for row in self.db.execute(
            RELEASE_SQL.format(assignments=ASSIGNMENTS, stale=STALE_EXPR),
            {"lock": PLACEMENT_LOCK_KEY, "multiplier": self.multiplier})]
        placed = {}
        for ref, runtime, selector, tolerations in self.db.execute(PENDING_SQL, {"limit": limit}):
            try:
                placed[ref] = self.place(ref, runtime, selector, tolerations)
            except NoEligibleWorker:
                continue
        return released, placed

    # --- helpers ------------------------------------------------------------------------

    def _params(self, ref, runtime, selector, tolerations):
        if not isinstance(ref, str) or not 0 < len(ref) <= 255 or any(ord(c) < 32 for c in ref):
            raise ValueError("a sensor ref is 1-255 characters without control characters")
        return {"lock": PLACEMENT_LOCK_KEY, "ref": ref, "runtime": runtime, "multiplier": self.multiplier,
                "selector": json.dumps(placement.labels(dict(selector or {}))),
                "tolerations": json.dumps([toleration(t) for t in tolerations])}

    def _why_not(self, params):
        counts = ", ".join(
            f"count(*) FILTER (WHERE {' AND '.join(f'({self._checks[n]})' for n in list(self._checks)[:i + 1])})"
            for i in range(len(self._checks)))
        row = self.db.execute(DIAGNOSE_SQL.format(counts=counts, roles=LISTED_ROLES), params)[0]
        for name, count in zip(self._checks, row):
            if count == 0:
                return WHY_NOT[name].format(runtime=params["runtime"], selector=params["selector"])
        return "every eligible worker is full"  # filled between the two statements


def toleration(value):
    """`key[=value][:effect]` or a mapping -> the platform's toleration {key, operator, value?,
    effect?}: with a value the operator is `equal`, without one `exists`."""
    if isinstance(value, dict):
        if "operator" in value:
            operator = value["operator"]
            if operator not in ("equal", "exists"):
                raise ValueError(f"a toleration's operator is equal or exists, got {operator!r}")
            clean = {"key": placement.label_key(value.get("key")) if value.get("key") else "", "operator": operator}
            if value.get("value") is not None:
                clean["value"] = placement.label_value(value["value"], clean["key"])
            if value.get("effect"):
                clean["effect"] = placement.taint({"key": clean["key"] or "x", "effect": value["effect"]})["effect"]
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
