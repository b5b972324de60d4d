"""Read-side queries over all workers, the stale reaper, and fleet metrics.

Staleness is per worker (docs/design.md, "Staleness"): a row is stale when its last heartbeat is
older than `multiplier` times its own recorded heartbeat_interval. The same expression
(schema.stale_condition) serves registration, the reaper, `workers --stale`, `check` and
`metrics`, so they always agree. Roles are compared as text: the platform's enum has no
'hybrid', and a literal it lacks would fail the whole statement.
"""

import json
import select

import psycopg2

from ..db import connect_blocking, fraction
from ..config.dsn import scrub
from ..errors import DatabaseUnavailable
from ..db.schema import (ASSIGNMENTS, FLEET_GAUGES, REAPER_GATE, attach, capacity_of, heartbeat_interval_of,
                     stale_condition)

EVENT_CHANNEL = "attune_worker_events"
REAPER_LOCK_KEY = 0x4174_7475_6E66  # one reaper at a time, fleet-wide

STALE_EXPR = stale_condition("w", "%(multiplier)s")
# A worker's capacity (schema.capacity_of): what `workers`, `metrics` and placement count.
CAPACITY = capacity_of("w")
# The runtimes a worker offers, as `workers` lists them: the strings of its runtimes array.
RUNTIMES = ("(CASE WHEN jsonb_typeof(w.capabilities -> 'runtimes') = 'array' THEN "
            "(SELECT coalesce(jsonb_agg(r ORDER BY n), '[]') FROM jsonb_array_elements(w.capabilities -> 'runtimes') "
            "WITH ORDINALITY AS e(r, n) WHERE jsonb_typeof(r) = 'string') ELSE '[]'::jsonb END)")
# Its placement labels (capabilities.labels, the string entries of the map) and taints
# (capabilities.taints, {key, value?, effect?} objects or key[=value][:effect] strings), each
# taint shown as the text the configuration takes.
LABELS = ("(CASE WHEN jsonb_typeof(w.capabilities -> 'labels') = 'object' THEN "
          "(SELECT coalesce(jsonb_object_agg(k, v ORDER BY k), '{}') FROM jsonb_each(w.capabilities -> 'labels') "
          "AS e(k, v) WHERE jsonb_typeof(v) = 'string') ELSE '{}'::jsonb END)")
TAINTS = ("(CASE WHEN jsonb_typeof(w.capabilities -> 'taints') = 'array' THEN "
          "(SELECT coalesce(jsonb_agg(CASE WHEN jsonb_typeof(t) = 'string' THEN t #>> '{}' ELSE "
          "(t ->> 'key') || coalesce('=' || (t ->> 'value'), '') || coalesce(':' || (t ->> 'effect'), '') "
          "END ORDER BY n), '[]') FROM jsonb_array_elements(w.capabilities -> 'taints') WITH ORDINALITY AS e(t, n) "
          "WHERE jsonb_typeof(t) = 'string' OR (jsonb_typeof(t) = 'object' AND jsonb_typeof(t -> 'key') = 'string')) "
          "ELSE '[]'::jsonb END)")


def seconds_since(timestamp):
    """SQL: seconds from `timestamp` to now(), NULL for an infinite one (whose difference
    PostgreSQL refuses to compute: 'cannot subtract infinite timestamps')."""
    return f"CASE WHEN isfinite({timestamp}) THEN extract(epoch FROM now() - {timestamp})::float8 END"


def expired(timestamp, period):
    """SQL: `timestamp` is older than `period` seconds, or in the future: written by a clock
    that was stepped back since, or by someone else. now() is when our transaction began, so a
    writer that committed after it may have stored a later now(); no committed now() is ever
    ahead of clock_timestamp(), which is therefore the bound of "the future"."""
    return (f"({timestamp} < now() - make_interval(secs => {period}) "
            f"OR {timestamp} > clock_timestamp())")


LISTED_ROLES = "w.worker_role::text IN ('sensor', 'hybrid')"

# What a reap writes into meta, and so what a worker that comes back removes (registration.py).
REAPER_META_KEYS = ("reaped_at", "reaped_by", "reaped_last_heartbeat")


# Only our rows are ours (docs/design.md): every registration of attune-sensor writes a meta
# object naming its instance_id (registration.py). The platform's own sensor service never
# writes meta: its INSERT leaves it NULL and its UPDATE does not touch it, so its rows carry no
# meta, or only the marks an earlier attune-sensor's reaper left there. Such a row is the
# platform's: its executor reaps it (90 s), nothing there reads assignments, and `workers` says
# "platform". A row with any other meta (a row this version wrote, or one written by hand for
# a test or a spec-flavoured tool) stays ours, as before.
HAS_INSTANCE = "coalesce(jsonb_typeof(w.meta -> 'instance_id') = 'string', false)"
# (CASE: a meta that is not an object is not the platform's, and `-` would fail on a scalar.)
PLATFORM_ROW = (f"(w.worker_role::text = 'sensor' AND NOT {HAS_INSTANCE} AND (w.meta IS NULL OR "
                f"CASE WHEN jsonb_typeof(w.meta) = 'object' THEN w.meta ? 'reaped_at' "
                f"AND w.meta - ARRAY{list(REAPER_META_KEYS)}::text[] = '{{}}'::jsonb ELSE false END))")
# The rows placement may use: listed, and not the platform's (scheduler.py).
PLACEABLE_ROLES = f"({LISTED_ROLES} AND NOT {PLATFORM_ROW})"
# The reaper marks sensor rows that are not the platform's, and hybrid rows only when
# attune-sensor registered them: the platform's own workers follow its own stale rule
# (docs/operations.md, "On an Attune platform database").
REAPED_ROLES = (f"((w.worker_role::text = 'sensor' AND NOT {PLATFORM_ROW}) "
                f"OR (w.worker_role::text = 'hybrid' AND {HAS_INSTANCE}))")
# Who runs the row, as `workers` shows it.
RUN_BY = f"(CASE WHEN {PLATFORM_ROW} THEN 'platform' ELSE 'attune-sensor' END)"

# The sensors placed on worker `w` (scheduler.py), counted from the assignments themselves: what
# `workers` shows and what the scheduler's capacity test reads.
PLACED_SENSORS = f"(SELECT count(*) FROM {ASSIGNMENTS} AS a WHERE a.worker_id = w.id)"


def _mark_reaped(reaper_param):
    """The SET clause of a reap: inactive, and who reaped it when, in meta (one definition for
    the periodic reaper and the one on the heartbeat)."""
    values = ("now()", f"{reaper_param}::text", "w.last_heartbeat")
    pairs = ", ".join(f"'{key}', {value}" for key, value in zip(REAPER_META_KEYS, values))
    return f"status = 'inactive', meta = coalesce(w.meta, '{{}}'::jsonb) || jsonb_build_object({pairs})"


# Election and work in one statement: the CTE is evaluated once, and only the session that
# got the transaction-scoped advisory lock updates anything. The lock ends with the statement.
# The last row carries the number of active workers, which spaces out the next attempt.
REAP_SQL = f"""
WITH elected AS MATERIALIZED (SELECT pg_try_advisory_xact_lock(%(lock)s) AS ok),
reaped AS (
    UPDATE worker AS w
       SET {_mark_reaped("%(reaper)s")}
      FROM elected
     WHERE elected.ok
       AND {REAPED_ROLES}
       AND w.status = 'active'
       AND {STALE_EXPR}
    RETURNING w.id, w.name, w.host
)
SELECT id, name, host, NULL::bigint FROM reaped
UNION ALL
SELECT NULL, NULL, NULL, count(*) FROM worker AS w WHERE {REAPED_ROLES} AND w.status = 'active'
"""

# The reaper on the heartbeat path (docs/design.md, "Reaper"): every heartbeat carries it, so a
# dead worker is found as soon as some live one beats, with no statement of its own. It is the
# function attune_sensor.heartbeat (own migration 20261201000004; registration.REAPING_HEARTBEAT_SQL
# calls it), whose statements the server plans once per session: the gate row
# (attune_sensor.reaper_gate) lets at most one scan through per REAP_PERIOD fleet-wide, under
# the advisory lock REAPER_LOCK_KEY; a heartbeat that finds the period not over reads one row and
# nothing else. Its reap is the same rule as REAP_SQL's above (REAPED_ROLES, _mark_reaped, the
# stale rule as attune_sensor.is_stale); tests/test_reaper_rules.py holds the two together.
REAP_PERIOD = 10.0

# Every value read from a row's capabilities is typed and bounded (schema.py): a row that any
# program wrote must not fail the listing of the whole fleet.
WORKERS_SQL = """
SELECT w.id, w.name, w.host, w.worker_role::text, w.worker_type::text, w.status::text,
       {runtimes},
       {capacity},
       {age},
       (w.status = 'active' AND {stale}) AS stale,
       {interval},
       coalesce(w.meta ? 'reaped_at', false) AS reaped,
       {cordoned},
       {sensors},
       {run_by},
       {labels},
       {taints}
  FROM worker AS w
 WHERE {roles}
   AND (%(runtime)s::text IS NULL OR w.capabilities -> 'runtimes' ? %(runtime)s::text)
   AND (%(name)s::text IS NULL OR w.name = %(name)s::text)
   AND (NOT %(stale_only)s OR (w.status = 'active' AND {stale}))
 ORDER BY w.name
"""

COLUMNS = ("id", "name", "host", "role", "type", "status", "runtimes", "capacity",
           "heartbeat_age", "stale", "heartbeat_interval", "reaped", "cordoned", "sensors", "by", "labels", "taints")


def reaper_delay(heartbeat_interval, active_workers, rng=fraction):
    """Seconds until this daemon's next reap attempt. Each of N active workers waits about
    N x the base period (jittered), so the whole fleet makes about one attempt per base period,
    whatever its size; the base is max(30 s, heartbeat_interval), since reaping more often than
    workers heartbeat finds nothing new."""
    base = max(30.0, float(heartbeat_interval))
    return base * max(1, active_workers) * (0.5 + rng())


def reap_stale(db, reaper_name, multiplier, table=None):
    """Marks stale active sensor workers inactive if this session wins the election.
    Returns ([(id, name, host)] reaped by us, number of active workers before the reap).
    `table` from schema.attach(), found when not given."""
    if table is None:
        attach(db)
    rows = db.execute(REAP_SQL, {"lock": REAPER_LOCK_KEY, "reaper": reaper_name, "multiplier": multiplier})
    reaped = [tuple(row[:3]) for row in rows if row[3] is None]
    active = next(row[3] for row in rows if row[3] is not None)
    return reaped, active


def workers_sql(table):
    """The listing for this worker table: cordons show where the table has them."""
    cordoned = "w.cordoned" if "cordoned" in table.columns else "false"
    # sensors placed on it, where this database has the assignments table
    sensors = PLACED_SENSORS if table.assignments else "NULL::bigint"
    return WORKERS_SQL.format(runtimes=RUNTIMES, capacity=CAPACITY, age=seconds_since("w.last_heartbeat"),
                              stale=STALE_EXPR, interval=heartbeat_interval_of("w"), roles=LISTED_ROLES,
                              cordoned=cordoned, sensors=sensors, run_by=RUN_BY, labels=LABELS, taints=TAINTS)


def list_workers(db, multiplier, runtime=None, stale_only=False, name=None, table=None):
    """Sensor (and hybrid) workers as dicts (COLUMNS). `table` from schema.attach(), found
    when not given."""
    if table is None:
        table = attach(db)
    rows = db.execute(workers_sql(table), {"runtime": runtime, "stale_only": stale_only,
                                    "multiplier": multiplier, "name": name})
    return [dict(zip(COLUMNS, row)) for row in rows]


# The fleet's gauges in one aggregate statement: no row leaves the server (bench/queries.py).
# Numbers read from capabilities are guarded (schema.capacity_of): a junk value counts as 0, it
# does not fail the scrape; a heartbeat at +-infinity has no age.
_PLACEMENT_GAUGES = f"""
    -- sensors waiting for a worker, and those placed on a worker that is not live or is gone
    -- (a pass releases and places them; a daemon that refreshes these gauges runs one then)
    'pending', (SELECT count(*) FROM {ASSIGNMENTS} AS a
                 WHERE a.worker_id IS NULL OR NOT EXISTS (SELECT 1 FROM worker AS w WHERE w.id = a.worker_id)),
    'stranded', (SELECT count(*) FROM {ASSIGNMENTS} AS a
                  WHERE a.worker_id IS NOT NULL AND NOT EXISTS (
                        SELECT 1 FROM worker AS w WHERE w.id = a.worker_id AND w.status = 'active' AND NOT {STALE_EXPR}
                           AND NOT {PLATFORM_ROW})),"""
GAUGES_SQL = f"""
SELECT jsonb_build_object({_PLACEMENT_GAUGES}
    'active', jsonb_build_object(
        'sensor', count(*) FILTER (WHERE w.status = 'active' AND w.worker_role::text = 'sensor'),
        'hybrid', count(*) FILTER (WHERE w.status = 'active' AND w.worker_role::text = 'hybrid')),
    'stale', count(*) FILTER (WHERE w.status = 'active' AND {STALE_EXPR}),
    'reaped', count(*) FILTER (WHERE w.status = 'inactive' AND w.meta ? 'reaped_at'),
    'max_heartbeat_lag', coalesce({seconds_since(
        "min(w.last_heartbeat) FILTER (WHERE w.status = 'active' AND isfinite(w.last_heartbeat))")}, 0),
    'capacity', coalesce(sum({CAPACITY}) FILTER (WHERE w.status = 'active'), 0),
    'runtimes', (SELECT coalesce(jsonb_object_agg(runtime, n ORDER BY runtime), '{{}}')
                   FROM (SELECT r AS runtime, count(*) AS n
                           FROM worker AS w,
                                jsonb_array_elements_text(CASE WHEN jsonb_typeof(w.capabilities -> 'runtimes') = 'array'
                                                               THEN w.capabilities -> 'runtimes' END) AS r
                          WHERE {LISTED_ROLES} AND w.status = 'active'
                          GROUP BY r) AS distribution))
  FROM worker AS w
 WHERE {LISTED_ROLES}
"""

# a database without attune-sensor's own schema (not migrated by this version): no placement gauges
_GAUGES_WITHOUT_PLACEMENT = GAUGES_SQL.replace(_PLACEMENT_GAUGES, "")

# `metrics` runs on every host, as often as its scraper asks: at 10,000 hosts scraping each
# minute that would be 166 scans of the whole table a second. The gauges are kept in one row of
# attune_sensor.fleet_gauges instead: a caller that finds them older than GAUGES_PERIOD
# recomputes and stores them (the row lock with SKIP LOCKED lets one caller at a time do it,
# the others read the row as it is), so the table is scanned at most once per period
# fleet-wide, and a scrape reads one row (docs/design.md, "Fleet gauges").
# Any role that may update the row may write anything into it, and a clock stepped back leaves
# computed_at in the future: the stored gauges are served only when they are sound, that is
# computed_at not in the future and every gauge present, a number, at least 0 and below 1e15
# (a JSON 1e400 would be infinity in Python); otherwise they are due like old ones.
GAUGES_PERIOD = 10.0
_COUNTS = ("active", "runtimes")  # objects whose values are all gauges
_NUMBERS = ("active.sensor", "active.hybrid", "stale", "reaped", "max_heartbeat_lag", "capacity", "pending",
            "stranded")
_GAUGE_OK = '(@.type() == "number" && @ >= 0 && @ < 1e15)'
_GAUGES_WELL_FORMED = "coalesce(jsonb_path_match(gauges, 'strict {}'), false)".format(" && ".join(
    [f"exists($.{path} ? {_GAUGE_OK})" for path in _NUMBERS]
    + [f'$.{name}.type() == "object" && !exists($.{name}.* ? (!{_GAUGE_OK}))' for name in _COUNTS]))
_GAUGES_DUE = (f"({expired('computed_at', GAUGES_PERIOD)} OR NOT {_GAUGES_WELL_FORMED} "
               "OR multiplier IS DISTINCT FROM %(multiplier)s)")
# The daemons refresh the gauges a second earlier than a scrape would (scheduler.SURVEY_SQL,
# refresh_gauges): a daemon surveying every 10 s then finds them due at each survey, so stranded
# sensors are noticed within one survey period even with a single daemon.
DAEMON_GAUGES_PERIOD = GAUGES_PERIOD - 1.0
GAUGES_DUE = _GAUGES_DUE.replace(expired("computed_at", GAUGES_PERIOD), expired("computed_at", DAEMON_GAUGES_PERIOD))
# the gauges, whether they are fresh, whether they may stand in while another caller refreshes
# them (sound, same multiplier, however old), their age
READ_GAUGES_SQL = f"""
SELECT gauges, NOT {_GAUGES_DUE},
       computed_at <= clock_timestamp() AND {_GAUGES_WELL_FORMED} AND multiplier = %(multiplier)s,
       greatest({seconds_since("computed_at")}, 0)
  FROM {FLEET_GAUGES}
"""
REFRESH_GAUGES_SQL = f"""
UPDATE {FLEET_GAUGES} SET computed_at = now(), multiplier = %(multiplier)s, gauges = ({GAUGES_SQL})
 WHERE only_row IN (SELECT only_row FROM {FLEET_GAUGES} WHERE {_GAUGES_DUE} FOR UPDATE SKIP LOCKED)
RETURNING gauges
"""


_DAEMON_REFRESH_GAUGES_SQL = REFRESH_GAUGES_SQL.replace(_GAUGES_DUE, GAUGES_DUE)


def metrics(db, multiplier, table=None):
    """The fleet's gauges: {active: {role: n}, stale, reaped, max_heartbeat_lag, capacity,
    runtimes, pending, stranded, age} (no pending and stranded without the own schema). `age`: seconds since they were computed (at most GAUGES_PERIOD, but for a
    role that may not update the stored row: it computes them every time, age 0)."""
    if table is None:
        table = attach(db)
    params = {"multiplier": multiplier}
    if table.gauges:
        stored, fresh, usable, age = db.execute(READ_GAUGES_SQL, params)[0]
        if fresh:
            return dict(stored, age=age)
        refreshed = db.execute(REFRESH_GAUGES_SQL, params)
        if refreshed:
            return dict(refreshed[0][0], age=0.0)
        if usable:
            return dict(stored, age=age)  # another caller is computing them right now
    return dict(db.execute(GAUGES_SQL if table.assignments else _GAUGES_WITHOUT_PLACEMENT, params)[0][0], age=0.0)


def refresh_gauges(db, multiplier):
    """The daemon's side of the gauges: recomputes them if they are due and no other caller is
    at it. Returns the gauges it computed, else None."""
    refreshed = db.execute(_DAEMON_REFRESH_GAUGES_SQL, {"multiplier": multiplier})
    return refreshed[0][0] if refreshed else None


def summary(workers):
    """The spec's "Metrics to Track" over a list from list_workers()."""
    active = [w for w in workers if w["status"] == "active"]
    distribution = {}
    for worker in active:
        for runtime in worker["runtimes"]:
            distribution[runtime] = distribution.get(runtime, 0) + 1
    lags = [w["heartbeat_age"] for w in active if w["heartbeat_age"] is not None]
    return {
        "active": len(active),
        "total": len(workers),
        "stale": sum(1 for w in workers if w["stale"]),
        "runtimes": dict(sorted(distribution.items())),
        "max_heartbeat_lag": max(lags) if lags else None,
        "capacity": sum(w["capacity"] for w in active),
    }



def watch(url, connect_timeout, on_event, should_stop=lambda: False):
    """LISTENs for worker events (see migration worker_events) and calls on_event(dict) for each
    until should_stop() is true. Needs a session-mode connection (not PgBouncer transaction
    pooling, where LISTEN does not work)."""
    conn = connect_blocking(url, connect_timeout, application_name="attune-sensor watch")
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(f"LISTEN {EVENT_CHANNEL}")
        while not should_stop():
            select.select([conn], [], [], 1.0)
            try:
                conn.poll()
            except psycopg2.Error as exc:
                raise DatabaseUnavailable(f"lost the database connection: {scrub(exc, url)}") from None
            while conn.notifies:
                note = conn.notifies.pop(0)
                try:
                    on_event(json.loads(note.payload))
                except ValueError:
                    on_event({"event": "unparsed", "payload": note.payload})
    finally:
        conn.close()
