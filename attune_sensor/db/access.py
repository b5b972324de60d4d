"""The daemon's group role and its grants, and the opt-in heartbeat tuning of a platform table.

`migrate run` calls grant_daemon_role() every time, on both flavours: grants are idempotent, so
a role a DBA creates later gets what it needs on the next run, and a platform upgrade that
recreates a table is mended the same way. A migrating role without CREATEROLE cannot create the
group role: RoleNotMade carries the one statement a DBA runs, and `migrate run` fails with it.
What is granted is one list (daemon_grants), used to grant, to list (`migrate info`) and to say
it; `migrate uninstall` revokes whatever the role holds (role_privileges).
"""

from .schema import quote_ident

ROLE = "attune_sensor_daemon"
TUNED_FILLFACTOR = 70

ROLE_SQL = """
SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %(role)s),
       EXISTS (SELECT 1 FROM pg_roles WHERE rolname = current_user AND (rolcreaterole OR rolsuper)),
       current_user::text,
       (SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid
         WHERE r.rolname = %(role)s)
"""

HEARTBEAT_INDEXES_SQL = """
SELECT i.relname::text
  FROM pg_index x
  JOIN pg_class i ON i.oid = x.indexrelid
 WHERE x.indrelid = %(table)s::regclass
   AND EXISTS (SELECT 1 FROM pg_attribute a
                WHERE a.attrelid = x.indrelid AND a.attnum = ANY (x.indkey) AND a.attname = 'last_heartbeat')
 ORDER BY 1
"""

FILLFACTOR_SQL = """
SELECT coalesce((SELECT split_part(o, '=', 2)::int FROM unnest(c.reloptions) AS o WHERE o LIKE 'fillfactor=%%'), 100)
  FROM pg_class c WHERE c.oid = %(table)s::regclass
"""


def _worker(table):
    return f"{quote_ident(table.schema)}.worker"


def role_state(cursor):
    cursor.execute(ROLE_SQL, {"role": ROLE})
    exists, _, _, members = cursor.fetchone()
    if not exists:
        return f"{ROLE} missing: 'attune-sensor migrate run' creates it (needs CREATEROLE)"
    return f"{ROLE} present, {members} member role(s)"


# What the daemon role may do on attune-sensor's own tables (made by migrations/own/): least
# privilege, from the SQL the daemon runs. DELETE only where the daemon itself deletes: the load
# index's rows of workers gone (scheduler.SYNC_SQL) and its own sensor reports
# (runner/report.py). Assignments are never deleted by a daemon, only by `unplace`, an
# operator's command run as the schema owner (or a role granted DELETE on it).
OWN_GRANTS = {
    "attune_sensor.schema_migrations": "SELECT",
    "attune_sensor.reaper_gate": "SELECT, UPDATE",
    # (never a placement's `origin`: the trigger guard_origin, own migration 20261201000005)
    "attune_sensor.assignment": "SELECT, INSERT, UPDATE",
    "attune_sensor.worker_load": "SELECT, INSERT, UPDATE, DELETE",
    "attune_sensor.fleet_gauges": "SELECT, UPDATE",
    "attune_sensor.sensor_run": "SELECT, INSERT, UPDATE, DELETE",
    "attune_sensor.sync_gate": "SELECT, UPDATE",
    "attune_sensor.walk_start": "SELECT, INSERT, UPDATE",
}
# The platform's tables the sync pass reads: its runnable sensors (platform/sensors.py).
PLATFORM_SENSOR_TABLES = ("sensor", "trigger", "rule", "runtime", "runtime_version")
# What earlier versions granted and this one takes back on every run.
OWN_REVOKES = {"attune_sensor.assignment": "DELETE"}


def _exists(cursor, relation):
    cursor.execute("SELECT to_regclass(%s)", (relation,))
    return cursor.fetchone()[0] is not None


def daemon_grants(cursor, table):
    """[(privileges, object)]: what `migrate run` grants attune_sensor_daemon on this database, as
    GRANT ... ON <object> reads it. One list for granting, for `migrate info` and for saying
    it, so what is said is what is done. `table` None: no worker table yet (the spec's is made
    by the migrations before the grants)."""
    grants = []
    if table is not None:
        schema_name = quote_ident(table.schema)
        worker = _worker(table)
        grants.append(("USAGE", f"SCHEMA {schema_name}"))
        grants.append(("SELECT, INSERT, UPDATE", worker))
        cursor.execute("SELECT pg_get_serial_sequence(%s, 'id')", (worker,))
        sequence = cursor.fetchone()[0]
        if sequence:
            grants.append(("USAGE", f"SEQUENCE {sequence}"))
        if table.has_history:  # the platform's trigger writes it as the daemon's role
            grants.append(("INSERT", f"{schema_name}.worker_history"))
        if _exists(cursor, f"{schema_name}.sensor") and _exists(cursor, f"{schema_name}.sensor_process"):
            # the platform's record of sensor processes, which the runner keeps (runner/report.py)
            grants.append(("SELECT", f"{schema_name}.sensor"))
            grants.append(("SELECT, INSERT, UPDATE", f"{schema_name}.sensor_process"))
            cursor.execute("SELECT pg_get_serial_sequence(%s, 'id')", (f"{schema_name}.sensor_process",))
            sequence = cursor.fetchone()[0]
            if sequence:
                grants.append(("USAGE", f"SEQUENCE {sequence}"))
        readable = [name for name in PLATFORM_SENSOR_TABLES[1:] if _exists(cursor, f"{schema_name}.{name}")]
        if len(readable) == len(PLATFORM_SENSOR_TABLES) - 1 and _exists(cursor, f"{schema_name}.sensor"):
            # what the platform wants run, for the sync pass (platform/sensors.py)
            grants += [("SELECT", f"{schema_name}.{name}") for name in PLATFORM_SENSOR_TABLES
                       if ("SELECT", f"{schema_name}.{name}") not in grants]
        if _exists(cursor, f"{schema_name}.attune_sensor_migrations"):
            grants.append(("SELECT", f"{schema_name}.attune_sensor_migrations"))
    own = [name for name in OWN_GRANTS if _exists(cursor, name)]
    if own:
        grants.append(("USAGE", "SCHEMA attune_sensor"))
    grants += [(OWN_GRANTS[name], name) for name in own]
    if own:
        # every function of the own schema (the rule's, placement's, the heartbeat's, the sync
        # pass's): a DBA may have taken PUBLIC's default EXECUTE on new functions away
        grants.append(("EXECUTE", "ALL FUNCTIONS IN SCHEMA attune_sensor"))
    return grants


def describe_grants(grants):
    """One line: `GRANT` lists as an operator reads them."""
    return "; ".join(f"{privileges} on {target.replace(chr(34), '')}" for privileges, target in grants)


class RoleNotMade(Exception):
    """The group role does not exist and this role may not create it: the text says what a DBA runs."""


def grant_daemon_role(cursor, table):
    """Creates the role when allowed and grants it daemon_grants(). Returns what was granted.
    Raises RoleNotMade when the role is missing and the migrating role lacks CREATEROLE."""
    cursor.execute(ROLE_SQL, {"role": ROLE})
    exists, can_create, me, _ = cursor.fetchone()
    if not exists:
        if not can_create:
            raise RoleNotMade(
                f"role {ROLE} was not created: {me} lacks CREATEROLE. A DBA runs: CREATE ROLE {ROLE} NOLOGIN; "
                "then run 'attune-sensor migrate run' again to grant it what the daemon needs")
        cursor.execute(f"CREATE ROLE {ROLE} NOLOGIN")
    grants = daemon_grants(cursor, table)
    for name, privileges in OWN_REVOKES.items():
        if _exists(cursor, name):
            cursor.execute(f"REVOKE {privileges} ON {name} FROM {ROLE}")
    for privileges, target in grants:
        cursor.execute(f"GRANT {privileges} ON {target} TO {ROLE}")
    return grants


# Every privilege the role holds in this database, whoever granted it: what uninstall revokes.
ROLE_PRIVILEGES_SQL = """
WITH r AS (SELECT oid FROM pg_roles WHERE rolname = %(role)s)
SELECT CASE WHEN c.relkind = 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, format('%%I.%%I', n.nspname, c.relname)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, r
 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND EXISTS (SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = r.oid)
UNION
SELECT 'FUNCTION', format('%%I.%%I(%%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid))
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace, r
 WHERE EXISTS (SELECT 1 FROM aclexplode(p.proacl) a WHERE a.grantee = r.oid)
UNION
SELECT 'SCHEMA', quote_ident(n.nspname) FROM pg_namespace n, r
 WHERE EXISTS (SELECT 1 FROM aclexplode(n.nspacl) a WHERE a.grantee = r.oid)
UNION
SELECT 'DATABASE', quote_ident(d.datname) FROM pg_database d, r
 WHERE d.datname = current_database() AND EXISTS (SELECT 1 FROM aclexplode(d.datacl) a WHERE a.grantee = r.oid)
ORDER BY 1, 2
"""


def role_privileges(cursor):
    """[(kind, object)] on which attune_sensor_daemon holds a privilege in this database."""
    cursor.execute(ROLE_PRIVILEGES_SQL, {"role": ROLE})
    return [tuple(row) for row in cursor.fetchall()]


def role_members(cursor):
    """(exists, [member role names]) of attune_sensor_daemon."""
    cursor.execute("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %(role)s), "
                   "ARRAY(SELECT u.rolname::text FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid "
                   "JOIN pg_roles u ON u.oid = m.member WHERE r.rolname = %(role)s ORDER BY 1)", {"role": ROLE})
    exists, members = cursor.fetchone()
    return exists, list(members)


def heartbeat_tuning(cursor, table):
    """(indexes on last_heartbeat, fillfactor) of the worker table."""
    cursor.execute(HEARTBEAT_INDEXES_SQL, {"table": _worker(table)})
    indexes = [row[0] for row in cursor.fetchall()]
    cursor.execute(FILLFACTOR_SQL, {"table": _worker(table)})
    return indexes, cursor.fetchone()[0]


def platform_report(cursor, table):
    """`migrate info` on the platform's schema: what attune-sensor needs there, and the
    heartbeat tuning it recommends but never applies unasked."""
    indexes, fillfactor = heartbeat_tuning(cursor, table)
    if indexes:
        tuning = (f"recommended, opt-in: index(es) {', '.join(indexes)} on last_heartbeat make every heartbeat a "
                  f"non-HOT update (measured: 0 % HOT and the table +41 % after 1M heartbeats, against 100 % "
                  f"HOT and +0.5 % without; docs/performance.md). 'attune-sensor migrate run --tune-heartbeats' "
                  f"drops them and sets fillfactor={TUNED_FILLFACTOR}; queries that sort by last_heartbeat then "
                  "scan the table")
    else:
        tuning = f"applied: no index on last_heartbeat, fillfactor {fillfactor}"
    return [
        ("platform objects", f"none changed: attune-sensor adds no table, index, trigger or function to schema "
                             f"{table.schema} and alters none (the one exception is the opt-in "
                             "'migrate run --tune-heartbeats' below)"),
        ("daemon role", role_state(cursor)),
        ("heartbeat tuning", tuning),
    ]


def tune_heartbeats(cursor, table):
    """The operator's explicit opt-in on the platform's table. Returns what was done."""
    indexes, fillfactor = heartbeat_tuning(cursor, table)
    done = []
    for index in indexes:
        cursor.execute(f"DROP INDEX {quote_ident(table.schema)}.{quote_ident(index)}")
        done.append(f"dropped index {table.schema}.{index} (heartbeats become HOT updates)")
    if fillfactor > TUNED_FILLFACTOR:
        cursor.execute(f"ALTER TABLE {_worker(table)} SET (fillfactor = {TUNED_FILLFACTOR})")
        done.append(f"set fillfactor {TUNED_FILLFACTOR} on {table.schema}.worker (was {fillfactor})")
    return done or ["heartbeat tuning was applied already"]
