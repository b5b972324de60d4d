"""On the Attune platform's database: found where the platform keeps it, adapted to, never
imposed on, and healthy in the platform's eyes.

Each test runs on databases from both sources of the Attune flavour (platform_db.py): the
project's own fixture SQL and the platform's real migrations, each with and without the
platform's `ALTER DATABASE ... SET search_path` (without it only schema attune finds the
tables). Queries here name `attune.` explicitly for that reason.
"""

import json
import signal

import psycopg2
import pytest

from pgcluster import Cluster
from support import attune_database, query, run_cli, wait_for, write_config

VARIANTS = [("fixture", True), ("fixture", False), ("platform", True), ("platform", False)]
IDS = ["fixture-search_path", "fixture-schema_only", "platform-search_path", "platform-schema_only"]


@pytest.fixture(params=VARIANTS, ids=IDS)
def attune_db(request, cluster, attune_templates):
    source, search_path = request.param
    return attune_database(cluster, attune_templates(source), search_path=search_path)


@pytest.fixture(params=VARIANTS, ids=IDS)
def attune_bare(request, cluster, attune_templates):
    """As the platform's migrations left it: attune-sensor's 'migrate run' not run yet."""
    source, search_path = request.param
    return attune_database(cluster, attune_templates(source), search_path=search_path, migrate=False)


def write(url, sql):
    """A write as the platform's services make it: its history trigger names worker_history
    without a schema, so the writer's search_path must find it."""
    return query(url, "SET search_path TO attune, public; " + sql)


def row(url, name):
    rows = query(url, "SELECT id, worker_role::text, status::text, host, capabilities, meta, cordoned "
                      "FROM attune.worker WHERE name = %s", (name,))
    if not rows:
        return None
    return dict(zip(("id", "role", "status", "host", "capabilities", "meta", "cordoned"), rows[0]))


def daemon_config(tmp_path, url, name, **sensor):
    sensor.setdefault("heartbeat_interval", 0.5)
    return write_config(tmp_path, {"database": {"url": url}, "sensor": {"worker_name": name, **sensor}})


def login_role(cluster, url, prefix):
    """A login role in attune_sensor_daemon (least privilege), and the URL that uses it."""
    dbname = url.rsplit("/", 1)[1]
    role = f"{prefix}_{dbname}"
    cluster.psql(f"CREATE ROLE {role} LOGIN PASSWORD 'least-pw' IN ROLE attune_sensor_daemon")
    return f"postgresql://{role}:least-pw@127.0.0.1:{cluster.port}/{dbname}"


def test_a_least_privilege_daemon_lives_a_whole_life_on_the_platforms_table(cluster, attune_db, tmp_path, daemons):
    url = login_role(cluster, attune_db, "least")
    path = daemon_config(tmp_path, url, "sensor-attune", labels={"zone": "eu-west"}, taints=["gpu=nvidia:no_schedule"])
    daemon = daemons(path)
    daemon.wait_for_line("heartbeat: worker", count=3)
    assert "Attune platform's schema" in daemon.output
    found = row(attune_db, "sensor-attune")
    assert found["role"] == "sensor" and found["status"] == "active" and found["cordoned"] is False
    capabilities = found["capabilities"]
    assert capabilities["labels"] == {"zone": "eu-west"}
    assert capabilities["taints"] == [{"key": "gpu", "value": "nvidia", "effect": "no_schedule"}]
    assert {"runtime_versions", "detected_interpreters", "runtimes", "max_concurrent_sensors"} <= set(capabilities)
    python = [i for i in capabilities["detected_interpreters"] if i["name"] == "python"]
    assert python and capabilities["runtime_versions"]["python"] == sorted({i["version"] for i in python})
    # in the platform's own view, and nowhere else: no second worker table
    assert query(attune_db, "SELECT name FROM attune.healthy_workers") == [("sensor-attune",)]
    assert query(attune_db, "SELECT to_regclass('public.worker')") == [(None,)]
    # the platform's history: the registration, and no row per heartbeat
    history = query(attune_db, "SELECT operation FROM attune.worker_history WHERE entity_ref = 'sensor-attune'")
    assert history == [("INSERT",)]
    for command, expected in ((["check"], 0), (["workers", "--json"], 0), (["metrics"], 0)):
        result = run_cli("--config", path, *command)
        assert result.returncode == expected, result.stdout + result.stderr
    listed = json.loads(run_cli("--config", path, "workers", "--json").stdout)["workers"]
    assert [w["name"] for w in listed] == ["sensor-attune"]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert row(attune_db, "sensor-attune")["status"] == "inactive"
    changes = query(attune_db, "SELECT changed_fields FROM attune.worker_history "
                               "WHERE entity_ref = 'sensor-attune' AND operation = 'UPDATE'")
    assert changes == [(["status"],)]


def test_default_interval_keeps_the_worker_healthy_and_only_the_executors_rule_refuses(attune_db, tmp_path, daemons):
    daemon = daemons(daemon_config(tmp_path, attune_db, "sensor-auto", heartbeat_interval="auto"))
    daemon.wait_for_line("Registered sensor worker")
    assert "interval 10s" in daemon.output and "healthy_workers" not in daemon.output
    assert row(attune_db, "sensor-auto")["capabilities"]["heartbeat_interval"] == 10
    # the spec's own 30 s: outside healthy_workers' 30 s (which no platform code reads), one warning
    spec = daemons(daemon_config(tmp_path, attune_db, "sensor-spec", heartbeat_interval=30))
    spec.wait_for_line("Registered sensor worker")
    warnings = [line for line in spec.lines if "healthy_workers" in line]
    assert len(warnings) == 1 and "90s stale rule is met" in warnings[0]
    assert row(attune_db, "sensor-spec")["capabilities"]["heartbeat_interval"] == 30
    # 86 s plus a 5 s statement bound reaches the executor's 90 s: it would mark the worker inactive
    refused = daemons(daemon_config(tmp_path, attune_db, "sensor-slow", heartbeat_interval=86))
    assert refused.wait() == 78
    errors = [line for line in refused.lines if "stale rule" in line]
    assert len(errors) == 1 and "sensor.heartbeat_interval" in errors[0] and "executor" in errors[0]
    assert "Traceback" not in refused.output and row(attune_db, "sensor-slow") is None


def test_the_systemd_watchdog_follows_a_long_interval_and_a_reload(attune_db, tmp_path, daemons, notify_socket):
    """The seed's ATTUNE__SENSOR__HEARTBEAT_INTERVAL=60 under the shipped WatchdogSec=90: accepted,
    and the watchdog is moved to 3 x 60 s instead of killing the daemon; a reload moves it back."""
    path = daemon_config(tmp_path, attune_db, "sensor-wd60", heartbeat_interval=60)
    daemon = daemons(path, env={"WATCHDOG_USEC": "90000000"}, notify=notify_socket)
    notify_socket.wait_for("READY=1")
    assert "WATCHDOG_USEC=180000000" in notify_socket.fields()
    assert notify_socket.fields().index("WATCHDOG_USEC=180000000") < notify_socket.fields().index("READY=1")
    assert row(attune_db, "sensor-wd60")["capabilities"]["heartbeat_interval"] == 60
    assert sum("healthy_workers" in line for line in daemon.lines) == 1
    with open(path, "w") as handle:
        handle.write(f"database: {{url: '{attune_db}'}}\nsensor: {{worker_name: sensor-wd60, heartbeat_interval: 2}}\n")
    daemon.signal(signal.SIGHUP)
    notify_socket.wait_for("READY=1", count=2)
    assert "WATCHDOG_USEC=90000000" in notify_socket.fields()  # back to the unit's WatchdogSec
    reload_at = notify_socket.fields().index("RELOADING=1")
    assert notify_socket.fields().index("WATCHDOG_USEC=90000000") > reload_at
    daemon.wait_for_line("systemd watchdog: 90s")
    assert daemon.proc.poll() is None


PLATFORM_OBJECTS = """
SELECT 'index ' || schemaname || '.' || indexname || ': ' || indexdef FROM pg_indexes
 WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'attune_sensor')
UNION ALL
SELECT 'table ' || n.nspname || '.' || c.relname || ' ' || c.relkind::text || ' ' || coalesce(c.reloptions::text, '')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', 'attune_sensor')
   AND c.relkind IN ('r', 'v', 'S')
UNION ALL
SELECT 'trigger ' || tgrelid::regclass || ' ' || pg_get_triggerdef(t.oid) FROM pg_trigger t WHERE NOT tgisinternal
   AND tgrelid::regclass::text NOT LIKE 'attune_sensor.%%'
UNION ALL
SELECT 'function ' || p.oid::regprocedure || ' ' || md5(p.prosrc)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'attune_sensor')
UNION ALL
SELECT 'type ' || t.typname || ' ' || coalesce((SELECT string_agg(enumlabel, ',' ORDER BY enumsortorder)
                                                  FROM pg_enum WHERE enumtypid = t.oid), '')
  FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = 'attune' AND t.typtype = 'e'
ORDER BY 1
"""


def test_migrate_changes_none_of_the_platforms_objects_and_tuning_is_opt_in(attune_bare, tmp_path):
    before = query(attune_bare, PLATFORM_OBJECTS)
    env = {"DATABASE_URL": attune_bare}
    info = run_cli("migrate", "info", env=env)
    assert info.returncode == 0 and "Attune platform's schema" in info.stdout and "schema attune" in info.stdout
    assert "--tune-heartbeats" in info.stdout and "recommended" in info.stdout
    # says what it makes (its own schema and tables) and grants, not "changes none of its objects"
    assert "\nown schema  schema attune_sensor: tables attune_sensor.schema_migrations, attune_sensor.reaper_gate, " \
           "attune_sensor.assignment, attune_sensor.worker_load, attune_sensor.fleet_gauges, attune_sensor.sensor_run, " \
           "attune_sensor.sync_gate, attune_sensor.walk_start; functions attune_sensor.count_worker_load, attune_sensor.is_stale, " \
           "attune_sensor.heartbeat, attune_sensor.runtime_name" in info.stdout
    assert "\ndaemon grants  USAGE on SCHEMA attune; SELECT, INSERT, UPDATE on attune.worker;" in info.stdout
    result = run_cli("migrate", "run", env=env)
    assert result.returncode == 0, result.stderr
    assert "adds no table, index, trigger or function to the platform's schema" in result.stdout
    assert "applied own/20261201000001_own_schema.sql (schema attune_sensor; table attune_sensor.reaper_gate" \
           in result.stdout
    granted = [line for line in result.stdout.splitlines() if line.startswith("granted attune_sensor_daemon: ")]
    assert len(granted) == 1 and "INSERT on attune.worker_history" in granted[0]
    assert query(attune_bare, PLATFORM_OBJECTS) == before  # nothing added, dropped or altered
    # attune-sensor's own objects live in its own schema: the reaper's one-row gate
    assert query(attune_bare, "SELECT count(*) FROM attune_sensor.reaper_gate") == [(1,)]
    # what the daemon needs there is granted: schema usage and the history its trigger writes
    grants = query(attune_bare, "SELECT has_schema_privilege('attune_sensor_daemon', 'attune', 'USAGE') "
                                "AND has_table_privilege('attune_sensor_daemon', 'attune_sensor.reaper_gate', 'UPDATE'), "
                                "has_table_privilege('attune_sensor_daemon', 'attune.worker_history', 'INSERT'), "
                                "has_table_privilege('attune_sensor_daemon', 'attune.worker', 'DELETE')")
    assert grants == [(True, True, False)]
    # DELETE only where the daemon deletes (the load index's rows, its own sensor reports), never an assignment
    deletes = query(attune_bare, "SELECT t, has_table_privilege('attune_sensor_daemon', t, 'DELETE') FROM unnest("
                                 "ARRAY['attune_sensor.assignment', 'attune_sensor.worker_load', 'attune_sensor.sensor_run',"
                                 " 'attune_sensor.reaper_gate', 'attune_sensor.fleet_gauges']) AS t ORDER BY 1")
    assert dict(deletes) == {"attune_sensor.assignment": False, "attune_sensor.worker_load": True,
                             "attune_sensor.sensor_run": True, "attune_sensor.reaper_gate": False,
                             "attune_sensor.fleet_gauges": False}
    assert "DELETE on attune_sensor.assignment" not in granted[0]
    assert "SELECT, INSERT, UPDATE, DELETE on attune_sensor.worker_load" in granted[0]
    tuned = run_cli("migrate", "run", "--tune-heartbeats", env=env)
    assert tuned.returncode == 0 and "dropped index" in tuned.stdout, tuned.stderr
    indexes = query(attune_bare, "SELECT indexdef FROM pg_indexes WHERE schemaname = 'attune' AND tablename = 'worker'")
    assert not any("last_heartbeat" in i[0] for i in indexes) and len(indexes) == len(
        [b for b in before if b[0].startswith("index attune.") and " ON attune.worker " in b[0]]) - 1
    assert "applied: no index on last_heartbeat, fillfactor 70" in run_cli("migrate", "info", env=env).stdout


def test_a_name_held_by_an_action_worker_is_never_taken(attune_db, tmp_path, daemons):
    write(attune_db, "INSERT INTO attune.worker (name, worker_type, worker_role, host, status, last_heartbeat) "
                     "VALUES ('sensor-clash', 'local', 'action', 'exec-07', 'inactive', now() - interval '1 day')")
    daemon = daemons(daemon_config(tmp_path, attune_db, "sensor-clash"))
    assert daemon.wait() == 78
    errors = [line for line in daemon.lines if "sensor-clash" in line and "action" in line]
    assert len(errors) == 1 and "exec-07" in errors[0] and "Traceback" not in daemon.output
    assert (row(attune_db, "sensor-clash")["role"], row(attune_db, "sensor-clash")["status"]) == ("action", "inactive")


def test_another_program_rewriting_our_row_stops_the_daemon_without_marking_it(attune_db, tmp_path, daemons):
    daemon = daemons(daemon_config(tmp_path, attune_db, "sensor-shared"))
    daemon.wait_for_line("heartbeat: worker")
    # what the platform's own sensor service does when it starts under the same name
    write(attune_db, "UPDATE attune.worker SET status = 'active', capabilities = '{\"runtimes\": [\"python\"]}', "
                     "last_heartbeat = now(), updated = now() WHERE name = 'sensor-shared'")
    assert daemon.wait() == 78
    errors = [line for line in daemon.lines if "rewritten by another program" in line]
    assert len(errors) == 1 and "capabilities" in errors[0]
    assert row(attune_db, "sensor-shared")["status"] == "active"  # left to its other writer


def test_a_cordon_survives_heartbeats_and_shows_in_workers(attune_db, tmp_path, daemons):
    path = daemon_config(tmp_path, attune_db, "sensor-cordon")
    daemon = daemons(path)
    daemon.wait_for_line("heartbeat: worker")
    write(attune_db, "UPDATE attune.worker SET cordoned = true, cordon_reason = 'disk swap', cordoned_at = now() "
                     "WHERE name = 'sensor-cordon'")
    beats = sum("heartbeat: worker" in line for line in daemon.lines)
    daemon.wait_for_line("heartbeat: worker", count=beats + 3)
    assert daemon.proc.poll() is None and row(attune_db, "sensor-cordon")["cordoned"] is True
    listing = run_cli("--config", path, "workers")
    assert "active (cordoned)" in listing.stdout


def test_an_operators_status_is_logged_and_set_back(attune_db, tmp_path, daemons):
    daemon = daemons(daemon_config(tmp_path, attune_db, "sensor-op"))
    daemon.wait_for_line("heartbeat: worker")
    write(attune_db, "UPDATE attune.worker SET status = 'error' WHERE name = 'sensor-op'")
    daemon.wait_for_line("status set to error by someone else")
    wait_for(lambda: row(attune_db, "sensor-op")["status"] == "active", what="the row active again")
    assert daemon.proc.poll() is None


def test_the_reaper_marks_only_sensor_rows_attune_sensor_registered(attune_db):
    """The platform's own sensor service writes no meta (its INSERT leaves it NULL): its row is
    the platform's to reap (docs/design.md, "Only our rows are ours"), as an action worker's is."""
    from attune_sensor import fleet
    from attune_sensor.db import Database

    write(attune_db, "INSERT INTO attune.worker (name, worker_type, worker_role, status, last_heartbeat, meta) VALUES "
                     "('exec-old', 'local', 'action', 'active', now() - interval '1 day', NULL), "
                     "('platform-sensor', 'local', 'sensor', 'active', now() - interval '1 day', NULL), "
                     "('our-sensor', 'local', 'sensor', 'active', now() - interval '1 day', "
                     "'{\"instance_id\": \"i-1\", \"sensor_version\": \"0.1.0\"}')")
    db = Database(attune_db)
    try:
        reaped, _ = fleet.reap_stale(db, "a-reaper", 3.0)
    finally:
        db.close()
    assert [r[1] for r in reaped] == ["our-sensor"]
    assert row(attune_db, "exec-old")["status"] == "active"
    assert (row(attune_db, "platform-sensor")["status"], row(attune_db, "platform-sensor")["meta"]) == ("active", None)


def test_migrate_without_createrole_says_what_a_dba_runs(attune_templates):
    attune_templates("fixture")  # the platform source is checked once, like the other tests
    server = Cluster().init().start()  # roles are cluster-wide: one without attune_sensor_daemon
    try:
        server.psql("CREATE ROLE platform_owner LOGIN PASSWORD 'owner-pw' CREATEDB")
        server.psql("CREATE DATABASE platform OWNER platform_owner")
        url = server.url("platform", user="platform_owner", password="owner-pw")
        from platform_db import build

        build(url, "fixture")
        result = run_cli("migrate", "run", env={"DATABASE_URL": url})
        assert result.returncode == 1  # no daemon can run without the role: not a success
        lines = [line for line in result.stderr.splitlines() if "CREATE ROLE attune_sensor_daemon NOLOGIN" in line]
        assert len(lines) == 1 and "CREATEROLE" in lines[0] and "owner-pw" not in result.stderr
        assert "applied in this run and kept: own/20261201000001_own_schema.sql" in lines[0]
        assert result.stderr.strip() == lines[0]
        with pytest.raises(psycopg2.Error):
            query(url, "SET ROLE attune_sensor_daemon")  # truly not there
    finally:
        server.destroy()


def test_watch_says_why_it_cannot_follow_the_platforms_table(attune_db, tmp_path):
    path = daemon_config(tmp_path, attune_db, "sensor-watch")
    result = run_cli("--config", path, "workers", "--watch")
    assert result.returncode == 1 and "--watch needs" in result.stderr and "Traceback" not in result.stderr


def test_uninstall_says_what_it_removes_and_leaves_the_platforms_objects_as_they_were(attune_bare, cluster):
    env = {"DATABASE_URL": attune_bare}
    before = query(attune_bare, PLATFORM_OBJECTS)
    acl_sql = ("SELECT c.relname::text, a.grantee::regrole::text, a.privilege_type FROM pg_class c, aclexplode("
               "coalesce(c.relacl, acldefault(CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END::\"char\", c.relowner))) a "
               "WHERE c.relnamespace = 'attune'::regnamespace ORDER BY 1, 2, 3")
    acls = query(attune_bare, acl_sql)
    assert run_cli("migrate", "run", env=env).returncode == 0
    login_role(cluster, attune_bare, "uninst")  # a member: the role is kept without --drop-role
    asked = run_cli("migrate", "uninstall", env=env)
    assert asked.returncode == 1 and "nothing was removed" in asked.stderr and "--yes" in asked.stderr
    assert "  schema attune_sensor\n" in asked.stdout and "  table attune_sensor.assignment (0 rows)" in asked.stdout
    assert "attune_sensor_daemon's privileges on table attune.worker_history" in asked.stdout
    assert query(attune_bare, "SELECT to_regnamespace('attune_sensor') IS NOT NULL") == [(True,)]
    # a live daemon's row stops it: its next heartbeat would fail
    write(attune_bare, "INSERT INTO attune.worker (name, worker_type, worker_role, status, meta, capabilities, "
                       "last_heartbeat) VALUES ('sensor-live', 'local', 'sensor', 'active', "
                       "'{\"instance_id\": \"x\"}', '{\"heartbeat_interval\": 10}', now())")
    live = run_cli("migrate", "uninstall", "--yes", env=env)
    assert live.returncode == 1 and "sensor-live" in live.stderr and "stop them first" in live.stderr
    write(attune_bare, "UPDATE attune.worker SET status = 'inactive' WHERE name = 'sensor-live'")
    done = run_cli("migrate", "uninstall", "--yes", env=env)
    assert done.returncode == 0, done.stderr
    assert "removed schema attune_sensor" in done.stdout
    assert "kept: role attune_sensor_daemon: it has member roles" in done.stdout
    assert query(attune_bare, "SELECT to_regnamespace('attune_sensor')") == [(None,)]
    assert query(attune_bare, PLATFORM_OBJECTS) == before
    assert query(attune_bare, acl_sql) == acls  # the role's grants there are gone, nothing else changed
    assert query(attune_bare, "SELECT count(*) FROM attune.worker WHERE name = 'sensor-live'") == [(1,)]
    again = run_cli("migrate", "uninstall", "--yes", env=env)
    assert again.returncode == 0 and "nothing to remove" in again.stdout
    assert run_cli("migrate", "run", env=env).returncode == 0  # and it can come back
