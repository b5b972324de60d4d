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
  (schema.own_schema_version()), so a new column always arrives through `migrate run`.

`migrate uninstall` takes back all of it: schema attune_sensor, the spec series' bookkeeping,
the daemon role's grants and the role itself (uninstall()); never an object of the platform's.
"""

import hashlib
from contextlib import contextmanager
import re
from dataclasses import dataclass
from importlib import resources

import psycopg2

from .. import access, schema
from .. import connect_blocking
from ...config.dsn import scrub
from ...errors import DatabasePermissionDenied, MigrationError, SchemaMissing

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

    @property
    def creates(self):
        """What the file makes, read from its SQL: "schema attune_sensor; table ...; ..."."""
        return "; ".join(f"{kind} {', '.join(names)}" for kind, names in self.objects().items())

    def objects(self):
        """{kind: [names]} the file creates ("alters table" for ALTER TABLE), in file order."""
        found = {}
        sql = re.sub(r"--[^\n]*", "", self.sql)
        for match in _OBJECT_RE.finditer(sql):
            kind, name = (match.group(1).lower(), match.group(2)) if match.group(1) else ("alters table", match.group(3))
            names = found.setdefault(kind, [])
            if name.strip('"') not in names:
                names.append(name.strip('"'))
        return found


_OBJECT_RE = re.compile(r"\bCREATE\s+(?:OR\s+REPLACE\s+)?(?:UNIQUE\s+)?(SCHEMA|TABLE|INDEX|FUNCTION|TRIGGER|TYPE|ROLE|VIEW)"
                        r"\s+(?:IF\s+NOT\s+EXISTS\s+)?([\w.\"]+)|\bALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?([\w.\"]+)",
                        re.IGNORECASE)


def available(folder=None):
    """The spec series (folder None) or the own series (OWN_FOLDER), in version order."""
    found = []
    root = resources.files(__package__)
    for entry in (root / folder if folder else root).iterdir():
        match = schema.MIGRATION_FILE_RE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


def own_available():
    return available(OWN_FOLDER)



# 'missing', 'denied' (there, but this role may not read it) or 'ok'. In this order: to_regclass of
# a name in a schema we may not use raises.
APPLIED_STATE_SQL = """
SELECT CASE WHEN %(table)s NOT LIKE 'attune_sensor.%%' THEN
                 CASE WHEN to_regclass(%(table)s) IS NULL THEN 'missing'
                      WHEN has_table_privilege(%(table)s, 'SELECT') THEN 'ok' ELSE 'denied' END
            WHEN to_regnamespace('attune_sensor') IS NULL THEN 'missing'
            WHEN NOT has_schema_privilege('attune_sensor', 'USAGE') THEN 'denied'
            WHEN to_regclass(%(table)s) IS NULL THEN 'missing'
            WHEN has_table_privilege(%(table)s, 'SELECT') THEN 'ok' ELSE 'denied' END,
       current_user::text, current_schema()
"""


def _applied(cursor, table=TABLE):
    cursor.execute(APPLIED_STATE_SQL, {"table": table})
    state, me, current = cursor.fetchone()
    if state == "denied":
        needs = ("USAGE on schema attune_sensor and SELECT on attune_sensor.schema_migrations" if table == OWN_TABLE
                 else f"SELECT on {current}.{table}")
        raise DatabasePermissionDenied(
            f"permission denied: role {me} needs {needs} to read which migrations are applied; members of "
            f"{access.ROLE} have it (GRANT {access.ROLE} TO {me}), or run this as the schema owner")
    if state == "missing":
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
    """(WorkerTable or None, the schema our objects go to, why a worker table that is there cannot
    be used yet or None). Sets the session's search_path to the schema."""
    unusable = None
    try:
        table = schema.discover(_Session(cursor), configured_schema)
    except SchemaMissing as exc:
        table = None
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL",
                       (f"{schema.quote_ident(configured_schema)}.worker" if configured_schema else "worker",))
        if cursor.fetchone()[0]:
            unusable = str(exc)  # a worker table from before the spec's roles (a legacy one)
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
    return table, target, unusable


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
            try:
                table, target, unusable = _find_table(cursor, configured_schema)
                platform = table is not None and table.is_platform
                report = access.platform_report(cursor, table) if platform else []
                applied = {} if platform else _applied(cursor)
                own_applied = _applied(cursor, OWN_TABLE)
                role = access.role_state(cursor)
                grants = access.describe_grants(access.daemon_grants(cursor, table))
            except psycopg2.errors.InsufficientPrivilege as exc:
                raise DatabasePermissionDenied(
                    f"permission denied: {' '.join(str(exc.pgerror or exc).split())} (migrate info reads it; members "
                    f"of {access.ROLE} may, or run it as the schema owner)") from None
        conn.rollback()
    finally:
        conn.close()
    own = own_available()
    _check_unchanged(own, own_applied)
    own_rows = [(f"own/{name}", state) for name, state in _series_rows(own, own_applied)]
    made = {"table": [OWN_TABLE]}
    for migration in own:
        for kind, names in migration.objects().items():
            if kind in ("schema", "table", "function"):
                made.setdefault(kind, []).extend(n for n in names if n not in made.get(kind, []))
    own_made = (f"schema {', '.join(made.get('schema', []))}: tables {', '.join(made['table'])}; functions "
                f"{', '.join(made.get('function', []))} (with their indexes and triggers; own/ lines above)")
    tail = [("own schema", own_made), ("daemon grants", grants or "(made once the tables exist)")]
    if platform:
        return [("database", table.describe())] + report + own_rows + tail + [("daemon role", role)]
    migrations = available()
    _check_unchanged(migrations, applied)
    if table:
        found = table.describe()
    elif unusable:
        found = (f"worker table {target}.worker is there but not the spec's yet ({unusable.split('; run')[0]}): "
                 f"migrate run upgrades it in place, keeping its rows")
    else:
        found = f"no worker table yet; migrate run creates the spec's schema in {target}"
    return ([("database", found)] + _series_rows(migrations, applied) + own_rows + tail
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


@contextmanager
def _locked(url, connect_timeout):
    """(conn, cursor) holding the migration lock: runners on several hosts take turns. The
    connection is left in autocommit, rolled back and closed at the end, whatever happened."""
    conn = connect_blocking(url, connect_timeout)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
            try:
                yield conn, cursor
            finally:
                conn.rollback()
                conn.autocommit = True
                cursor.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    finally:
        conn.close()


def run(url, connect_timeout=5.0, log=print, warn=print, configured_schema=None, tune_heartbeats=False):
    """Applies pending migrations: the spec series (spec flavour only), then attune-sensor's own
    schema (both flavours), then the daemon role's grants. Returns the filenames applied. `warn`
    gets what a DBA must do by hand."""
    done = []
    role_missing = None
    with _locked(url, connect_timeout) as (conn, cursor):
        table, _, _ = _find_table(cursor, configured_schema)
        if table is not None and table.is_platform:
            log(f"{table.describe()}: attune-sensor adds no table, index, trigger or function to the "
                f"platform's schema and alters none of its objects; its own go to schema attune_sensor "
                f"(own/ migrations), and attune_sensor_daemon is granted what the daemon needs")
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
            table, _, _ = _find_table(cursor, configured_schema)
        done += [f"own/{name}" for name in _apply(conn, cursor, url, log, own_available(), OWN_TABLE, "own/",
                                                   earlier=done)]
        done += _repair(conn, cursor, url, log)
        conn.autocommit = False
        try:
            del conn.notices[:]
            grants = access.grant_daemon_role(cursor, table)
            conn.commit()
            refused = [n for n in conn.notices if "privileges were granted" in n or "could be revoked" in n]
            if refused:
                log(f"grants of {access.ROLE} left as they are: {_current_user(cursor)} may not grant "
                    "them (run 'attune-sensor migrate run' as the schema owner)")
            else:
                log(f"granted {access.ROLE}: {access.describe_grants(grants)}")
        except access.RoleNotMade as exc:
            conn.rollback()
            role_missing = str(exc)
        except psycopg2.Error as exc:
            conn.rollback()
            raise MigrationError("the daemon role's grants failed and were rolled back ("
                                 + _kept(done) + "): " + scrub(exc.pgerror or exc, url)) from None
    if role_missing:
        # everything else is done; without the role no daemon may run (exit non-zero)
        raise MigrationError(f"{role_missing} ({_kept(done)})")
    return done


def _kept(done):
    return f"applied in this run and kept: {', '.join(done)}" if done else "nothing else was applied in this run"


def _current_user(cursor):
    cursor.execute("SELECT current_user::text")
    return cursor.fetchone()[0]


# What repair.sql restores, and how to tell it is missing.
REPAIRED = {
    "attune_sensor.worker_load": "SELECT to_regclass('attune_sensor.worker_load') IS NULL",
    "trigger count_worker_load": "SELECT NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'count_worker_load' "
                                 "AND tgrelid = 'attune_sensor.assignment'::regclass)",
    "attune_sensor.reaper_gate's row": "SELECT NOT EXISTS (SELECT 1 FROM attune_sensor.reaper_gate)",
    "attune_sensor.fleet_gauges' row": "SELECT NOT EXISTS (SELECT 1 FROM attune_sensor.fleet_gauges)",
    "attune_sensor.sync_gate's row": "SELECT NOT EXISTS (SELECT 1 FROM attune_sensor.sync_gate)",
    "index worker_load_walk": "SELECT to_regclass('attune_sensor.worker_load_walk') IS NULL",
    "index assignment_by_worker": "SELECT to_regclass('attune_sensor.assignment_by_worker') IS NULL",
    "index assignment_pending": "SELECT to_regclass('attune_sensor.assignment_pending') IS NULL",
    "index assignment_handover": "SELECT to_regclass('attune_sensor.assignment_handover') IS NULL",
}
# An own migration whose first line is this may be applied again whole (CREATE OR REPLACE, IF
# NOT EXISTS, DROP ... IF EXISTS before a trigger): `migrate run` does so when one of the
# functions, indexes or triggers it makes is gone,
# instead of a copy of them in repair.sql.
IDEMPOTENT_MARK = "-- idempotent:"
_OWN_OBJECT_MISSING = """
SELECT NOT EXISTS (SELECT 1 FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
                    WHERE n.nspname = 'attune_sensor' AND format('%%I.%%I', n.nspname, p.proname) = %(name)s)
"""
_OWN_RELATION_MISSING = "SELECT to_regclass(CASE WHEN %(name)s LIKE 'attune_sensor.%%' THEN %(name)s " \
                        "ELSE 'attune_sensor.' || %(name)s END) IS NULL"
_OWN_TRIGGER_MISSING = """
SELECT NOT EXISTS (SELECT 1 FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
                   JOIN pg_namespace AS n ON n.oid = c.relnamespace
                    WHERE n.nspname = 'attune_sensor' AND t.tgname = %(name)s)
"""


def _missing_made(cursor, migration):
    """The functions, tables, indexes and triggers an idempotent own migration makes that are not
    there."""
    made = migration.objects()
    missing = []
    for name in made.get("function", []):
        cursor.execute(_OWN_OBJECT_MISSING, {"name": name})
        if cursor.fetchone()[0]:
            missing.append(f"function {name}")
    for kind, sql in (("table", _OWN_RELATION_MISSING), ("index", _OWN_RELATION_MISSING),
                      ("trigger", _OWN_TRIGGER_MISSING)):
        for name in made.get(kind, []):
            cursor.execute(sql, {"name": name})
            if cursor.fetchone()[0]:
                missing.append(f"{kind} {name}")
    return missing


def _repair(conn, cursor, url, log):
    """Restores what attune-sensor derives if someone dropped it; returns what was restored."""
    restored = []
    missing = []
    for what, sql in REPAIRED.items():
        cursor.execute(sql)
        if cursor.fetchone()[0]:
            missing.append(what)
    if missing:  # first: the tables the functions' files may index
        _run_repair(conn, cursor, url,
                    (resources.files(__package__) / OWN_FOLDER / "repair.sql").read_text(encoding="utf-8"))
        for what in missing:
            log(f"repaired {what} (it was missing)")
        restored += [f"repaired {what}" for what in missing]
    reapplied = False
    for migration in own_available():
        if not migration.sql.startswith(IDEMPOTENT_MARK):
            continue
        gone = _missing_made(cursor, migration)
        # once one file is applied again, so is every later one: a later file may redefine what
        # an earlier one makes (migration 6 redefines place_sensor), and the newest must win
        if gone or reapplied:
            _run_repair(conn, cursor, url, migration.sql)
            reapplied = True
            for what in gone:
                log(f"repaired {what} (it was missing)")
            restored += [f"repaired {what}" for what in gone]
    return restored


def _run_repair(conn, cursor, url, sql):
    try:
        conn.autocommit = False
        cursor.execute(sql)
        conn.commit()
    except psycopg2.Error as exc:
        conn.rollback()
        raise MigrationError("repairing attune-sensor's own schema failed and was rolled back: "
                             + scrub(exc.pgerror or exc, url)) from None
    finally:
        conn.autocommit = True


def _apply(conn, cursor, url, log, migrations, table, shown="", earlier=()):
    """Applies the pending ones of `migrations`, each in its own transaction with its row in
    `table`; returns their filenames. A failure names what was applied before it: in this run
    (`earlier`: the series before this one), and before this run."""
    applied = _applied(cursor, table)
    if not applied:
        _create_bookkeeping(cursor, url, table)
    _check_unchanged(migrations, applied)
    migrations_by_version = {m.version: m.filename for m in migrations}
    migrations_by_version.update({v: f"{v}_{row[1]}.sql" for v, row in applied.items()
                                  if v not in migrations_by_version})
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
            detail = " ".join((getattr(exc, "pgerror", None) or str(exc)).split())
            before_run = (f"{shown}{migrations_by_version[max(applied)]}" if applied else "none")
            raise MigrationError(
                f"migration {shown}{migration.filename} failed and was rolled back ("
                + _kept(list(earlier) + [shown + d for d in done])
                + f"; applied before this run, last: {before_run}): " + scrub(detail, url)
            ) from None
        done.append(migration.filename)
        log(f"applied {shown}{migration.filename} ({migration.creates})")
    conn.autocommit = True
    return done


# What is in attune-sensor's own schema, to be dropped one by one (RESTRICT): an object outside it
# that depends on one of them stops the removal instead of going with it. Sequences owned by a
# column go with their table.
OWN_OBJECTS_SQL = """
SELECT CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE'
                      WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END, format('attune_sensor.%I', c.relname)
  FROM pg_class c
 WHERE c.relnamespace = 'attune_sensor'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                      AND d.deptype IN ('a', 'i'))
UNION ALL
SELECT 'FUNCTION', format('attune_sensor.%I(%s)', p.proname, pg_get_function_identity_arguments(p.oid))
  FROM pg_proc p WHERE p.pronamespace = 'attune_sensor'::regnamespace
"""

# Workers that still run an attune-sensor daemon: its rows carry meta.instance_id, and are live.
LIVE_DAEMONS_SQL = """
SELECT w.name::text FROM {worker} AS w
 WHERE w.status::text = 'active' AND w.meta ? 'instance_id' AND NOT {stale}
 ORDER BY 1 LIMIT 20
"""


def uninstall(url, connect_timeout=5.0, configured_schema=None, yes=False, drop_role=False, log=print, warn=print):
    """`migrate uninstall`: says what attune-sensor made in this database and, with `yes`, removes
    it in one transaction: schema attune_sensor (each object, RESTRICT), the spec series'
    bookkeeping, every privilege of attune_sensor_daemon here, and the role when it has no
    members (or `drop_role`). Never an object of the platform's (or the spec's shared worker
    schema). Returns what was removed; MigrationError (nothing removed) without `yes`, while a
    daemon still runs, or when PostgreSQL refuses a step."""
    with _locked(url, connect_timeout) as (conn, cursor):
        return _uninstall(conn, cursor, url, configured_schema, yes, drop_role, log, warn)


def _uninstall(conn, cursor, url, configured_schema, yes, drop_role, log, warn):
    table, target, _ = _find_table(cursor, configured_schema)
    steps = []  # (what is said, SQL)
    own = []
    cursor.execute("SELECT to_regnamespace('attune_sensor') IS NOT NULL")
    if cursor.fetchone()[0]:
        cursor.execute(OWN_OBJECTS_SQL)
        order = ["VIEW", "MATERIALIZED VIEW", "TABLE", "FOREIGN TABLE", "SEQUENCE", "FUNCTION"]  # dependants first
        own = sorted((tuple(row) for row in cursor.fetchall()), key=lambda o: (order.index(o[0]), o[1]))
        for kind, name in own:
            rows = ""
            if kind == "TABLE":
                cursor.execute(f"SELECT count(*) FROM {name}")
                rows = f" ({cursor.fetchone()[0]} rows)"
            steps.append((f"{kind.lower()} {name}{rows}", f"DROP {kind} {name} RESTRICT"))
        steps.append(("schema attune_sensor", "DROP SCHEMA attune_sensor RESTRICT"))
    bookkeeping = f"{schema.quote_ident(target)}.{TABLE}"
    cursor.execute("SELECT format('%%I.%%I', %s::text, %s::text)", (target, TABLE))
    bookkeeping_name = cursor.fetchone()[0]  # as access.role_privileges() names it
    if (table is None or not table.is_platform) and access._exists(cursor, bookkeeping):
        steps.append((f"table {target}.{TABLE} (the spec series' bookkeeping; the spec's schema it describes stays, "
                       "and a later 'migrate run' adopts it again)", f"DROP TABLE {bookkeeping} RESTRICT"))
    dropped = {"attune_sensor"} | {name for _, name in own} | ({bookkeeping_name} if steps and
                                                                 steps[-1][1].endswith(f"{TABLE} RESTRICT") else set())
    privileges = [(kind, name) for kind, name in access.role_privileges(cursor) if name not in dropped]
    for kind, name in privileges:
        steps.append((f"{access.ROLE}'s privileges on {kind.lower()} {name}",
                      f"REVOKE ALL ON {kind} {name} FROM {access.ROLE}"))
    exists, members = access.role_members(cursor)
    role_step = None
    if exists and (not members or drop_role):
        shown = f" (its members {', '.join(members)} lose it)" if members else ""
        role_step = (f"role {access.ROLE}{shown}", f"DROP ROLE {access.ROLE}")
    if table is not None:
        cursor.execute(LIVE_DAEMONS_SQL.format(worker=f"{schema.quote_ident(table.schema)}.worker",
                                               stale=schema.stale_condition("w", "3")))
        live = [row[0] for row in cursor.fetchall()]
        if live:
            raise MigrationError(f"attune-sensor daemons still run against this database ({', '.join(live)}): "
                                 "stop them first; nothing was removed")
    if not steps and not role_step:
        log("attune-sensor has no objects in this database: nothing to remove")
        return []
    log("migrate uninstall removes:")
    for what, _ in steps + ([role_step] if role_step else []):
        log(f"  {what}")
    kept = ["the platform's schema and every object in it (only the role's privileges above are revoked)"
            if table is not None and table.is_platform else
            f"the spec's worker schema in {target} (worker, runtime, their types, indexes, triggers and functions): "
            "other Attune workers share it" if table is not None else None]
    if exists and not role_step:
        kept.append(f"role {access.ROLE}: it has member roles ({', '.join(members)}); --drop-role drops it anyway")
    if table is not None and table.is_platform and not access.heartbeat_tuning(cursor, table)[0]:
        kept.append("the heartbeat tuning of the platform's worker table, if 'migrate run --tune-heartbeats' made it "
                    "(its index on last_heartbeat comes back from the platform's migration)")
    for line in filter(None, kept):
        log(f"  kept: {line}")
    if not yes:
        raise MigrationError("nothing was removed: run 'attune-sensor migrate uninstall --yes' to remove the above")
    conn.autocommit = False
    try:
        for _, sql in steps:
            cursor.execute(sql)
        removed = [what for what, _ in steps]
        if role_step:
            cursor.execute("SAVEPOINT role")
            try:
                cursor.execute(role_step[1])
                removed.append(role_step[0])
            except psycopg2.Error as exc:
                cursor.execute("ROLLBACK TO SAVEPOINT role")
                warn(f"kept role {access.ROLE}: " + " ".join(scrub(exc.pgerror or exc, url).split()))
        conn.commit()
    except psycopg2.Error as exc:
        conn.rollback()
        raise MigrationError("nothing was removed (rolled back): " + " ".join(scrub(exc.pgerror or exc, url).split())) \
            from None
    finally:
        conn.autocommit = True
    for what in removed:
        log(f"removed {what}")
    return removed
