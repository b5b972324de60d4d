"""A hostile review of the database contract in attune-sensor's own schema (own migrations
3-5: the origin guard, the heartbeat, the rule of eligibility and placement as functions), on a
real PostgreSQL with real roles and, where it matters, the previous release's code. Each test
here failed when it was written: it names a problem, and passes once the problem is fixed."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import psycopg2
import pytest

from attune_sensor.db import Database, schema
from attune_sensor.placement.scheduler import Scheduler
from platform_db import add_worker
from support import add_pending_sensors, query, run_cli, unique_name

ROOT = Path(__file__).resolve().parent.parent
# The previous release: the last commit whose own schema ended at migration 2
# (20261201000002_sensor_runner.sql), before the platform's sensors (migration 3).
PREVIOUS_RELEASE = "3579038e0a82eb4f816c0fbbdf4f7fc534fa5271"


def migrate(url):
    result = run_cli("migrate", "run", env={"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"})
    assert result.returncode == 0, result.stderr
    return result


def daemon_login(cluster, dbname):
    """A login role that is a member of attune_sensor_daemon, as a daemon host's role is; its URL."""
    role = unique_name("host")
    cluster.psql(f"CREATE ROLE {role} LOGIN PASSWORD 'host-pw' IN ROLE attune_sensor_daemon")
    return cluster.url(dbname, user=role, password="host-pw")


def scheduler_for(url):
    db = Database(url)
    return Scheduler(db, schema.attach(db)), db


# --- grants ------------------------------------------------------------------------------------


def test_the_daemon_role_may_place_when_a_dba_revoked_public_execute_on_new_functions(cluster):
    """A DBA who took PUBLIC's default EXECUTE on new functions away (ALTER DEFAULT PRIVILEGES ...
    REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC, a common hardening step) must still get daemons that
    place: `migrate run` grants attune_sensor_daemon EXECUTE on every function of the own schema
    (placement, failover, survey and rebalance call them). It once granted three by name."""
    dbname = unique_name("x")
    cluster.psql(f"CREATE DATABASE {dbname}")
    owner_url = cluster.url(dbname)
    query(owner_url, "ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC")
    migrate(owner_url)
    add_worker(owner_url, "w-grants", capacity=5)
    url = daemon_login(cluster, dbname)
    scheduler, db = scheduler_for(url)
    try:
        assert scheduler.place("s.manual", "python") == "w-grants"
        add_pending_sensors(owner_url, 2, "python", prefix="s.failover.")
        _, placed = scheduler.reconcile()
        assert sorted(placed) == ["s.failover.1", "s.failover.2"]
        me = query(owner_url, "SELECT id FROM worker WHERE name = 'w-grants'")[0][0]
        scheduler.survey(me)
        assert scheduler.rebalance() == []
    finally:
        db.close()
    # and, said plainly: every function of the own schema that the daemon's SQL calls
    missing = query(owner_url, "SELECT p.oid::regprocedure::text FROM pg_proc p "
                               "WHERE p.pronamespace = 'attune_sensor'::regnamespace "
                               "AND p.proname NOT IN ('sync_platform_sensors', 'count_worker_load', 'guard_origin') "
                               "AND NOT has_function_privilege('attune_sensor_daemon', p.oid, 'EXECUTE') ORDER BY 1")
    assert missing == []


# --- the origin guard -------------------------------------------------------------------------


def test_the_origin_guard_cannot_be_fooled_by_a_temporary_pg_class(cluster, spec_db_url):
    """guard_origin (own migration 5) decides "is this the owner?" by reading `pg_class`
    unqualified, in a SECURITY INVOKER trigger without a search_path of its own. For relations,
    pg_temp is searched before pg_catalog unless the path names it; any role may create
    temporary tables by default. So a daemon host's role makes a temporary `pg_class` saying it
    owns attune_sensor.assignment, turns an operator's manual placement into a platform one,
    and the next sync pass (SECURITY DEFINER) deletes it: exactly what the guard exists to
    prevent (docs/design.md, "The platform's sensors")."""
    query(spec_db_url, "INSERT INTO attune_sensor.assignment (sensor_ref, runtime) VALUES ('ops.manual', 'python')")
    dbname = spec_db_url.rsplit("/", 1)[1]
    conn = psycopg2.connect(daemon_login(cluster, dbname))
    try:
        conn.autocommit = True
        cursor = conn.cursor()
        cursor.execute("CREATE TEMP TABLE pg_class AS "
                       "SELECT 'attune_sensor.assignment'::regclass::oid AS oid, "
                       "       (SELECT r.oid FROM pg_catalog.pg_roles AS r WHERE r.rolname = current_user) AS relowner")
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cursor.execute("UPDATE attune_sensor.assignment SET origin = 'platform' WHERE sensor_ref = 'ops.manual'")
    finally:
        conn.close()
    assert query(spec_db_url, "SELECT origin FROM attune_sensor.assignment WHERE sensor_ref = 'ops.manual'") == [
        ("manual",)]


# --- the rule of eligibility against its own words ------------------------------------------------


def test_labels_with_a_non_string_value_are_no_labels_as_the_rule_says(spec_db_url):
    """attune_sensor.worker_labels: "the labels, when they are an object of strings; else none"
    (the platform's worker_labels_from_capabilities, a map of strings or nothing). The test is a
    lax jsonpath, and lax mode unwraps arrays: {"tags": ["x"]} or {"tags": []} passes as a
    string, so a worker whose labels the platform ignores is matched by selectors, required
    affinity terms and `exists` expressions (here: placed on by selector zone=eu)."""
    add_worker(spec_db_url, "w-odd-labels", labels={"zone": "eu", "tags": ["gpu"]})
    scheduler, db = scheduler_for(spec_db_url)
    try:
        scheduler.sync()  # the walk sees the worker
        assert query(spec_db_url, "SELECT count(*) FROM attune_sensor.choose_worker('python', '{\"zone\": \"eu\"}', "
                                  "'[]', '{}', NULL, 3)") == [(0,)]
    finally:
        db.close()
    assert query(spec_db_url, "SELECT attune_sensor.worker_labels(capabilities) FROM worker "
                              "WHERE name = 'w-odd-labels'") == [({},)]


# --- repair ---------------------------------------------------------------------------------------


def test_migrate_run_restores_the_sync_gates_row(spec_db_url):
    """The one-row gates are repaired by `migrate run` (reaper_gate, fleet_gauges: REPAIRED), but
    not the sync gate of migration 3: without its row every claim (CLAIM_SQL, an UPDATE of the
    only row) finds nothing, so every daemon reads it as "another pass is recent" and the
    platform's sensors are never synced again, silently, and `migrate run` says nothing."""
    query(spec_db_url, "DELETE FROM attune_sensor.sync_gate")
    migrate(spec_db_url)
    assert query(spec_db_url, "SELECT count(*) FROM attune_sensor.sync_gate") == [(1,)]


def test_migrate_run_restores_the_load_walks_index(spec_db_url):
    """repair.sql says it restores "the load index" (CREATE INDEX IF NOT EXISTS worker_load_walk),
    but `migrate run` runs repair.sql only when one of REPAIRED's objects is missing, and the
    index is not one of them, nor made by an idempotent migration: dropped, it stays dropped,
    and every walk (choose_worker: worker_load by runtime in ratio order, LIMIT 1) reads and
    sorts all of a runtime's rows under the placement lock instead of stopping at the first."""
    query(spec_db_url, "DROP INDEX attune_sensor.worker_load_walk")
    migrate(spec_db_url)
    assert query(spec_db_url, "SELECT to_regclass('attune_sensor.worker_load_walk') IS NOT NULL") == [(True,)]


# --- a rolling upgrade: the previous release's daemons on the new schema ---------------------------


def previous_release(tmp_path):
    """The previous release's package, extracted from git (its code, not this one's)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", PREVIOUS_RELEASE, "attune_sensor"],
                             stdout=subprocess.PIPE, check=True).stdout
    target = tmp_path / "previous"
    target.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target)
    own = sorted(p.name for p in (target / "attune_sensor/db/migrations/own").glob("2*.sql"))
    assert own[-1] == "20261201000002_sensor_runner.sql"
    return target


def run_previous(path, url, code):
    script = ("import json, sys\n"
              "from attune_sensor.db import Database, schema\n"
              "from attune_sensor.placement.scheduler import Scheduler\n"
              f"db = Database({url!r})\n"
              "scheduler = Scheduler(db, schema.attach(db))\n" + code)
    result = subprocess.run([sys.executable, "-c", script], cwd=str(path), env={"PYTHONPATH": str(path)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_previous_release_daemon_never_places_a_platform_sensor_against_its_affinity(spec_db_url, tmp_path):
    """docs/operations.md, "Upgrades": "an older daemon keeps working on a newer one, so the
    order that never stops a worker is 'migrate, then upgrade the hosts'"; design.md: "an older
    attune-sensor runs on a newer own schema". It runs, but it places by the rule it knows:
    migration 3's affinity and version constraints are columns it never reads. During the
    rolling upgrade the new daemons' sync pass writes the platform's sensors pending, with
    their worker_affinity; an old daemon's failover pass (every daemon runs one) puts them on
    any worker with room, one the platform's required terms exclude, and starts them there."""
    old = previous_release(tmp_path)
    add_worker(spec_db_url, "w-zone-b", labels={"zone": "b"}, capacity=5)
    affinity = {"required": [{"match_labels": {"zone": "a"}, "match_expressions": []}]}
    query(spec_db_url, "INSERT INTO attune_sensor.assignment (sensor_ref, runtime, affinity, origin) "
                       "VALUES ('pack.only_in_zone_a', 'python', %s, 'platform')", (json.dumps(affinity),))
    # the new release leaves it pending: no worker of zone a
    scheduler, db = scheduler_for(spec_db_url)
    try:
        assert scheduler.reconcile()[1] == {}
    finally:
        db.close()
    # the previous release's failover pass, as each of its daemons runs it
    placed = json.loads(run_previous(old, spec_db_url, "print(json.dumps(scheduler.reconcile()[1]))"))
    assert placed == {}
    assert query(spec_db_url, "SELECT worker_id FROM attune_sensor.assignment") == [(None,)]
