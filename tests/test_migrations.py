"""Schema migrations against a real PostgreSQL: empty, legacy and concurrent cases."""

import subprocess
from pathlib import Path

import pytest

from support import attune_database, ATTUNE_SENSOR, base_env, query, run_cli

ROOT = Path(__file__).resolve().parent.parent

LEGACY_SCHEMA = """
CREATE TYPE worker_type_enum AS ENUM ('local', 'remote', 'container');
CREATE TYPE worker_status_enum AS ENUM ('active', 'inactive', 'busy', 'error');
CREATE TABLE runtime (id BIGSERIAL PRIMARY KEY, ref TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
    created TIMESTAMPTZ NOT NULL DEFAULT NOW(), updated TIMESTAMPTZ NOT NULL DEFAULT NOW());
CREATE TABLE worker (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL, worker_type worker_type_enum NOT NULL,
    runtime BIGINT REFERENCES runtime(id), host TEXT, port INTEGER, status worker_status_enum DEFAULT 'inactive',
    capabilities JSONB, meta JSONB, last_heartbeat TIMESTAMPTZ,
    created TIMESTAMPTZ NOT NULL DEFAULT NOW(), updated TIMESTAMPTZ NOT NULL DEFAULT NOW());
CREATE INDEX idx_worker_last_heartbeat ON worker (last_heartbeat);
INSERT INTO worker (name, worker_type, host, status) VALUES ('action-1', 'local', 'h1', 'active'),
    ('action-2', 'remote', 'h2', 'inactive');
"""


def migrate(url, *action):
    return run_cli("migrate", *(action or ("run",)), env={"DATABASE_URL": url})


def columns(url):
    return dict(query(url, "SELECT column_name, data_type FROM information_schema.columns "
                           "WHERE table_name = 'worker'"))


def test_empty_database_gets_the_spec_schema(empty_db_url):
    result = migrate(empty_db_url)
    assert result.returncode == 0, result.stderr
    assert set(columns(empty_db_url)) == {"id", "name", "worker_type", "worker_role", "runtime", "host", "port",
                                          "status", "capabilities", "meta", "last_heartbeat", "created", "updated"}
    enum = query(empty_db_url, "SELECT enum_range(NULL::worker_status_enum)::text")[0][0]
    assert enum == "{active,inactive,busy,error}"
    assert query(empty_db_url, "SELECT enum_range(NULL::worker_role_enum)::text")[0][0] == "{action,sensor,hybrid}"
    info = migrate(empty_db_url, "info")
    assert info.returncode == 0 and "pending" not in info.stdout
    assert "20260131000001_add_worker_role.sql  applied" in info.stdout


MIGRATION_FILES = sorted(p.name for p in (ROOT / "attune_sensor" / "db" / "migrations").glob("*.sql"))
OWN_FILES = sorted(p.name for p in (ROOT / "attune_sensor" / "db" / "migrations" / "own").glob("2*.sql"))


def test_info_lists_pending_before_run(empty_db_url):
    info = migrate(empty_db_url, "info")
    assert info.returncode == 0
    assert len(MIGRATION_FILES) == 5 and len(OWN_FILES) == 6
    for name in MIGRATION_FILES:
        assert f"\n{name}  pending" in info.stdout
    for name in OWN_FILES:
        assert f"\nown/{name}  pending" in info.stdout


def test_second_run_changes_nothing(empty_db_url):
    assert migrate(empty_db_url).returncode == 0
    again = migrate(empty_db_url)
    assert again.returncode == 0 and "up to date" in again.stdout


def test_legacy_worker_table_gains_roles_and_keeps_rows(empty_db_url):
    query(empty_db_url, LEGACY_SCHEMA)
    result = migrate(empty_db_url)
    assert result.returncode == 0, result.stderr
    rows = query(empty_db_url, "SELECT name, worker_role::text, host FROM worker ORDER BY name")
    assert rows == [("action-1", "action", "h1"), ("action-2", "action", "h2")]
    indexes = [r[0] for r in query(empty_db_url, "SELECT indexname FROM pg_indexes WHERE tablename = 'worker'")]
    assert "idx_worker_last_heartbeat" not in indexes
    assert "worker_name_key" in indexes


def test_duplicate_names_stop_the_migration_and_change_nothing(empty_db_url):
    query(empty_db_url, LEGACY_SCHEMA + "INSERT INTO worker (name, worker_type) VALUES ('action-1', 'local');")
    result = migrate(empty_db_url)
    assert result.returncode == 1
    assert "action-1 (ids 1, 3)" in result.stderr and "rolled back" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert ("(applied in this run and kept: 20260101000001_worker_schema.sql, 20260131000001_add_worker_role.sql; "
            "applied before this run, last: none)") in result.stderr
    # the role migration before it was applied; the failed one left no trace
    assert query(empty_db_url, "SELECT count(*) FROM worker")[0][0] == 3
    indexes = [r[0] for r in query(empty_db_url, "SELECT indexname FROM pg_indexes WHERE tablename = 'worker'")]
    assert "worker_name_key" not in indexes and "idx_worker_last_heartbeat" in indexes
    # fix the data, run again: it completes
    query(empty_db_url, "DELETE FROM worker WHERE id = 3")
    assert migrate(empty_db_url).returncode == 0


def test_a_failed_own_migration_names_every_migration_applied_before_it(empty_db_url):
    # something in the way of the own schema's first migration, after the spec's series went in
    query(empty_db_url, "CREATE SCHEMA attune_sensor; CREATE TABLE attune_sensor.assignment (x int)")
    result = migrate(empty_db_url)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "migration own/20261201000001_own_schema.sql failed and was rolled back (applied in this run and kept: " \
           + ", ".join(MIGRATION_FILES) + "; applied before this run, last: none)" in result.stderr
    query(empty_db_url, "DROP TABLE attune_sensor.assignment")
    assert migrate(empty_db_url).returncode == 0
    # a migration forgotten while its objects stay: applying it again fails (own/2 adds columns)
    query(empty_db_url, "DELETE FROM attune_sensor.schema_migrations WHERE version = 20261201000002; "
                        "ALTER TABLE attune_sensor.assignment DROP COLUMN previous_worker_id")
    again = migrate(empty_db_url)
    assert again.returncode == 1 and "migration own/20261201000002_sensor_runner.sql failed and was rolled back " \
        f"(nothing else was applied in this run; applied before this run, last: own/{OWN_FILES[-1]})" in again.stderr


def test_info_on_a_legacy_worker_table_says_migrate_run_upgrades_it(empty_db_url):
    query(empty_db_url, LEGACY_SCHEMA)
    info = migrate(empty_db_url, "info")
    assert info.returncode == 0, info.stderr
    assert "no worker table yet" not in info.stdout
    assert "database  worker table public.worker is there but not the spec's yet (public.worker lacks the column(s) " \
           "worker_role): migrate run upgrades it in place, keeping its rows" in info.stdout


def test_info_as_a_role_that_may_not_read_the_bookkeeping_names_the_privilege(spec_db_url, cluster):
    dbname = spec_db_url.rsplit("/", 1)[1]
    role = f"ro_{dbname}"
    query(spec_db_url, f"CREATE ROLE {role} LOGIN PASSWORD 'ro-pw'; GRANT SELECT ON worker TO {role}")
    url = f"postgresql://{role}:ro-pw@127.0.0.1:{cluster.port}/{dbname}"
    result = migrate(url, "info")
    assert result.returncode == 78 and "internal error" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"attune-sensor: permission denied: role {role} needs SELECT on public.attune_sensor_migrations to read which "
        f"migrations are applied; members of attune_sensor_daemon have it (GRANT attune_sensor_daemon TO {role}), or "
        "run this as the schema owner"]
    query(spec_db_url, f"GRANT SELECT ON attune_sensor_migrations TO {role}")
    own = migrate(url, "info")
    assert own.returncode == 78 and "needs USAGE on schema attune_sensor and SELECT on " \
        "attune_sensor.schema_migrations" in own.stderr


def test_run_and_info_say_what_they_make_and_grant(empty_db_url):
    info = migrate(empty_db_url, "info")
    assert "\ndaemon grants  " in info.stdout and "\nown schema  " in info.stdout
    result = migrate(empty_db_url)
    assert "applied 20260101000001_worker_schema.sql (type worker_type_enum, worker_status_enum; table runtime, " \
           "worker)" in result.stdout
    assert "applied own/20261201000002_sensor_runner.sql (alters table attune_sensor.assignment; index " \
           "assignment_handover; table attune_sensor.sensor_run)" in result.stdout
    granted = [line for line in result.stdout.splitlines() if line.startswith("granted attune_sensor_daemon: ")]
    assert len(granted) == 1 and "SELECT, INSERT, UPDATE on public.worker" in granted[0]


def test_the_daemon_role_may_delete_only_what_the_daemon_deletes(spec_db_url):
    # what earlier versions granted is taken back by the next run
    query(spec_db_url, "GRANT DELETE ON attune_sensor.assignment TO attune_sensor_daemon")
    assert migrate(spec_db_url).returncode == 0
    rows = query(spec_db_url, "SELECT t, has_table_privilege('attune_sensor_daemon', t, 'DELETE') FROM unnest(ARRAY["
                              "'public.worker', 'attune_sensor.assignment', 'attune_sensor.worker_load', "
                              "'attune_sensor.sensor_run', 'attune_sensor.reaper_gate', 'attune_sensor.walk_start']) AS t")
    assert dict(rows) == {"public.worker": False, "attune_sensor.assignment": False,
                          "attune_sensor.worker_load": True, "attune_sensor.sensor_run": True,
                          "attune_sensor.reaper_gate": False, "attune_sensor.walk_start": False}
    # the SQL the daemon runs: DELETE only in the load index's sync and its own sensor reports
    import re
    deleting = set()
    for path in (ROOT / "attune_sensor").rglob("*.py"):
        for table in re.findall(r"DELETE FROM \{*(\w+)\}*", path.read_text()):
            deleting.add((path.name, table))
    assert deleting == {("scheduler.py", "worker_load"), ("scheduler.py", "ASSIGNMENTS"),
                        ("report.py", "SENSOR_RUNS")}  # ASSIGNMENTS: only `unplace`, an operator's command


def test_uninstall_keeps_the_spec_schema_and_a_later_run_adopts_it(spec_db_url):
    query(spec_db_url, "INSERT INTO worker (name, worker_type, worker_role, status) VALUES ('action-9', 'local', "
                       "'action', 'active')")
    done = migrate(spec_db_url, "uninstall", "--yes")
    assert done.returncode == 0, done.stderr
    assert "removed table public.attune_sensor_migrations" in done.stdout
    assert "kept: the spec's worker schema in public" in done.stdout
    assert query(spec_db_url, "SELECT to_regnamespace('attune_sensor'), to_regclass('attune_sensor_migrations')") \
        == [(None, None)]
    assert query(spec_db_url, "SELECT name FROM worker") == [("action-9",)]
    assert query(spec_db_url, "SELECT count(*) FROM information_schema.role_table_grants "
                              "WHERE grantee = 'attune_sensor_daemon'") == [(0,)]
    again = migrate(spec_db_url)
    assert again.returncode == 0, again.stderr
    assert query(spec_db_url, "SELECT count(*) FROM attune_sensor_migrations") == [(len(MIGRATION_FILES),)]


def test_uninstall_drops_the_role_when_asked_even_with_members():
    from pgcluster import Cluster

    server = Cluster().init().start()  # roles are cluster-wide: not the suite's shared one
    try:
        server.psql("CREATE DATABASE lone")
        url = server.url("lone")
        assert migrate(url).returncode == 0
        server.psql("CREATE ROLE host01 LOGIN IN ROLE attune_sensor_daemon")
        kept = migrate(url, "uninstall", "--yes")
        assert kept.returncode == 0 and "kept: role attune_sensor_daemon: it has member roles (host01)" in kept.stdout
        dropped = migrate(url, "uninstall", "--yes", "--drop-role")
        assert dropped.returncode == 0, dropped.stderr
        assert "removed role attune_sensor_daemon (its members host01 lose it)" in dropped.stdout
        assert query(url, "SELECT count(*) FROM pg_roles WHERE rolname = 'attune_sensor_daemon'") == [(0,)]
    finally:
        server.destroy()


def test_changed_migration_file_is_refused(spec_db_url):
    query(spec_db_url, "UPDATE attune_sensor_migrations SET checksum = 'tampered' WHERE version = 20260131000001")
    for action in ("run", "info"):
        result = migrate(spec_db_url, action)
        assert result.returncode == 1
        assert "20260131000001_add_worker_role.sql was changed" in result.stderr


def test_concurrent_migrate_runs_build_one_schema(empty_db_url):
    procs = [subprocess.Popen([ATTUNE_SENSOR, "migrate", "run"], env=base_env({"DATABASE_URL": empty_db_url}),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(6)]
    results = [(p.wait(60), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), results
    assert query(empty_db_url, "SELECT count(*) FROM attune_sensor_migrations")[0][0] == len(MIGRATION_FILES)


def test_unreachable_database_exits_69(cluster):
    result = run_cli("migrate", "run", env={"DATABASE_URL": "postgresql://nobody:pw@127.0.0.1:1/x"})
    assert result.returncode == 69
    assert "cannot connect" in result.stderr and "Traceback" not in result.stderr


# (query from the spec, column holding the name, names it must return)
SPEC_QUERIES = [
    ("SELECT id, name, host, capabilities, last_heartbeat FROM worker WHERE worker_role = 'sensor' "
     "AND status = 'active';", 1, {"s1", "s2"}),
    ("SELECT id, name, host, capabilities->'runtimes' as runtimes FROM worker WHERE worker_role = 'sensor' "
     "AND status = 'active' AND capabilities->'runtimes' ? 'python';", 1, {"s1"}),
    ("SELECT id, name, last_heartbeat FROM worker WHERE worker_role = 'sensor' AND status = 'active' "
     "AND last_heartbeat < NOW() - INTERVAL '5 minutes';", 1, {"s1"}),
    ("SELECT name, host, status, last_heartbeat, NOW() - last_heartbeat AS time_since_heartbeat FROM worker "
     "WHERE worker_role = 'sensor' AND status = 'active' AND last_heartbeat < NOW() - INTERVAL '60 seconds' "
     "ORDER BY last_heartbeat;", 0, {"s1"}),
    ("SELECT * FROM worker WHERE worker_role IN ('sensor', 'hybrid') AND status = 'active' "
     "AND capabilities->'runtimes' ? %s ORDER BY last_heartbeat DESC", 1, {"s1"}),
]


@pytest.mark.parametrize("sql,name_column,expected", SPEC_QUERIES)
def test_spec_queries_run_unchanged(spec_db_url, sql, name_column, expected):
    query(spec_db_url, "INSERT INTO worker (name, worker_type, worker_role, status, capabilities, last_heartbeat) VALUES "
                  "('s1', 'local', 'sensor', 'active', '{\"runtimes\": [\"python\"]}', now() - interval '10 minutes'),"
                  "('s2', 'local', 'sensor', 'active', '{\"runtimes\": [\"node\"]}', now()),"
                  "('a1', 'local', 'action', 'active', '{\"runtimes\": [\"python\"]}', now() - interval '1 hour')")
    rows = query(spec_db_url, sql, ("python",) if "%s" in sql else None)
    assert {row[name_column] for row in rows} == expected


def shipped_heartbeats(url, name, count, reaping=True):
    """`count` heartbeats through SensorWorkerRegistration: the statement the package ships
    (by default as the daemon sends it, with the reaper's CTEs in front)."""
    from attune_sensor import config
    from attune_sensor.db import Database
    from attune_sensor.worker.registration import SensorWorkerRegistration

    cfg = config.load(None, {"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"}).with_sensor(worker_name=name)
    db = Database.from_config(cfg)
    registration = SensorWorkerRegistration(db, cfg, ["shell"])
    registration.register()
    if reaping:
        registration.reap_multiplier = 3.0
    query(url, "SELECT pg_stat_force_next_flush()")
    before = query(url, "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'worker'")[0]
    beats = [registration.heartbeat() for _ in range(count)]
    db.close()
    query(url, "SELECT pg_stat_force_next_flush()")
    after = query(url, "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'worker'")[0]
    return beats, after[0] - before[0], after[1] - before[1]


@pytest.mark.parametrize("reaping", [True, False], ids=["daemon", "api"])
def test_updated_is_maintained_and_shipped_heartbeats_are_hot(spec_db_url, reaping):
    beats, updates, hot = shipped_heartbeats(spec_db_url, "hot", 20, reaping)
    assert all(beats) and updates == 20 and hot == 20
    assert query(spec_db_url, "SELECT updated > created FROM worker WHERE name = 'hot'") == [(True,)]


def test_on_the_platforms_schema_heartbeats_are_hot_only_after_the_opt_in(cluster, attune_template):
    url = attune_database(cluster, attune_template)
    _, updates, hot = shipped_heartbeats(url, "not-yet-hot", 10)
    assert updates == 10 and hot == 0  # its index on last_heartbeat
    assert run_cli("migrate", "run", "--tune-heartbeats", env={"DATABASE_URL": url}).returncode == 0
    _, updates, hot = shipped_heartbeats(url, "hot-now", 10)
    assert updates == 10 and hot == 10


def test_the_shipped_heartbeat_is_fenced(db_url):
    from attune_sensor import config
    from attune_sensor.db import Database
    from attune_sensor.worker.registration import HEARTBEAT_SQL, REAPING_HEARTBEAT_SQL, SensorWorkerRegistration

    cfg = config.load(None, {"DATABASE_URL": db_url, "ATTUNE_CONFIG": "/dev/null"}).with_sensor(worker_name="fenced")
    db = Database.from_config(cfg)
    registration = SensorWorkerRegistration(db, cfg, ["shell"])
    registration.register()
    stale_fence = {"id": registration.worker_id, "xmin": registration._row["xmin"]}
    assert registration.heartbeat()
    # the statement with the fence of a write that is no longer the last: touches nothing
    assert db.execute(HEARTBEAT_SQL, stale_fence) == []
    # the reaping one still answers (what its reap did), with no beat: xmin and heartbeat NULL
    assert db.execute(REAPING_HEARTBEAT_SQL, dict(stale_fence, name="fenced", multiplier=3.0)) == [(None, None, [])]
    db.close()


def test_own_objects_made_before_versioning_are_adopted_with_their_assignments(empty_db_url):
    """A database set up by the version that made attune_sensor's tables "when missing": the
    first own migration adopts them, keeping every assignment, and the next adds the runner's
    columns."""
    assert migrate(empty_db_url).returncode == 0
    # back to what that version left: its tables and rows, without the own series' bookkeeping
    query(empty_db_url, "DROP TABLE attune_sensor.schema_migrations, attune_sensor.sensor_run, attune_sensor.sync_gate; "
                        "DROP INDEX attune_sensor.assignment_handover; "
                        "DROP TRIGGER guard_origin ON attune_sensor.assignment; DROP TRIGGER guard_origin_change ON attune_sensor.assignment; "
                        "DROP FUNCTION attune_sensor.guard_origin; "
                        "DROP TRIGGER guard_platform_placement ON attune_sensor.assignment; "
                        "DROP FUNCTION attune_sensor.sync_platform_sensors, attune_sensor.offers_version, "
                        "attune_sensor.version_key, attune_sensor.affinity_score, attune_sensor.affinity_allows, "
                        "attune_sensor.term_matches, attune_sensor.worker_labels, attune_sensor.runtime_name; "
                        "ALTER TABLE attune_sensor.assignment DROP COLUMN entrypoint, DROP COLUMN env, "
                        "DROP COLUMN previous_worker_id, DROP CONSTRAINT assignment_ref_printable, "
                        "DROP CONSTRAINT assignment_runtime_name, DROP COLUMN origin, DROP COLUMN affinity, "
                        "DROP COLUMN versions, DROP COLUMN triggers; "
                        "INSERT INTO attune_sensor.assignment (sensor_ref, runtime) VALUES ('kept.1', 'python')")
    result = migrate(empty_db_url)
    assert result.returncode == 0, result.stderr
    assert "applied own/20261201000001_own_schema.sql" in result.stdout
    assert "applied own/20261201000002_sensor_runner.sql" in result.stdout
    assert "applied own/20261201000003_platform_sensors.sql" in result.stdout
    assert query(empty_db_url, "SELECT sensor_ref, runtime, entrypoint, env FROM attune_sensor.assignment") == \
        [("kept.1", "python", None, {})]
    info = migrate(empty_db_url, "info")
    assert "own/20261201000002_sensor_runner.sql  applied" in info.stdout


def test_a_daemon_refuses_a_database_whose_own_schema_is_behind(spec_db_url, tmp_path):
    newest, before = OWN_FILES[-1], OWN_FILES[-2]
    query(spec_db_url, "DELETE FROM attune_sensor.schema_migrations WHERE version = %s", (int(newest[:14]),))
    path = tmp_path / "c.yaml"
    path.write_text(f"database: {{url: '{spec_db_url}'}}\nsensor: {{worker_name: sensor-behind}}\n")
    result = run_cli("--config", str(path), "run", env={"ATTUNE_SENSOR_RUNTIMES": "shell"}, timeout=30)
    assert result.returncode == 78
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"attune-sensor: attune-sensor's own schema (attune_sensor) is at version {before[:14]}, "
                           f"this version needs {newest[:14]}: run 'attune-sensor migrate run'")
    assert "Traceback" not in result.stderr


def test_migrate_run_restores_a_dropped_load_trigger(spec_db_url):
    query(spec_db_url, "DROP TRIGGER count_worker_load ON attune_sensor.assignment")
    result = migrate(spec_db_url)
    assert result.returncode == 0 and "repaired trigger count_worker_load (it was missing)" in result.stdout
    assert query(spec_db_url, "SELECT count(*) FROM pg_trigger WHERE tgname = 'count_worker_load'") == [(1,)]
    assert "repaired" not in migrate(spec_db_url).stdout


def test_migrate_run_restores_the_heartbeat_function_as_the_migration_made_it(spec_db_url):
    made = query(spec_db_url, "SELECT proname, prosrc FROM pg_proc "
                              "WHERE pronamespace = 'attune_sensor'::regnamespace AND proname IN ('heartbeat', 'is_stale') "
                              "ORDER BY 1")
    assert [m[0] for m in made] == ["heartbeat", "is_stale"]
    query(spec_db_url, "DROP FUNCTION attune_sensor.heartbeat; DROP FUNCTION attune_sensor.is_stale")
    result = migrate(spec_db_url)
    assert result.returncode == 0, result.stderr
    assert "repaired function attune_sensor.heartbeat (it was missing)" in result.stdout
    assert "repaired function attune_sensor.is_stale (it was missing)" in result.stdout
    assert query(spec_db_url, "SELECT proname, prosrc FROM pg_proc "
                              "WHERE pronamespace = 'attune_sensor'::regnamespace AND proname IN ('heartbeat', 'is_stale') "
                              "ORDER BY 1") == made
    assert query(spec_db_url, "SELECT has_function_privilege('attune_sensor_daemon', "
                              "'attune_sensor.heartbeat(bigint, xid, text, float8)', 'EXECUTE')") == [(True,)]


OWN_FUNCTIONS_AND_TRIGGERS = """
SELECT p.oid::regprocedure::text, p.prosrc FROM pg_proc AS p WHERE p.pronamespace = 'attune_sensor'::regnamespace
UNION ALL
SELECT t.tgname, pg_get_triggerdef(t.oid) FROM pg_trigger AS t WHERE t.tgrelid = 'attune_sensor.assignment'::regclass
ORDER BY 1
"""


def test_migrate_run_restores_the_placement_functions_from_their_own_migration(spec_db_url):
    """The functions, tables, indexes and triggers of the idempotent own migrations are restored
    by applying the file again, each named, and every later idempotent file after it: the newest
    definition wins (migration 6 redefines migration 5's place_sensor). A second run has nothing
    to repair."""
    made = query(spec_db_url, OWN_FUNCTIONS_AND_TRIGGERS)
    query(spec_db_url, "DROP FUNCTION attune_sensor.choose_worker; DROP INDEX attune_sensor.worker_load_fullest; "
                       "DROP TRIGGER guard_platform_placement ON attune_sensor.assignment")
    result = migrate(spec_db_url)
    assert result.returncode == 0, result.stderr
    assert "repaired function attune_sensor.choose_worker (it was missing)" in result.stdout
    assert "repaired index worker_load_fullest (it was missing)" in result.stdout
    assert "repaired trigger guard_platform_placement (it was missing)" in result.stdout
    assert query(spec_db_url, OWN_FUNCTIONS_AND_TRIGGERS) == made
    query(spec_db_url, "DROP TABLE attune_sensor.walk_start")
    result = migrate(spec_db_url)
    assert result.returncode == 0 and "repaired table attune_sensor.walk_start (it was missing)" in result.stdout
    assert query(spec_db_url, "SELECT has_table_privilege('attune_sensor_daemon', 'attune_sensor.walk_start', "
                              "'UPDATE')") == [(True,)]
    assert "repaired" not in migrate(spec_db_url).stdout


def test_the_version_a_daemon_needs_is_the_newest_own_file():
    """The daemon reads its own schema version from the files' names (schema.own_schema_version,
    without importing the migrations): the newest file, as `migrate run` applies them."""
    from attune_sensor.db import migrations, schema

    assert schema.own_schema_version() == int(OWN_FILES[-1][:14]) == migrations.own_available()[-1].version
