"""Versioned SQL migrations and their runner (`attune-sensor migrate run|info`).

Files are named <version>_<name>.sql and are never edited after release: the runner stores each
file's SHA-256 and refuses to go on when an applied file has changed. Each migration runs in its
own transaction together with its bookkeeping row; a session-level advisory lock makes two
hosts running `migrate run` at once take turns.

Two series, each with its own bookkeeping table:

* the spec's schema (this folder, bookkeeping `attune_sensor_migrations` beside the worker
  table): builds and tunes the spec's `worker` table. On the Attune platform's schema
  (schema.py) none of it runs: the table belongs to the platform, and attune-sensor only grants
  its daemon role what it needs there (access.py). Tuning the platform's table for HOT
  heartbeats is the operator's explicit choice (`migrate run --tune-heartbeats`).
* attune-sensor's own schema (`own/`, bookkeeping `attune_sensor.schema_migrations`): the
  reaper's gate, the assignments, the load index, the gauges and the sensor runner's tables, on
  both flavours. The daemon refuses a database whose own series is behind the version it knows
  (OWN_SCHEMA_VERSION), so a new column always arrives through `migrate run`.
"""

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import psycopg2

from .. import access, schema
from ..db import connect_blocking
from ..dsn import scrub
from ..errors import MigrationError, SchemaMissing

FILE_RE = re.compile(r"^(\d{14})_([a-z0-9_]+)\.sql$")
LOCK_KEY = 0x4174_7475_6E65  # "Attune": one key for all runners of this project
TABLE = "attune_sensor_migrations"  # the spec series' bookkeeping, beside the worker table
OWN_TABLE = "attune_sensor.schema_migrations"  # the own series'
OWN_FOLDER = "own"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self):
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def filename(self):
        return f"{self.version}_{self.name}.sql"


def available(folder=None):
    """The spec series (folder None) or the own series (OWN_FOLDER), in version order."""
    found = []
    root = resources.files(__package__)
    for entry in (root / folder if folder else root).iterdir():
        match = FILE_RE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


def own_available():
    return available(OWN_FOLDER)


# The own series' newest version: what this daemon needs (schema.discover reads the database's).
OWN_SCHEMA_VERSION = own_available()[-1].version


def _applied(cursor, table=TABLE):
    # to_regnamespace first: to_regclass of a name in a schema we may not use raises
    cursor.execute("SELECT CASE WHEN %s NOT LIKE 'attune_sensor.%%' THEN to_regclass(%s) IS NOT NULL "
                   "WHEN to_regnamespace('attune_sensor') IS NULL THEN false "
                   "WHEN NOT has_schema_privilege('attune_sensor', 'USAGE') THEN false "
                   "ELSE to_regclass(%s) IS NOT NULL END", (table, table, table))
    if not cursor.fetchone()[0]:
        return {}
    cursor.execute(f"SELECT version, name, checksum, applied_at FROM {table} ORDER BY version")
    return {row[0]: row for row in cursor.fetchall()}


def _check_unchanged(migrations, applied):
    for migration in migrations:
        row = applied.get(migration.version)
        if row and row[2] != migration.checksum:
            raise MigrationError(
                f"migration {migration.filename} was changed after it was applied "
                "(checksum differs); restore the released file instead of editing it"
            )


class _Session:
    """schema.discover() over a plain (blocking) cursor."""

    def __init__(self, cursor):
        self.cursor = cursor

    def execute(self, sql, params=None, plain=True):
        self.cursor.execute(sql, params)
        return self.cursor.fetchall() if self.cursor.description else []


def _find_table(cursor, configured_schema):
    """(WorkerTable or None, the schema our objects go to). Sets the session's search_path to it."""
    try:
        table = schema.discover(_Session(cursor), configured_schema)
    except SchemaMissing:
        table = None
    if table is not None:
        target = table.schema
    elif configured_schema:
        cursor.execute("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s)", (configured_schema,))
        if not cursor.fetchone()[0]:
            raise MigrationError(f"database.schema: schema {configured_schema!r} does not exist; create it "
                                 "(CREATE SCHEMA) or leave database.schema unset")
        target = configured_schema
    else:
        cursor.execute(schema.CURRENT_SCHEMA_SQL)
        target = cursor.fetchone()[0]
        if target is None:
            raise MigrationError("the connection's search_path names no existing schema; set database.schema")
    cursor.execute("SELECT set_config('search_path', %s, false)", (f"{schema.quote_ident(target)}, public",))
    return table, target


def _series_rows(migrations, applied):
    rows = []
    for migration in migrations:
        row = applied.get(migration.version)
        rows.append((migration.filename, f"applied {row[3]:%Y-%m-%d %H:%M:%S%z}" if row else "pending"))
    known = {m.version for m in migrations}
    for version, row in applied.items():
        if version not in known:
            rows.append((f"{version}_{row[1]}.sql", "applied, but unknown to this version of attune-sensor"))
    return rows


def info(url, connect_timeout=5.0, configured_schema=None):
    """[(what, state)] lines: the table found, each spec migration (or the platform's summary),
    then each migration of attune-sensor's own schema and the daemon role."""
    conn = connect_blocking(url, connect_timeout)
    try:
        with conn.cursor() as cursor:
            table, target = _find_table(cursor, configured_schema)
            platform = table is not None and table.is_platform
            report = access.platform_report(cursor, table) if platform else []
            applied = {} if platform else _applied(cursor)
            own_applied = _applied(cursor, OWN_TABLE)
            role = access.role_state(cursor)
        conn.rollback()
    finally:
        conn.close()
    own = own_available()
    _check_unchanged(own, own_applied)
    if platform:
        return ([("database", table.describe())] + report
                + [(f"own/{name}", state) for name, state in _series_rows(own, own_applied)]
                + [("daemon role", role)])
    migrations = available()
    _check_unchanged(migrations, applied)
    found = table.describe() if table else f"no worker table yet; migrate run creates the spec's schema in {target}"
    return ([("database", found)] + _series_rows(migrations, applied)
            + [(f"own/{name}", state) for name, state in _series_rows(own, own_applied)]
            + [("daemon role", role)])


def _create_bookkeeping(cursor, url, table=TABLE):
    # Only when missing: even IF NOT EXISTS needs CREATE rights, which daemon roles lack.
    try:
        if table == OWN_TABLE:
            cursor.execute("CREATE SCHEMA IF NOT EXISTS attune_sensor")
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {table} (version BIGINT PRIMARY KEY, name TEXT NOT NULL, "
            "checksum TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
    except psycopg2.Error as exc:
        raise MigrationError(f"cannot create the table {table}: {scrub(exc.pgerror or exc, url)}") from None


def run(url, connect_timeout=5.0, log=print, warn=print, configured_schema=None, tune_heartbeats=False):
    """Applies pending migrations: the spec series (spec flavour only), then attune-sensor's own
    schema (both flavours), then the daemon role's grants. Returns the filenames applied. `warn`
    gets what a DBA must do by hand."""
    conn = connect_blocking(url, connect_timeout)
    done = []
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
            try:
                table, _ = _find_table(cursor, configured_schema)
                if table is not None and table.is_platform:
                    log(f"{table.describe()}: attune-sensor adds no tables or indexes there")
                    if tune_heartbeats:
                        try:
                            for line in access.tune_heartbeats(cursor, table):
                                log(line)
                        except psycopg2.Error as exc:
                            raise MigrationError("--tune-heartbeats failed: " + scrub(exc.pgerror or exc, url)) from None
                else:
                    if tune_heartbeats:
                        log("--tune-heartbeats: the spec's schema is tuned by its migrations already")
                    done = _apply(conn, cursor, url, log, available(), TABLE)
                    table, _ = _find_table(cursor, configured_schema)
                done += [f"own/{name}" for name in _apply(conn, cursor, url, log, own_available(), OWN_TABLE, "own/")]
                done += _repair(conn, cursor, url, log)
                conn.autocommit = False
                try:
                    for line in access.grant_daemon_role(cursor, table):
                        warn(line)
                    conn.commit()
                except psycopg2.Error as exc:
                    conn.rollback()
                    raise MigrationError("the daemon role's grants failed and were rolled back: "
                                         + scrub(exc.pgerror or exc, url)) from None
            finally:
                conn.rollback()
                conn.autocommit = True
                cursor.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    finally:
        conn.close()
    return done


# What repair.sql restores, and how to tell it is missing.
REPAIRED = {
    "attune_sensor.worker_load": "SELECT to_regclass('attune_sensor.worker_load') IS NULL",
    "trigger count_worker_load": "SELECT NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'count_worker_load' "
                                 "AND tgrelid = 'attune_sensor.assignment'::regclass)",
    "attune_sensor.reaper_gate's row": "SELECT NOT EXISTS (SELECT 1 FROM attune_sensor.reaper_gate)",
    "attune_sensor.fleet_gauges' row": "SELECT NOT EXISTS (SELECT 1 FROM attune_sensor.fleet_gauges)",
}


def _repair(conn, cursor, url, log):
    """Restores what attune-sensor derives if someone dropped it; returns what was restored."""
    missing = []
    for what, sql in REPAIRED.items():
        cursor.execute(sql)
        if cursor.fetchone()[0]:
            missing.append(what)
    if not missing:
        return []
    try:
        conn.autocommit = False
        cursor.execute((resources.files(__package__) / OWN_FOLDER / "repair.sql").read_text(encoding="utf-8"))
        conn.commit()
    except psycopg2.Error as exc:
        conn.rollback()
        raise MigrationError("repairing attune-sensor's own schema failed and was rolled back: "
                             + scrub(exc.pgerror or exc, url)) from None
    finally:
        conn.autocommit = True
    for what in missing:
        log(f"repaired {what} (it was missing)")
    return [f"repaired {what}" for what in missing]


def _apply(conn, cursor, url, log, migrations, table, shown=""):
    """Applies the pending ones of `migrations`, each in its own transaction with its row in
    `table`; returns their filenames. A failure names what was applied before it."""
    applied = _applied(cursor, table)
    if not applied:
        _create_bookkeeping(cursor, url, table)
    _check_unchanged(migrations, applied)
    conn.autocommit = False
    done = []
    for migration in migrations:
        if migration.version in applied:
            continue
        try:
            cursor.execute(migration.sql)
            cursor.execute(
                f"INSERT INTO {table} (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            conn.commit()
        except Exception as exc:
            conn.rollback()
            detail = getattr(exc, "pgerror", None) or str(exc)
            before = (f"{', '.join(shown + d for d in done)} applied before it stay applied"
                      if done else "nothing else of this run was undone")
            raise MigrationError(
                f"migration {shown}{migration.filename} failed and was rolled back ({before}): "
                + scrub(detail, url)
            ) from None
        done.append(migration.filename)
        log(f"applied {shown}{migration.filename}")
    conn.autocommit = True
    return done
