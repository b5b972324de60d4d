"""A hostile operator's (or a compromised program's) run at the platform-sensor sync: rows of
the platform's tables written to break it, the daemon role abusing the SECURITY DEFINER write,
and the platform's own rules where the docs say attune-sensor reads them "exactly". Each test
here failed when it was written; each passes once its problem is fixed."""

import json

import psycopg2
import pytest

from support import attune_database, query, run_cli
from platform_db import add_runtime, add_sensor, add_worker, placed, sync


@pytest.fixture(params=["fixture", "platform"])
def platform_url(request, cluster, attune_templates):
    return attune_database(cluster, attune_templates(request.param))


# --- one hostile ref must cost only its own sensor -------------------------------------------


@pytest.mark.parametrize("char", ["\u0085", "\u009b"])  # NEL, CSI: C1 control characters
def test_a_ref_with_a_c1_control_character_costs_only_its_own_sensor(platform_url, char):
    """The platform's sensor.ref allows any character but '.' and upper case. The pass refuses
    refs with an ASCII control character (sensors._placement) but lets C1 controls through,
    which the assignment's CHECK (sensor_ref !~ '[[:cntrl:]]') then rejects: the one statement
    of the sync function fails and no platform sensor is added or removed anywhere, so a
    sensor the platform disabled keeps running on its worker for as long as that row exists."""
    url = platform_url
    python = add_runtime(url, "core.python", "Python", ["python"])
    add_worker(url, "w-1", capacity=10)
    add_sensor(url, "demo.fine", python, "core.python")
    add_sensor(url, f"demo.evil{char}x", python, "core.python")
    result = sync(url)
    assert result.returncode == 0, result.stderr
    assert placed(url).get("demo.fine") == ("w-1", "platform"), (result.stdout, result.stderr)
    assert "not placed demo.evil" in result.stdout


def test_a_c1_ref_does_not_keep_a_disabled_sensor_placed(platform_url):
    """The consequence that matters: once a hostile ref exists, disabling a sensor no longer
    removes it (its worker keeps running it)."""
    url = platform_url
    python = add_runtime(url, "core.python", "Python", ["python"])
    add_worker(url, "w-1", capacity=10)
    add_sensor(url, "demo.running", python, "core.python")
    assert sync(url).returncode == 0
    assert "demo.running" in placed(url)
    add_sensor(url, "demo.evil\u0085x", python, "core.python")
    query(url, "UPDATE sensor SET enabled = false WHERE ref = 'demo.running'")
    sync(url)
    assert "demo.running" not in placed(url)


# --- the SECURITY DEFINER write in the daemon role's hands ----------------------------------


def test_the_daemon_role_cannot_delete_a_manual_placement_through_the_sync_function(platform_url):
    """docs/design.md: the daemon role may delete no assignment; the SECURITY DEFINER function
    "deletes only platform placements". But it trusts its caller's `desired`: any daemon host
    (attune_sensor_daemon) can name a manual placement's ref in it (the function takes it over:
    origin becomes 'platform') and then call it again without it (the function deletes it).
    The function should decide from the platform's own rows which refs are platform sensors."""
    url = platform_url
    env = {"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"}
    add_worker(url, "w-1")
    assert run_cli("place", "ext.manual", "--runtime", "python", env=env).returncode == 0
    entry = json.dumps([{"sensor_ref": "ext.manual", "runtime": "python"}])
    query(url, "UPDATE attune_sensor.sync_gate SET pass_token = 'pass-1'")  # as a pass would have claimed it
    conn_sql = ("SET ROLE attune_sensor_daemon; "
                "SELECT * FROM attune_sensor.sync_platform_sensors(%s::jsonb, %s::text[], 'pass-1', 1)")
    assert query(url, conn_sql, (entry, None)) == [("ext.manual", "manual kept")]
    assert query(url, conn_sql, ("[]", [])) == []
    assert placed(url).get("ext.manual") == ("w-1", "manual")


def test_the_daemon_role_cannot_relabel_a_manual_placement_as_the_platforms(platform_url):
    """The same through the daemon role's UPDATE on every column of the assignments: it may set
    origin = 'platform' on a manual placement, and the next sync pass (any daemon's) deletes it."""
    url = platform_url
    env = {"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"}
    add_worker(url, "w-1")
    python = add_runtime(url, "core.python", "Python", ["python"])
    add_sensor(url, "demo.one", python, "core.python")
    assert run_cli("place", "ext.manual", "--runtime", "python", env=env).returncode == 0
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        query(url, "SET ROLE attune_sensor_daemon; "
                   "UPDATE attune_sensor.assignment SET origin = 'platform' WHERE sensor_ref = 'ext.manual'")
    assert sync(url).returncode == 0
    assert placed(url).get("ext.manual") == ("w-1", "manual")


# --- the platform's rules, "exactly" ------------------------------------------------------------


@pytest.mark.parametrize("constraint", ["3.12.x", "3.12.*", "3.x", "~3.12.X"])
def test_a_wildcard_version_constraint_places_as_the_platform_runs_it(platform_url, constraint):
    """semver 1.0.28 (the platform's Cargo.lock) reads '*', 'x' and 'X' as a wildcard part: the
    platform's parse_constraint makes "3.12.x" "~3.12.x", i.e. ~3.12, and runs the sensor on a
    3.12. rules.py's parser knows no wildcard and refuses the sensor on every worker."""
    url = platform_url
    python = add_runtime(url, "core.python", "Python", ["python"], versions=["3.12.1"])
    add_worker(url, "w-1", versions={"python": ["3.12.1"]})
    add_sensor(url, "demo.wild", python, "core.python", constraint=constraint)
    result = sync(url)
    assert result.returncode == 0, result.stderr
    assert "not placed demo.wild" not in result.stdout, result.stdout
    assert placed(url).get("demo.wild") == ("w-1", "platform")


def test_an_empty_version_constraint_is_a_constraint_to_the_platform(platform_url):
    """sensor_manager.rs's resolve_runtime_version tests `constraint.is_some()`: '' (or blanks)
    on a runtime with no registered version refuses to start the sensor. rules.versions_for
    reads a blank constraint as none at all and places the sensor."""
    url = platform_url
    python = add_runtime(url, "core.python", "Python", ["python"])  # no runtime_version rows
    add_worker(url, "w-1")
    add_sensor(url, "demo.blank", python, "core.python", constraint="")
    result = sync(url)
    assert result.returncode == 0, result.stderr
    assert "demo.blank" not in placed(url)
    assert "not placed demo.blank" in result.stdout


# --- many platform sensors: one pass must still get through ----------------------------------


def _bulk_sensors(url, count, blob=10):
    """`count` runnable sensors of core.python (pack `pk`), each with one trigger and one enabled
    rule whose trigger_params hold `blob` bytes: inserted in three statements, as a pack
    installation (or a hostile writer of the platform's tables) would."""
    runtime = add_runtime(url, "core.python", "Python", ["python"])
    has_pack = query(url, "SELECT to_regclass('pack') IS NOT NULL")[0][0]
    if has_pack:
        query(url, "INSERT INTO pack (ref, label, version) VALUES ('pk', 'pk', '1.0.0')")
    pack_column, pack_value = (", pack", ", (SELECT id FROM pack WHERE ref = 'pk')") if has_pack else ("", "")
    query(url, "INSERT INTO sensor (ref, pack_ref, label, entrypoint, runtime, runtime_ref, enabled) "
               "SELECT 'pk.s' || g, 'pk', 's' || g, 's.py', %s, 'core.python', true FROM generate_series(1, %s) g",
          (runtime, count))
    query(url, "INSERT INTO trigger (ref, pack_ref, label, sensor, sensor_ref) "
               "SELECT 'pk.t' || s.id, 'pk', 't' || s.id, s.id, s.ref FROM sensor s WHERE s.ref LIKE 'pk.s%%'")
    query(url, f"INSERT INTO rule (ref, pack_ref, label, action_ref, trigger, trigger_ref, trigger_params, "
               f"enabled{pack_column}) "
               f"SELECT 'pk.r' || t.id, 'pk', 'r' || t.id, 'core.echo', t.id, t.ref, "
               f"jsonb_build_object('blob', repeat('x', %s)), true{pack_value} FROM trigger t WHERE t.ref LIKE 'pk.t%%'",
          (blob,))


@pytest.fixture
def real_platform_url(cluster, attune_templates):
    """The platform's real migrations only (its indexes on trigger.sensor and rule.trigger)."""
    return attune_database(cluster, attune_templates("platform"))


def test_many_sensors_with_large_rule_parameters_do_not_stop_every_pass(real_platform_url):
    """Each sensor's ATTUNE_SENSOR_TRIGGERS may be up to 128 KiB, and the pass sends every
    runnable sensor's, every time, as ONE jsonb argument of the sync function. Over 256 MiB
    in all (about 2,050 such sensors; whoever may write rules can make them) that argument is
    refused ("total size of jsonb array elements exceeds the maximum of 268435455 bytes");
    well before that the single statement outlasts database.statement_timeout (5 s). Either
    way every pass of every daemon fails: nothing is added, changed or removed fleet-wide."""
    url = real_platform_url
    add_worker(url, "w-1", capacity=5000)
    _bulk_sensors(url, 2100, blob=130_000)
    query(url, "ANALYZE")
    # a generous statement bound, so that what fails is the argument itself, not its time
    result = run_cli("sync", env={"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null",
                                  "ATTUNE__DATABASE__STATEMENT_TIMEOUT": "120"}, timeout=300)
    assert result.returncode == 0, result.stderr[:500]
    assert "2100 platform sensor(s) runnable: 2100 added" in result.stdout
    assert query(url, "SELECT count(*) FROM attune_sensor.assignment WHERE worker_id IS NOT NULL")[0][0] == 2100


def test_a_pass_over_sensors_just_installed_gets_through(real_platform_url):
    """The read of the runnable sensors aggregates each sensor's rules in a LATERAL subquery. On
    rows just inserted (a pack installation, before autovacuum's ANALYZE: up to a minute, or
    never where autovacuum is off), the planner estimates a handful of sensors and scans the
    whole rule table once per sensor: 10,000 new sensors take minutes, so every pass ends at
    statement_timeout until the statistics arrive. (Measured: 20,000 sensors, 78 s unanalysed,
    0.5 s analysed.)"""
    url = real_platform_url
    add_worker(url, "w-1", capacity=20000)
    _bulk_sensors(url, 10000)
    result = run_cli("sync", env={"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"}, timeout=300)
    assert result.returncode == 0, result.stderr[:500]
    assert "10000 platform sensor(s) runnable: 10000 added" in result.stdout
