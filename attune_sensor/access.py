"""The daemon's group role and its grants, and the opt-in heartbeat tuning of a platform table.

`migrate run` calls grant_daemon_role() every time, on both flavours: grants are idempotent, so
a role a DBA creates later gets what it needs on the next run, and a platform upgrade that
recreates a table is mended the same way. A migrating role without CREATEROLE cannot create the
group role: the operator is told, on the terminal, the one statement a DBA runs.
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


# What the daemon role may do on attune-sensor's own tables (made by migrations/own/).
OWN_GRANTS = {
    "attune_sensor.schema_migrations": "SELECT",
    "attune_sensor.reaper_gate": "SELECT, UPDATE",
    "attune_sensor.assignment": "SELECT, INSERT, UPDATE, DELETE",
    "attune_sensor.worker_load": "SELECT, INSERT, UPDATE, DELETE",
    "attune_sensor.fleet_gauges": "SELECT, UPDATE",
    "attune_sensor.sensor_run": "SELECT, INSERT, UPDATE, DELETE",
}


def _exists(cursor, relation):
    cursor.execute("SELECT to_regclass(%s)", (relation,))
    return cursor.fetchone()[0] is not None


def grant_daemon_role(cursor, table):
    """Creates the role when allowed and grants it what the daemon needs on `table`: schema
    USAGE, SELECT/INSERT/UPDATE on worker and its id sequence, INSERT on the platform's
    worker_history (its trigger writes there as the daemon's role). Returns warnings for the
    operator (empty when all was done)."""
    cursor.execute(ROLE_SQL, {"role": ROLE})
    exists, can_create, me, _ = cursor.fetchone()
    if not exists:
        if not can_create:
            return [f"warning: role {ROLE} was not created: {me} lacks CREATEROLE. A DBA runs: "
                    f"CREATE ROLE {ROLE} NOLOGIN; then run 'attune-sensor migrate run' again to grant it "
                    "what the daemon needs"]
        cursor.execute(f"CREATE ROLE {ROLE} NOLOGIN")
    worker = _worker(table)
    cursor.execute(f"GRANT USAGE ON SCHEMA {quote_ident(table.schema)} TO {ROLE}")
    cursor.execute(f"GRANT SELECT, INSERT, UPDATE ON {worker} TO {ROLE}")
    cursor.execute("SELECT pg_get_serial_sequence(%s, 'id')", (worker,))
    sequence = cursor.fetchone()[0]
    if sequence:
        cursor.execute(f"GRANT USAGE ON SEQUENCE {sequence} TO {ROLE}")
    if table.has_history:
        cursor.execute(f"GRANT INSERT ON {quote_ident(table.schema)}.worker_history TO {ROLE}")
    platform_schema = quote_ident(table.schema)
    if _exists(cursor, f"{platform_schema}.sensor") and _exists(cursor, f"{platform_schema}.sensor_process"):
        # the platform's record of sensor processes, which the runner keeps (runner/report.py)
        cursor.execute(f"GRANT SELECT ON {platform_schema}.sensor TO {ROLE}")
        cursor.execute(f"GRANT SELECT, INSERT, UPDATE ON {platform_schema}.sensor_process TO {ROLE}")
        cursor.execute("SELECT pg_get_serial_sequence(%s, 'id')", (f"{platform_schema}.sensor_process",))
        sequence = cursor.fetchone()[0]
        if sequence:
            cursor.execute(f"GRANT USAGE ON SEQUENCE {sequence} TO {ROLE}")
    own = [name for name in OWN_GRANTS if _exists(cursor, name)]
    if own:
        cursor.execute(f"GRANT USAGE ON SCHEMA attune_sensor TO {ROLE}")
    for name in own:
        cursor.execute(f"GRANT {OWN_GRANTS[name]} ON {name} TO {ROLE}")
    if _exists(cursor, f"{quote_ident(table.schema)}.attune_sensor_migrations"):
        cursor.execute(f"GRANT SELECT ON {quote_ident(table.schema)}.attune_sensor_migrations TO {ROLE}")
    return []


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
        ("migrations", "none: the worker table is the platform's, attune-sensor changes none of its objects"),
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
