"""Finding the worker table and learning what it holds: its schema, its flavour, its enums.

Two kinds of database carry a `worker` table (docs/design.md, "Two flavours"):

* the spec's schema, which attune-sensor's own migrations create and tune;
* the Attune platform's schema (schema `attune`, cordon columns, no `hybrid` role, a history
  trigger), which belongs to the platform: attune-sensor adapts to it and never imposes.

The table is looked for in this order: the schema named by `database.schema`; the connection's
search_path; the schema `attune`. When the table is not on the connection's search_path, every
statement carries `set_config('search_path', ..., true)` in its own transaction (db.py), so
unqualified names (ours, and those inside the platform's trigger functions) resolve without any
per-session state: PgBouncer's transaction pooling keeps working.
"""

import os
import re
from dataclasses import dataclass

from .. import logs
from ..config import MIN_HEARTBEAT_INTERVAL
from ..errors import ConfigError, DatabasePermissionDenied, SchemaMissing

# attune-sensor's own tables, in its own schema on both flavours (migrations/own/ makes them):
# the reaper's gate (fleet.py), the sensors' assignments and each worker's load (scheduler.py),
# the fleet's gauges (fleet.py), the sensor processes each worker reports (runner/), where
# placement's walk starts (scheduler.py; own migration 20261201000006)
REAPER_GATE = "attune_sensor.reaper_gate"
ASSIGNMENTS = "attune_sensor.assignment"
WORKER_LOAD = "attune_sensor.worker_load"
FLEET_GAUGES = "attune_sensor.fleet_gauges"
SENSOR_RUNS = "attune_sensor.sensor_run"
SYNC_GATE = "attune_sensor.sync_gate"
WALK_START = "attune_sensor.walk_start"
OWN_TABLES = (REAPER_GATE, ASSIGNMENTS, WORKER_LOAD, FLEET_GAUGES, SENSOR_RUNS, SYNC_GATE, WALK_START)
# The capability a worker states the own schema version its code speaks in (worker/service.py).
CONTRACT_CAPABILITY = "attune_sensor_schema"
OWN_VERSIONS = "attune_sensor.schema_migrations"  # the own series' bookkeeping (migrations/)
# A migration file's name: its version and what it does (migrations/, migrations/own/).
MIGRATION_FILE_RE = re.compile(r"^(\d{14})_([a-z0-9_]+)\.sql$")


def own_schema_version():
    """The own series' newest version, from its files' names: what this code needs of a database
    (the daemon checks it at start, and states it). Names only: reading the files or importing
    the migrations module is a visible share of the daemon's start-up (docs/performance.md, 1)."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations", "own")
    return max(int(match.group(1)) for match in map(MIGRATION_FILE_RE.match, os.listdir(folder)) if match)
PLATFORM_SCHEMA = "attune"  # the platform's own default for its database.schema setting
SCHEMA_NAME_RE = re.compile(r"^[a-z_][a-z0-9_$]{0,62}$")

# The platform's marker: its worker table has cordon columns; the spec's never had them.
PLATFORM_MARKER_COLUMN = "cordoned"

# The platform's health contract, from its migrations and services (docs/design.md, "Platform
# health contract"): its executor marks a worker inactive, and its API calls it stale, after 90 s
# without a heartbeat: that is enforced. The view healthy_workers keeps workers whose heartbeat is
# under 30 s old, but no platform code reads it: outside it is worth one warning, not a refusal.
# Its own sensor service heartbeats every 10 s in its shipped configs, the default we take there.
PLATFORM_STALE_AGE = 90.0
PLATFORM_HEALTHY_AGE = 30.0
PLATFORM_DEFAULT_INTERVAL = 10.0
MIN_PLATFORM_MARGIN = 1.0

# One statement: where the table is, whether the search_path finds it, its columns and, for
# enum columns, the enum's labels in order.
DISCOVER_SQL = """
WITH found AS (
    SELECT CASE WHEN %(schema)s::text IS NOT NULL
                THEN to_regclass(format('%%I.worker', %(schema)s::text))
                ELSE coalesce(to_regclass('worker'), to_regclass(%(fallback)s)) END AS rel
)
SELECT n.nspname,
       found.rel = to_regclass('worker') AS on_path,
       (SELECT json_object_agg(a.attname,
                               (SELECT array_agg(e.enumlabel::text ORDER BY e.enumsortorder)
                                  FROM pg_enum e WHERE e.enumtypid = a.atttypid))
          FROM pg_attribute a
         WHERE a.attrelid = found.rel AND a.attnum > 0 AND NOT a.attisdropped) AS columns,
       EXISTS (SELECT 1 FROM pg_class h
                WHERE h.relnamespace = n.oid AND h.relname = 'worker_history') AS has_history,
       -- in this order: each step errors where the one before it is false (no schema; no
       -- USAGE on it, which a read-only monitoring role lacks: to_regclass then fails too)
       ARRAY(SELECT own FROM unnest(%(own)s::text[]) AS own
              WHERE CASE WHEN to_regnamespace('attune_sensor') IS NULL THEN false
                         WHEN NOT has_schema_privilege('attune_sensor', 'USAGE') THEN false
                         WHEN to_regclass(own) IS NULL THEN false
                         ELSE has_any_column_privilege(own, 'UPDATE') END
       ) AS usable,
       CASE WHEN to_regnamespace('attune_sensor') IS NULL THEN false
            WHEN NOT has_schema_privilege('attune_sensor', 'USAGE') THEN false
            WHEN to_regclass(%(versions)s) IS NULL THEN false
            ELSE has_table_privilege(%(versions)s, 'SELECT') END AS versioned,
       to_regnamespace('attune_sensor') IS NOT NULL AS own_schema,
       -- the platform's sensors and its record of their processes, where this role may use them
       CASE WHEN to_regclass(format('%%I.sensor', n.nspname)) IS NULL
              OR to_regclass(format('%%I.sensor_process', n.nspname)) IS NULL THEN false
            ELSE has_table_privilege(format('%%I.sensor', n.nspname), 'SELECT')
             AND has_table_privilege(format('%%I.sensor_process', n.nspname), 'INSERT')
             AND has_table_privilege(format('%%I.sensor_process', n.nspname), 'UPDATE') END AS sensor_processes,
       -- what the platform wants run (platform/sensors.py), where this role may read it
       NOT EXISTS (SELECT 1 FROM unnest(ARRAY['sensor', 'trigger', 'rule', 'runtime', 'runtime_version']) AS t(name)
                    WHERE CASE WHEN to_regclass(format('%%I.%%I', n.nspname, t.name)) IS NULL THEN true
                               ELSE NOT has_table_privilege(format('%%I.%%I', n.nspname, t.name), 'SELECT') END)
           AS platform_sensors
  FROM found
  JOIN pg_class c ON c.oid = found.rel
  JOIN pg_namespace n ON n.oid = c.relnamespace
"""

CURRENT_SCHEMA_SQL = "SELECT current_schema()"

# Staleness is per worker (docs/design.md, "Staleness"): a row is stale when its heartbeat is
# older than a multiple of its own recorded heartbeat_interval (30 s when it recorded none, or
# junk). Inline SQL rather than a database function, so it works on a schema we do not own.
DEFAULT_RECORDED_INTERVAL = 30
# Any program may write a worker row, so what a row recorded is bounded to what our own config
# accepts before it reaches arithmetic: a recorded 1e308 s would push now() - 3 x interval out
# of the timestamp range and fail every statement that reads the row (the heartbeat with it).
MIN_RECORDED_INTERVAL = MIN_HEARTBEAT_INTERVAL
MAX_RECORDED_INTERVAL = 86400  # config's largest number of seconds (config._positive_number)
# A worker's max_concurrent_sensors as placement and the read side count it: a whole number
# within config's range (0 too: a worker that takes none), anything else 0.
MAX_CAPACITY = 1_000_000


def heartbeat_interval_of(alias):
    """SQL for the heartbeat interval a worker row recorded in its capabilities: a number above
    0, clamped to [MIN_RECORDED_INTERVAL, MAX_RECORDED_INTERVAL]; DEFAULT_RECORDED_INTERVAL for
    anything else. Never raises, whatever the row holds."""
    value = f"{alias}.capabilities -> 'heartbeat_interval'"
    # CASE, not AND or OR: only a CASE guarantees the cast never sees a string. The clamp is done in
    # numeric (what a jsonb number is), so no value reaches float8 out of its range.
    return (f"(CASE WHEN jsonb_typeof({value}) IS DISTINCT FROM 'number' THEN {DEFAULT_RECORDED_INTERVAL} "
            f"WHEN ({value})::numeric <= 0 THEN {DEFAULT_RECORDED_INTERVAL} "
            f"ELSE least(greatest(({value})::numeric, {MIN_RECORDED_INTERVAL}), {MAX_RECORDED_INTERVAL})::float8 END)")


# The largest stale_multiplier a row may record for itself (capabilities.stale_multiplier).
MAX_RECORDED_MULTIPLIER = 100


def multiplier_of(alias):
    """SQL for the stale_multiplier a worker row recorded: the window it promised to stop its
    sensors in (runner/fence.py). A number in [1.5, MAX_RECORDED_MULTIPLIER], else NULL."""
    value = f"{alias}.capabilities -> 'stale_multiplier'"
    return (f"(CASE WHEN jsonb_typeof({value}) IS DISTINCT FROM 'number' THEN NULL "
            f"WHEN ({value})::numeric BETWEEN 1.5 AND {MAX_RECORDED_MULTIPLIER} THEN ({value})::numeric::float8 END)")


def stale_condition(alias, multiplier):
    """SQL: the row `alias` is stale; `multiplier` is a SQL expression (usually a parameter).
    A row is never stale before the window it recorded for itself: greatest() of the caller's
    multiplier and the row's own, so a reaper configured with a smaller multiplier cannot call
    a worker dead while its fence still lets its sensors run (docs/design.md, "At most one copy")."""
    return (f"{alias}.last_heartbeat < now() - make_interval(secs => greatest({multiplier}, {multiplier_of(alias)}) * "
            f"{heartbeat_interval_of(alias)})")


def capacity_of(alias):
    """SQL for a worker row's capacity (capabilities.max_concurrent_sensors), as an integer: a
    whole number from 0 to MAX_CAPACITY, 0 for anything else. One definition for `workers`,
    `metrics` and placement (scheduler.CAPACITY)."""
    value = f"{alias}.capabilities -> 'max_concurrent_sensors'"
    return (f"(CASE WHEN jsonb_typeof({value}) IS DISTINCT FROM 'number' THEN 0 "
            f"WHEN ({value})::numeric BETWEEN 0 AND {MAX_CAPACITY} AND ({value})::numeric = trunc(({value})::numeric) "
            f"THEN ({value})::numeric::int ELSE 0 END)")


def check_schema_name(value):
    """The database.schema setting: a plain lower-case identifier, as the platform uses."""
    if not isinstance(value, str) or not SCHEMA_NAME_RE.fullmatch(value):
        raise ValueError("must be a schema name: lower-case letters, digits and _, starting with a letter or _, "
                         "at most 63 characters")
    return value


def quote_ident(name):
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class WorkerTable:
    schema: str
    on_search_path: bool
    columns: tuple          # column names
    enums: dict             # column -> tuple of labels, for enum columns
    has_history: bool = False
    usable: frozenset = frozenset()  # of OWN_TABLES: those that exist and this role may update
    own_version: int = 0  # the newest migration of attune-sensor's own schema applied (0: none)
    own_denied: bool = False  # schema attune_sensor exists, but this role may not read its versions
    # the platform's `sensor` and `sensor_process` beside the worker table, usable by this role
    sensor_processes: bool = False
    # the platform's sensor, trigger, rule, runtime and runtime_version, readable by this role:
    # the sync pass places what the platform wants run (platform/sync.py)
    platform_sensors: bool = False

    @property
    def reaper_gate(self):
        return REAPER_GATE in self.usable

    @property
    def assignments(self):
        """Placement is possible: the assignments and the per-worker load (scheduler.py)."""
        return ASSIGNMENTS in self.usable and WORKER_LOAD in self.usable

    @property
    def gauges(self):
        return FLEET_GAUGES in self.usable

    @property
    def flavour(self):
        return "attune" if PLATFORM_MARKER_COLUMN in self.columns else "spec"

    @property
    def is_platform(self):
        return self.flavour == "attune"

    @property
    def search_path(self):
        """The search_path each statement must set, or None when the connection's finds us."""
        return None if self.on_search_path else f"{quote_ident(self.schema)}, public"

    def allows(self, column, value):
        labels = self.enums.get(column)
        return labels is None or value in labels

    def describe(self):
        where = self.schema + ("" if self.on_search_path else " (not on the connection's search_path)")
        kind = "the Attune platform's schema" if self.is_platform else "attune-sensor's schema (the spec's)"
        return f"worker table {self.schema}.worker: {kind}, schema {where}"


def discover(db, configured_schema=None):
    """Finds the worker table through `db` (a db.Database). Raises SchemaMissing when there is
    none, or when it cannot hold a sensor worker."""
    rows = db.execute(DISCOVER_SQL, {"schema": configured_schema, "fallback": f"{PLATFORM_SCHEMA}.worker",
                                     "own": list(OWN_TABLES), "versions": OWN_VERSIONS}, plain=True)
    if not rows:
        where = f"schema {configured_schema!r} (database.schema)" if configured_schema else \
            f"the connection's search_path nor schema {PLATFORM_SCHEMA!r}"
        raise SchemaMissing(f"the database has no worker table in {where}; run 'attune-sensor migrate run'"
                            + ("" if configured_schema else " or set database.schema"))
    schema, on_path, columns, has_history, usable, versioned, own_schema, sensor_processes, platform_sensors = rows[0]
    columns = columns or {}
    own_version = 0
    if versioned:  # a second statement: a table that may not exist cannot be named in the first
        own_version = db.execute(f"SELECT coalesce(max(version), 0) FROM {OWN_VERSIONS}", plain=True)[0][0]
    table = WorkerTable(schema=schema, on_search_path=bool(on_path), columns=tuple(columns),
                        enums={k: tuple(v) for k, v in columns.items() if v is not None},
                        has_history=bool(has_history), usable=frozenset(usable), own_version=own_version,
                        own_denied=bool(own_schema) and not versioned,
                        sensor_processes=bool(sensor_processes), platform_sensors=bool(platform_sensors))
    missing = [c for c in ("name", "worker_role", "status", "capabilities", "meta", "last_heartbeat")
               if c not in table.columns]
    if missing:
        raise SchemaMissing(f"{schema}.worker lacks the column(s) {', '.join(missing)}; "
                            "run 'attune-sensor migrate run'")
    if not table.allows("worker_role", "sensor"):
        raise SchemaMissing(f"{schema}.worker's worker_role type has no 'sensor' value "
                            f"(it holds {', '.join(table.enums['worker_role'])})")
    return table


def check_own_schema(table, needed_version):
    """SchemaMissing (exit 78) unless attune-sensor's own schema is at `needed_version` or newer
    and this role may use every table of it: the daemon needs all of them (docs/design.md,
    "Own schema")."""
    if table.own_denied:
        raise DatabasePermissionDenied(
            "permission denied for attune-sensor's own schema (attune_sensor): put this login role in the group "
            "role (GRANT attune_sensor_daemon TO <role>), and run 'attune-sensor migrate run' as the schema owner")
    if table.own_version < needed_version:
        have = f"at version {table.own_version}" if table.own_version else "missing"
        raise SchemaMissing(f"attune-sensor's own schema (attune_sensor) is {have}, this version needs "
                            f"{needed_version}: run 'attune-sensor migrate run' as the schema owner")
    unusable = [name for name in OWN_TABLES if name not in table.usable]
    if unusable:
        raise SchemaMissing(f"this role may not use {', '.join(unusable)}: run 'attune-sensor migrate run' as the "
                            "schema owner (it grants attune_sensor_daemon) and put this role in attune_sensor_daemon")


def check_worker_type(table, worker_type):
    """ConfigError when the database's worker_type enum lacks the configured value."""
    if not table.allows("worker_type", worker_type):
        raise ConfigError(f"sensor.worker_type: {worker_type!r} is not a worker type of this database "
                          f"(it has {', '.join(table.enums['worker_type'])})")


def choose_interval(configured, table, statement_timeout):
    """The heartbeat interval to run with on this table. On the platform's schema the worst gap
    between two stored heartbeats is the interval plus one bounded statement: one that reaches the
    executor's 90 s stale rule is refused (the platform would mark the worker inactive between
    heartbeats); one outside healthy_workers' 30 s window is logged once, as nothing of the
    platform's acts on that view."""
    if not table.is_platform:
        return DEFAULT_RECORDED_INTERVAL if configured is None else configured
    if configured is None:
        return PLATFORM_DEFAULT_INTERVAL
    if configured + statement_timeout >= PLATFORM_STALE_AGE:
        raise ConfigError(
            f"sensor.heartbeat_interval: {configured:g}s plus database.statement_timeout "
            f"{statement_timeout:g}s reaches the Attune platform's {PLATFORM_STALE_AGE:g}s stale rule: its executor "
            f"would mark this worker inactive between heartbeats; use at most "
            f"{max(MIN_PLATFORM_MARGIN, PLATFORM_STALE_AGE - statement_timeout - MIN_PLATFORM_MARGIN):g}s "
            "or leave it unset (auto: 10s here)")
    if configured + statement_timeout >= PLATFORM_HEALTHY_AGE:
        logs.get("schema").warning(
            "sensor.heartbeat_interval: %gs plus database.statement_timeout %gs is outside the Attune platform's "
            "healthy_workers view (%gs): the worker drops out of that view between heartbeats (no platform "
            "service reads it; its executor's %gs stale rule is met)", configured, statement_timeout,
            PLATFORM_HEALTHY_AGE, PLATFORM_STALE_AGE)
    return configured


def attach(db, configured_schema=None):
    """Discovers the table and makes every later statement on `db` find it."""
    table = discover(db, configured_schema)
    db.search_path = table.search_path
    return table
