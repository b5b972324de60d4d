"""Versioned SQL migrations and their runner (`attune-sensor migrate run|info`).

Files are named <version>_<name>.sql and are never edited after release: the runner stores each
file's SHA-256 and refuses to go on when an applied file has changed. Each migration runs in its
own transaction together with its bookkeeping row; a session-level advisory lock makes two
hosts running `migrate run` at once take turns.
"""

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import psycopg2

from ..db import connect_blocking, scrub
from ..errors import MigrationError

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


def info(url, connect_timeout=5.0):
    """[(filename, 'applied at ...' | 'pending')] in version order."""
    conn = connect_blocking(url, connect_timeout)
    try:
        with conn.cursor() as cursor:
            applied = _applied(cursor)
        conn.rollback()
    finally:
        conn.close()
    migrations = available()
    _check_unchanged(migrations, applied)
    rows = []
    for migration in migrations:
        row = applied.get(migration.version)
        rows.append((migration.filename, f"applied {row[3]:%Y-%m-%d %H:%M:%S%z}" if row else "pending"))
    known = {m.version for m in migrations}
    for version, row in applied.items():
        if version not in known:
            rows.append((f"{version}_{row[1]}.sql", "applied, but unknown to this version of attune-sensor"))
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


def run(url, connect_timeout=5.0, log=print):
    """Applies pending migrations; returns the filenames applied."""
    conn = connect_blocking(url, connect_timeout)
    done = []
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
            try:
                migrations = available()
                applied = _applied(cursor)
                if not applied:
                    _create_bookkeeping(cursor, url)
                _check_unchanged(migrations, applied)
                conn.autocommit = False
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
            finally:
                conn.rollback()
                conn.autocommit = True
                cursor.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    finally:
        conn.close()
    return done
