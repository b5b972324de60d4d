"""Versioned SQL migrations and their runner (`attune-sensor migrate run|info`).

Files are named <version>_<name>.sql and are never edited after release: the runner stores each
file's SHA-256 and refuses to go on when an applied file has changed. Each migration runs in its
own transaction together with its bookkeeping row; a session-level advisory lock makes two
hosts running `migrate run` at once take turns.

The files build and tune the spec's schema. On the Attune platform's schema (schema.py) none of
them runs: the table belongs to the platform, and attune-sensor only grants its daemon role what
it needs there (access.py). Tuning the platform's table for HOT heartbeats is the operator's
explicit choice (`migrate run --tune-heartbeats`).
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
TABLE = "attune_sensor_migrations"


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


def available():
    found = []
    for entry in resources.files(__package__).iterdir():
        match = FILE_RE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


def _applied(cursor):
    cursor.execute(f"SELECT to_regclass('{TABLE}') IS NOT NULL")
    if not cursor.fetchone()[0]:
        return {}
    cursor.execute(f"SELECT version, name, checksum, applied_at FROM {TABLE} ORDER BY version")
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


def info(url, connect_timeout=5.0, configured_schema=None):
    """[(what, state)] lines: the table found, then each migration (or the platform's summary)."""
    conn = connect_blocking(url, connect_timeout)
    try:
        with conn.cursor() as cursor:
            table, target = _find_table(cursor, configured_schema)
            if table is not None and table.is_platform:
                rows = [("database", table.describe())] + access.platform_report(cursor, table)
                conn.rollback()
                return rows
            applied = _applied(cursor)
            role = access.role_state(cursor)
        conn.rollback()
    finally:
        conn.close()
    migrations = available()
    _check_unchanged(migrations, applied)
    found = table.describe() if table else f"no worker table yet; migrate run creates the spec's schema in {target}"
    rows = [("database", found)]
    for migration in migrations:
        row = applied.get(migration.version)
        rows.append((migration.filename, f"applied {row[3]:%Y-%m-%d %H:%M:%S%z}" if row else "pending"))
    known = {m.version for m in migrations}
    for version, row in applied.items():
        if version not in known:
            rows.append((f"{version}_{row[1]}.sql", "applied, but unknown to this version of attune-sensor"))
    rows.append(("daemon role", role))
    return rows


def _create_bookkeeping(cursor, url):
    # Only when missing: even IF NOT EXISTS needs CREATE rights, which daemon roles lack.
    try:
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (version BIGINT PRIMARY KEY, name TEXT NOT NULL, "
            "checksum TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
    except psycopg2.Error as exc:
        raise MigrationError(f"cannot create the table {TABLE}: {scrub(exc.pgerror or exc, url)}") from None


def run(url, connect_timeout=5.0, log=print, warn=print, configured_schema=None, tune_heartbeats=False):
    """Applies pending migrations (spec flavour) and the daemon role's grants (both flavours);
    returns the filenames applied. `warn` gets what a DBA must do by hand."""
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
                    done = _apply(conn, cursor, url, log)
                    table, _ = _find_table(cursor, configured_schema)
                conn.autocommit = False
                try:
                    access.ensure_own_objects(cursor)
                    for line in access.grant_daemon_role(cursor, table):
                        warn(line)
                    conn.commit()
                except psycopg2.Error as exc:
                    conn.rollback()
                    raise MigrationError("attune-sensor's own tables or the daemon role's grants failed and were "
                                         "rolled back: "
                                         + scrub(exc.pgerror or exc, url)) from None
            finally:
                conn.rollback()
                conn.autocommit = True
                cursor.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    finally:
        conn.close()
    return done


def _apply(conn, cursor, url, log):
    migrations = available()
    applied = _applied(cursor)
    if not applied:
        _create_bookkeeping(cursor, url)
    _check_unchanged(migrations, applied)
    conn.autocommit = False
    done = []
    for migration in migrations:
        if migration.version in applied:
            continue
        try:
            cursor.execute(migration.sql)
            cursor.execute(
                f"INSERT INTO {TABLE} (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            conn.commit()
        except Exception as exc:
            conn.rollback()
            detail = getattr(exc, "pgerror", None) or str(exc)
            raise MigrationError(
                f"migration {migration.filename} failed and was rolled back, nothing changed: "
                + scrub(detail, url)
            ) from None
        done.append(migration.filename)
        log(f"applied {migration.filename}")
    conn.autocommit = True
    return done
