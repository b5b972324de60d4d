"""Rows that other programs wrote, holding anything: recorded intervals and capacities out of
every range or of the wrong type, a reaper gate and stored gauges set into the future (a clock
stepped back, or any role that may update them), gauges of the wrong shape. None of them may
stop a heartbeat, the reaper or a command of the fleet (docs/design.md, "Staleness", "Reaper",
"Fleet gauges")."""

import json

import pytest

from attune_sensor import config, fleet
from attune_sensor.db import schema
from attune_sensor.db import Database
from attune_sensor.errors import ConfigError
from attune_sensor.worker.registration import SensorWorkerRegistration
from attune_sensor.placement.scheduler import NoEligibleWorker, Scheduler
from support import config_for, query, run_cli, worker_row

INSERT = ("INSERT INTO worker (name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat) "
          "VALUES (%s, 'local', 'sensor', %s, 'active', %s, '{{}}', {})")


def add_row(url, name, capabilities, last_heartbeat="now()"):
    """A worker row as another program might write it: capabilities as raw JSON text (so numbers
    beyond float8, like 1e400, reach the database as they are)."""
    query(url, INSERT.format(last_heartbeat), (name, name, capabilities))


def cli(url, *args):
    return run_cli(*args, env={"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"})


def open_db(url):
    db = Database.from_config(config.load(None, {"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"}))
    return db, schema.attach(db)


# --- recorded heartbeat intervals ----------------------------------------------------------


HUGE_INTERVALS = ("1e12", "1e13", "1e308", "1e400")


def test_huge_recorded_intervals_stop_no_heartbeat_reap_or_command(db_url, tmp_path, daemons):
    for value in HUGE_INTERVALS:
        # live an hour ago: not stale once its interval is bounded to a day
        add_row(db_url, f"hostile-{value}", f'{{"heartbeat_interval": {value}, "runtimes": ["python"], '
                                            f'"max_concurrent_sensors": 5}}', "now() - interval '1 hour'")
    add_row(db_url, "hostile-old", '{"heartbeat_interval": 1e308}', "now() - interval '4 days'")
    add_row(db_url, "hostile-future", '{"heartbeat_interval": 1e308}', "'infinity'")
    add_row(db_url, "sensor-dead", '{"heartbeat_interval": 1}', "now() - interval '10 seconds'")
    daemon = daemons(config_for(tmp_path, db_url, "sensor-among-hostiles"))
    daemon.wait_for_line("Marked stale worker sensor-dead")
    daemon.wait_for_line("Marked stale worker hostile-old")
    beats = sum("heartbeat: worker" in line for line in daemon.lines)
    daemon.wait_for_line("heartbeat: worker", count=beats + 2)
    assert "heartbeat failed" not in daemon.output
    for value in HUGE_INTERVALS:
        assert worker_row(db_url, f"hostile-{value}")["status"] == "active"
    assert worker_row(db_url, "hostile-future")["status"] == "active"
    for command in (["workers"], ["workers", "--json"], ["workers", "--stale"], ["metrics"],
                    ["place", "s.hostile", "--runtime", "python"], ["rebalance"]):
        result = cli(db_url, *command)
        assert result.returncode == 0, (command, result.stderr)
    listed = {w["name"]: w for w in json.loads(cli(db_url, "workers", "--json").stdout)["workers"]}
    assert {listed[f"hostile-{v}"]["heartbeat_interval"] for v in HUGE_INTERVALS} == {86400}
    assert listed["hostile-future"]["heartbeat_age"] is None


@pytest.mark.parametrize("recorded, used", [
    ("1e308", 86400), ("1e400", 86400), ("86401", 86400), ("45", 45), ("1e-400", 0.1), ("0.01", 0.1),
    ("0", 30), ("-5", 30), ('"abc"', 30),
    ("true", 30), ("null", 30), ("[60]", 30), ('{"s": 60}', 30)])
def test_the_stale_rule_bounds_what_a_row_recorded(db_url, recorded, used):
    add_row(db_url, "recorded", f'{{"heartbeat_interval": {recorded}}}')
    db, table = open_db(db_url)
    try:
        [worker] = fleet.list_workers(db, 3.0, table=table)
        assert worker["heartbeat_interval"] == used
        reaped, _ = fleet.reap_stale(db, "me", 3.0, table)  # the reaper reads it without failing
        assert reaped == [] or used < 1
    finally:
        db.close()


def test_the_bound_is_what_config_accepts():
    environ = {"DATABASE_URL": "postgresql://x@localhost/x", "ATTUNE_CONFIG": "/dev/null"}
    for value in (schema.MAX_RECORDED_INTERVAL, schema.MIN_RECORDED_INTERVAL):
        config.load(None, dict(environ, ATTUNE__SENSOR__HEARTBEAT_INTERVAL=str(value)))
    for value in (schema.MAX_RECORDED_INTERVAL + 0.5, schema.MIN_RECORDED_INTERVAL / 2):
        with pytest.raises(ConfigError):
            config.load(None, dict(environ, ATTUNE__SENSOR__HEARTBEAT_INTERVAL=str(value)))


# --- capacity ------------------------------------------------------------------------------


CAPACITIES = {"1.5": 0, "3e9": 0, '"abc"': 0, "1e308": 0, "1e400": 0, "-1": 0, "true": 0, "null": 0,
              '"7"': 0, "1000001": 0, "2.0": 2, "7": 7, "0": 0}


def test_a_workers_capacity_is_one_whole_number_for_workers_metrics_and_placement(db_url):
    for n, value in enumerate(CAPACITIES):
        add_row(db_url, f"cap-{n}", f'{{"max_concurrent_sensors": {value}, "runtimes": ["python"], '
                                    '"heartbeat_interval": 30}')
    expected = {f"cap-{n}": capacity for n, capacity in enumerate(CAPACITIES.values())}
    listed = cli(db_url, "workers", "--json")
    assert listed.returncode == 0, listed.stderr
    output = json.loads(listed.stdout)
    assert {w["name"]: w["capacity"] for w in output["workers"]} == expected
    assert output["summary"]["capacity"] == sum(expected.values()) == 9
    metrics = cli(db_url, "metrics")
    assert metrics.returncode == 0 and "attune_sensor_capacity_sensors 9\n" in metrics.stdout + "\n"
    db, table = open_db(db_url)
    try:
        scheduler = Scheduler(db, table)
        placed = [scheduler.place(f"s.{n}", "python") for n in range(9)]
        with pytest.raises(NoEligibleWorker, match="full"):
            scheduler.place("s.one-too-many", "python")
    finally:
        db.close()
    # the 9 places of the two workers with a whole capacity, and no other
    assert sorted(placed) == sorted([name for name, capacity in expected.items() for _ in range(capacity)])


def test_runtimes_of_any_shape_are_listed_as_the_strings_they_hold(db_url):
    shapes = {'"python"': [], "5": [], '{"python": 1}': [], "null": [], '[1, null, {"x": 1}, "python", ["shell"]]': ["python"]}
    for n, value in enumerate(shapes):
        add_row(db_url, f"rt-{n}", f'{{"runtimes": {value}, "max_concurrent_sensors": 1, "heartbeat_interval": 30}}')
    assert cli(db_url, "workers").returncode == 0
    listed = cli(db_url, "workers", "--json")
    assert listed.returncode == 0, listed.stderr
    output = json.loads(listed.stdout)
    assert [w["runtimes"] for w in output["workers"]] == list(shapes.values())
    assert output["summary"]["runtimes"] == {"python": 1}


# --- the reaper's gate and the stored gauges in the future ---------------------------------


FUTURE = ("now() + interval '1 year'", "'infinity'")


@pytest.mark.parametrize("future", FUTURE)
def test_a_gate_set_into_the_future_opens_at_the_next_heartbeat(db_url, future):
    cfg = config.load(None, {"DATABASE_URL": db_url, "ATTUNE_CONFIG": "/dev/null"}).with_sensor(
        worker_name="gatekeeper", heartbeat_interval=30)
    db = Database.from_config(cfg)
    try:
        registration = SensorWorkerRegistration(db, cfg, ["shell"])
        registration.register()
        registration.reap_multiplier = 3.0
        query(db_url, f"UPDATE attune_sensor.reaper_gate SET last_scan = {future}, scanned_by = 'forger'")
        add_row(db_url, "dead-1", '{"heartbeat_interval": 1}', "now() - interval '1 minute'")
        beat = registration.heartbeat()
        assert beat.updated is True and [name for _, name, _ in beat.reaped] == ["dead-1"]
        # opened, it keeps its period again: the next dead row waits for the next period
        add_row(db_url, "dead-2", '{"heartbeat_interval": 1}', "now() - interval '1 minute'")
        beat = registration.heartbeat()
        assert beat.updated is True and beat.reaped == ()
        assert query(db_url, "SELECT scanned_by, last_scan <= now() FROM attune_sensor.reaper_gate") == \
            [("gatekeeper", True)]
    finally:
        db.close()


FORGED = {"active": {"sensor": 1000, "hybrid": 0}, "stale": 0, "reaped": 0, "max_heartbeat_lag": 0,
          "capacity": 1000, "runtimes": {"forged": 1000}}
MALFORMED = [
    "{}", "null", "[]", '"gauges"', '{"active": {"sensor": 1, "hybrid": 0}}',
    json.dumps(dict(FORGED, stale="abc")), json.dumps(dict(FORGED, active=[1, 2])),
    json.dumps(dict(FORGED, active={"sensor": 1, "hybrid": 0, "x": {}})),
    json.dumps(dict(FORGED, runtimes=["python"])), json.dumps(dict(FORGED, runtimes={"python": "1"})),
    json.dumps(dict(FORGED, capacity=-1)), json.dumps(dict(FORGED, reaped=[3])),
    json.dumps(FORGED).replace('"capacity": 1000', '"capacity": 1e400'),
]


# what the fleet of these tests holds: one live sensor worker, 'real'
ACTUAL = {"active": {"sensor": 1, "hybrid": 0}, "stale": 0, "reaped": 0, "capacity": 4, "runtimes": {"python": 1}}


def check_recomputed(gauges):
    assert {k: gauges[k] for k in ACTUAL} == ACTUAL
    assert 0 <= gauges["age"] < fleet.GAUGES_PERIOD and 0 <= gauges["max_heartbeat_lag"] < 60


@pytest.mark.parametrize("computed_at, gauges", [(f, json.dumps(FORGED)) for f in FUTURE]
                         + [("now()", g) for g in MALFORMED])
@pytest.mark.parametrize("locked", [False, True], ids=["free", "being-refreshed"])
def test_forged_or_malformed_gauges_are_recomputed(db_url, computed_at, gauges, locked):
    import psycopg2

    add_row(db_url, "real", '{"runtimes": ["python"], "max_concurrent_sensors": 4, "heartbeat_interval": 30}')
    query(db_url, f"UPDATE attune_sensor.fleet_gauges SET computed_at = {computed_at}, multiplier = 3, "
                  "gauges = %s::jsonb", (gauges,))
    locker = None
    if locked:  # another caller holds the row, as while it refreshes it: nobody may wait for it
        locker = psycopg2.connect(db_url)
        locker.cursor().execute("SELECT 1 FROM attune_sensor.fleet_gauges FOR UPDATE")
    db, table = open_db(db_url)
    try:
        check_recomputed(fleet.metrics(db, 3.0, table))
        if not locked:  # and stored: the next caller reads them
            assert query(db_url, "SELECT computed_at <= now() FROM attune_sensor.fleet_gauges") == [(True,)]
            check_recomputed(fleet.metrics(db, 3.0, table))
    finally:
        db.close()
        if locker is not None:
            locker.rollback()
            locker.close()
    result = cli(db_url, "metrics")
    assert result.returncode == 0, result.stderr
    assert "forged" not in result.stdout and 'attune_sensor_workers_active{role="sensor"} 1' in result.stdout


def test_the_workers_a_fenced_out_heartbeat_reaped_are_logged_and_their_sensors_moved(db_url):
    """A heartbeat whose fence missed (another write to its row came first) still ran its reap:
    the workers it marked inactive come back with it, so they are logged and failed over."""
    query(db_url, "SET search_path TO public, attune; "
                  "INSERT INTO worker (name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat) "
                  "VALUES ('dead-one', 'local', 'sensor', 'h', 'active', '{\"heartbeat_interval\": 1}', "
                  "'{\"instance_id\": \"x\"}', now() - interval '1 hour'); "
                  "UPDATE attune_sensor.reaper_gate SET last_scan = '-infinity'")
    cfg = config.load(None, {"DATABASE_URL": db_url, "ATTUNE_CONFIG": "/dev/null"}).with_sensor(worker_name="fenced-reaper")
    db = Database.from_config(cfg)
    try:
        registration = SensorWorkerRegistration(db, cfg, ["shell"])
        registration.register()
        registration.reap_multiplier = 3.0
        # someone else writes our row (a cordon, say): the next beat's fence misses
        query(db_url, "SET search_path TO public, attune; UPDATE worker SET host = host WHERE name = 'fenced-reaper'")
        beat = registration.heartbeat()
        assert beat.updated is True  # adopted, then beaten with the new fence
        assert [name for _, name, _ in beat.reaped] == ["dead-one"]
    finally:
        db.close()


def test_a_heartbeat_that_raises_after_its_reap_carries_the_workers_it_reaped(db_url):
    """Another program rewrote our row (ForeignWriter, the daemon stops): the reap of the same
    heartbeat committed all the same, and the exception says whom it marked."""
    from attune_sensor.errors import ForeignWriter
    from attune_sensor.worker.registration import partial_heartbeat

    query(db_url, "SET search_path TO public, attune; "
                  "INSERT INTO worker (name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat) "
                  "VALUES ('dead-two', 'local', 'sensor', 'h', 'active', '{\"heartbeat_interval\": 1}', "
                  "'{\"instance_id\": \"x\"}', now() - interval '1 hour'); "
                  "UPDATE attune_sensor.reaper_gate SET last_scan = '-infinity'")
    cfg = config.load(None, {"DATABASE_URL": db_url, "ATTUNE_CONFIG": "/dev/null"}).with_sensor(worker_name="rewritten")
    db = Database.from_config(cfg)
    try:
        registration = SensorWorkerRegistration(db, cfg, ["shell"])
        registration.register()
        registration.reap_multiplier = 3.0
        query(db_url, "SET search_path TO public, attune; "
                      "UPDATE worker SET host = 'elsewhere' WHERE name = 'rewritten'")
        with pytest.raises(ForeignWriter) as raised:
            registration.heartbeat()
        assert [name for _, name, _ in partial_heartbeat(raised.value).reaped] == ["dead-two"]
        assert worker_row(db_url, "dead-two")["status"] == "inactive"
    finally:
        db.close()
