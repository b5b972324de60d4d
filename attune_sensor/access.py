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


# attune-sensor's own schema: the same on both flavours, never the platform's. Each object is
# created only when missing (even IF NOT EXISTS needs CREATE rights a daemon role lacks).
OWN_OBJECTS = {
    "attune_sensor.reaper_gate": """
CREATE SCHEMA IF NOT EXISTS attune_sensor;
CREATE TABLE IF NOT EXISTS attune_sensor.reaper_gate (
    only_row BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_row),
    last_scan TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    scanned_by TEXT
);
INSERT INTO attune_sensor.reaper_gate DEFAULT VALUES ON CONFLICT DO NOTHING;
""",
    "attune_sensor.assignment": """
CREATE SCHEMA IF NOT EXISTS attune_sensor;
CREATE TABLE IF NOT EXISTS attune_sensor.assignment (
    sensor_ref TEXT PRIMARY KEY CHECK (length(sensor_ref) BETWEEN 1 AND 255),
    runtime TEXT NOT NULL,
    selector JSONB NOT NULL DEFAULT '{}',
    tolerations JSONB NOT NULL DEFAULT '[]',
    worker_id BIGINT,
    assigned_at TIMESTAMPTZ,
    created TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS assignment_by_worker ON attune_sensor.assignment (worker_id) WHERE worker_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS assignment_pending ON attune_sensor.assignment (created) WHERE worker_id IS NULL;
""",
    # The order in which a placement tries workers: one row per live worker and runtime it
    # offers, indexed by runtime and load ratio, so a placement walks the workers offering the
    # sensor's runtime from the least loaded and stops at the first eligible one (scheduler.py).
    # A trigger on the assignments keeps `load` current; Scheduler.sync recounts it and copies
    # capacities and runtimes from the workers. It only orders: capacity is checked against the
    # assignments themselves, so a count that drifted can cost balance, never over-fill a worker.
    "attune_sensor.worker_load": """
CREATE SCHEMA IF NOT EXISTS attune_sensor;
CREATE TABLE IF NOT EXISTS attune_sensor.worker_load (
    worker_id BIGINT NOT NULL,
    runtime TEXT NOT NULL,
    load INTEGER NOT NULL DEFAULT 0,
    capacity INTEGER NOT NULL DEFAULT 0,
    ratio FLOAT8 GENERATED ALWAYS AS
        (CASE WHEN capacity > 0 THEN load::float8 / capacity ELSE 'Infinity'::float8 END) STORED,
    PRIMARY KEY (worker_id, runtime)
);
CREATE INDEX IF NOT EXISTS worker_load_walk ON attune_sensor.worker_load (runtime, ratio, worker_id);
CREATE OR REPLACE FUNCTION attune_sensor.count_worker_load() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.worker_id IS NOT NULL THEN
        UPDATE attune_sensor.worker_load SET load = load - 1 WHERE worker_id = OLD.worker_id;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.worker_id IS NOT NULL THEN
        UPDATE attune_sensor.worker_load SET load = load + 1 WHERE worker_id = NEW.worker_id;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER count_worker_load AFTER INSERT OR DELETE OR UPDATE OF worker_id ON attune_sensor.assignment
    FOR EACH ROW EXECUTE FUNCTION attune_sensor.count_worker_load();
""",
    "attune_sensor.fleet_gauges": """
CREATE SCHEMA IF NOT EXISTS attune_sensor;
CREATE TABLE IF NOT EXISTS attune_sensor.fleet_gauges (
    only_row BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_row),
    computed_at TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    multiplier FLOAT8,
    gauges JSONB
);
INSERT INTO attune_sensor.fleet_gauges DEFAULT VALUES ON CONFLICT DO NOTHING;
""",
}
OWN_GRANTS = {
    "attune_sensor.reaper_gate": "SELECT, UPDATE",
    "attune_sensor.assignment": "SELECT, INSERT, UPDATE, DELETE",
    "attune_sensor.worker_load": "SELECT, INSERT, UPDATE, DELETE",
    "attune_sensor.fleet_gauges": "SELECT, UPDATE",
}


def ensure_own_objects(cursor):
    """The reaper's one-row gate (fleet.GATED_REAP_CTES), the sensors' assignments and each
    worker's load (scheduler.py) and the fleet's gauges (fleet.metrics), in schema
    attune_sensor. In this order: the load's trigger is on the assignments."""
    for name, sql in OWN_OBJECTS.items():
        if not _exists(cursor, name):
            cursor.execute(sql)


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
