"""Only our rows are ours, and a restart does not empty the worker that restarts.

The platform's own sensor service writes its row without meta (its INSERT leaves it NULL, its
UPDATE never touches it): the reaper leaves such a row to the platform's executor, placement
never uses it, `workers` says the platform runs it, and a daemon refuses its name while it is
live (docs/design.md, "Only our rows are ours"). A worker that registers, a new one or one back
from a restart, is brought to its share, a bounded number of moves per pass
(docs/scheduling.md, "Failover"). Real PostgreSQL, real daemons, both flavours where the
platform's rows can exist.
"""

import json
import signal

import pytest

from attune_sensor.db import Database, schema
from attune_sensor.placement.scheduler import NoEligibleWorker, Scheduler
from attune_sensor.worker.service import EVEN_OUT_MOVES_PER_PASS
from support import add_pending_sensors, config_for, query, run_cli, wait_for

PLATFORM_CAPABILITIES = {"runtimes": ["python", "shell"], "max_concurrent_sensors": 10, "sensor_version": "0.1.0",
                         "runtime_versions": {"python": ["3.11.2"]}, "detected_interpreters": []}


def write(url, sql, params=None):
    """As the platform's services write: the history trigger names worker_history unqualified."""
    return query(url, "SET search_path TO attune, public; " + sql, params)


def platform_row(url, name, heartbeat="now()", meta=None):
    """A sensor row as the platform's sensor service registers it (sensor_worker_registration.rs):
    no meta column in its INSERT."""
    write(url, "INSERT INTO attune.worker (name, worker_type, worker_role, host, status, capabilities, "
               f"last_heartbeat, meta) VALUES (%s, 'local', 'sensor', %s, 'active', %s, {heartbeat}, %s)",
          (name, "platform-host", json.dumps(PLATFORM_CAPABILITIES), None if meta is None else json.dumps(meta)))


def our_row(url, name, heartbeat="now()", capacity=10):
    capabilities = dict(PLATFORM_CAPABILITIES, max_concurrent_sensors=capacity, heartbeat_interval=1)
    write(url, "INSERT INTO attune.worker (name, worker_type, worker_role, host, status, capabilities, meta, "
               f"last_heartbeat) VALUES (%s, 'local', 'sensor', 'our-host', 'active', %s, %s, {heartbeat})",
          (name, json.dumps(capabilities), json.dumps({"instance_id": "i-" + name, "sensor_version": "x"})))


def row(url, name):
    rows = query(url, "SELECT status::text, meta FROM attune.worker WHERE name = %s", (name,))
    return rows[0] if rows else None


def test_the_reaper_leaves_the_platforms_sensor_rows_to_the_platform(attune_url, tmp_path, daemons):
    platform_row(attune_url, "sensor-platform-dead", heartbeat="now() - interval '1 day'")
    # reaped by an earlier attune-sensor: the marks it left do not make the row ours
    platform_row(attune_url, "sensor-platform-marked", heartbeat="now() - interval '1 day'",
                 meta={"reaped_at": "2026-11-01", "reaped_by": "old", "reaped_last_heartbeat": "2026-11-01"})
    our_row(attune_url, "sensor-ours-dead", heartbeat="now() - interval '1 day'")
    query(attune_url, "UPDATE attune_sensor.reaper_gate SET last_scan = '-infinity'")
    daemon = daemons(config_for(tmp_path, attune_url, "sensor-reaper"))
    daemon.wait_for_line("Marked stale worker sensor-ours-dead")
    assert row(attune_url, "sensor-ours-dead")[0] == "inactive"
    assert row(attune_url, "sensor-platform-dead") == ("active", None)  # untouched, no reaped_* in meta
    assert row(attune_url, "sensor-platform-marked")[0] == "active"
    assert "sensor-platform" not in "\n".join(line for line in daemon.lines if "Marked stale" in line)


def test_placement_never_uses_a_platform_row_and_moves_what_an_older_version_put_there(attune_url):
    platform_row(attune_url, "sensor-platform")
    db = Database(attune_url)
    try:
        scheduler = Scheduler(db, schema.attach(db))
        with pytest.raises(NoEligibleWorker, match="no live sensor worker"):
            scheduler.place("s.one", "python")
        # an earlier version placed a sensor on the platform's row; nothing there reads it
        platform_id = query(attune_url, "SELECT id FROM attune.worker WHERE name = 'sensor-platform'")[0][0]
        query(attune_url, "INSERT INTO attune_sensor.assignment (sensor_ref, runtime, worker_id, assigned_at) "
                          "VALUES ('s.stuck', 'python', %s, now())", (platform_id,))
        our_row(attune_url, "sensor-ours")
        released, placed = scheduler.reconcile()
        assert released == ["s.stuck"]
        assert placed == {"s.one": "sensor-ours", "s.stuck": "sensor-ours"}
        ours = query(attune_url, "SELECT id FROM attune.worker WHERE name = 'sensor-ours'")[0][0]
        mine, _ = scheduler.mine(ours)
        # the platform's row is nobody's previous worker: the sensor may start at once
        assert {m["sensor_ref"]: (m["startable"], m["previous_worker"]) for m in mine} == {
            "s.one": (True, None), "s.stuck": (True, None)}
        assert scheduler.place("s.two", "python") == "sensor-ours"
        assert query(attune_url, "SELECT worker_id FROM attune_sensor.worker_load") == [(ours,), (ours,)]
    finally:
        db.close()


def test_the_stranded_gauge_counts_sensors_on_a_platform_row(attune_url, tmp_path):
    platform_row(attune_url, "sensor-platform")
    query(attune_url, "INSERT INTO attune_sensor.assignment (sensor_ref, runtime, worker_id) "
                      "SELECT 's.stuck', 'python', id FROM attune.worker WHERE name = 'sensor-platform'")
    config = config_for(tmp_path, attune_url, "sensor-gauges")
    assert "attune_sensor_sensors_stranded 1" in run_cli("--config", config, "metrics").stdout.splitlines()


def test_a_live_platform_row_refuses_its_name_in_one_line(attune_url, tmp_path, daemons):
    platform_row(attune_url, "sensor-web01")
    before = query(attune_url, "SELECT xmin::text FROM attune.worker WHERE name = 'sensor-web01'")
    daemon = daemons(config_for(tmp_path, attune_url, "sensor-web01"))
    assert daemon.wait() == 78
    errors = [line for line in daemon.lines if "sensor-web01" in line and "platform's own sensor service" in line]
    assert len(errors) == 1 and "platform-host" in errors[0] and "sensor.worker_name" in errors[0], daemon.output
    assert "Traceback" not in daemon.output
    assert query(attune_url, "SELECT xmin::text FROM attune.worker WHERE name = 'sensor-web01'") == before


def test_workers_says_who_runs_each_row(attune_url, tmp_path, daemons):
    platform_row(attune_url, "sensor-platform")
    path = config_for(tmp_path, attune_url, "sensor-ours")
    daemon = daemons(path)
    daemon.wait_for_line("heartbeat: worker")
    listed = json.loads(run_cli("--config", path, "workers", "--json").stdout)["workers"]
    assert {w["name"]: w["by"] for w in listed} == {"sensor-ours": "attune-sensor", "sensor-platform": "platform"}
    lines = run_cli("--config", path, "workers").stdout.splitlines()
    assert any(line.startswith("sensor-platform ") and "active (platform)" in line for line in lines)
    assert any(line.startswith("sensor-ours ") and "(platform)" not in line for line in lines)


# --- a restart does not empty the worker that restarts ------------------------------------------

def held(url):
    rows = query(url, "SET search_path TO public, attune; SELECT w.name, count(a.sensor_ref) FROM worker AS w "
                      "LEFT JOIN attune_sensor.assignment AS a ON a.worker_id = w.id "
                      "WHERE w.status = 'active' GROUP BY w.name")
    return dict(rows)


def test_a_rolling_restart_leaves_every_worker_its_share(db_url, tmp_path, daemons):
    names = ["sensor-r1", "sensor-r2", "sensor-r3"]
    configs = {name: config_for(tmp_path, db_url, name, capabilities={"runtimes": ["shell"]},
                                max_concurrent_sensors=20) for name in names}
    add_pending_sensors(db_url, 12, "shell")
    running = {}
    for name in names:
        running[name] = daemons(configs[name])
        running[name].wait_for_line("heartbeat: worker")
    assert run_cli("rebalance", env={"DATABASE_URL": db_url, "ATTUNE_CONFIG": "/dev/null"}).returncode == 0
    wait_for(lambda: held(db_url) == dict.fromkeys(names, 4), 20, what="12 sensors even over 3 workers")
    for name in names:  # a rolling restart: each stops (and hands over) and comes back
        running[name].signal(signal.SIGTERM)
        assert running[name].wait() == 0
        running[name] = daemons(configs[name])
        running[name].wait_for_line("heartbeat: worker")
        wait_for(lambda: held(db_url) == dict.fromkeys(names, 4), 20,
                 what=f"every worker at its share after {name} restarted: {held(db_url)}")
    assert sum(held(db_url).values()) == 12
    assert "Sensors moved to even out the fleet after this worker registered: 4 moved" in running["sensor-r3"].output


def test_a_worker_back_from_a_restart_takes_its_share_a_bounded_number_of_moves_per_pass(db_url, tmp_path, daemons):
    count = 3 * EVEN_OUT_MOVES_PER_PASS  # 30: a share of 15 takes two passes
    configs = [config_for(tmp_path, db_url, name, capabilities={"runtimes": ["shell"]}, max_concurrent_sensors=40)
               for name in ("sensor-first", "sensor-second")]
    add_pending_sensors(db_url, count, "shell")
    first = daemons(configs[0])
    wait_for(lambda: held(db_url).get("sensor-first") == count, 20, what="all on the first worker")
    second = daemons(configs[1])
    second.wait_for_line("heartbeat: worker")
    # a new worker moves nothing (adding hosts is evened out by `rebalance`)
    assert held(db_url) == {"sensor-first": count, "sensor-second": 0} and "even out" not in second.output
    second.signal(signal.SIGTERM)
    assert second.wait() == 0
    second = daemons(configs[1])  # back: it takes its share, 10 moves a pass
    wait_for(lambda: held(db_url) == {"sensor-first": count // 2, "sensor-second": count // 2}, 20,
             what=f"an even fleet: {held(db_url)}")
    second.wait_for_line("Sensors moved to even out the fleet", count=2)  # logged just after the moves
    passes = [line for line in second.lines if "Sensors moved to even out the fleet" in line]
    moved = [int(line.split(": ")[-1].split(" moved")[0]) for line in passes]
    assert moved == [EVEN_OUT_MOVES_PER_PASS, count // 2 - EVEN_OUT_MOVES_PER_PASS], passes
    assert "more at the next beat" in passes[0] and "more at the next beat" not in passes[1]
    # planned moves: the first worker is their previous worker until it says it let them go
    first.wait_for_line("released sensor")
