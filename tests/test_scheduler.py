"""Sensor placement on a real PostgreSQL, both flavours: eligibility, least-loaded balance,
capacity under concurrent placers, pending sensors, and failover after a kill -9."""

import json
import signal
import subprocess
import sys

from attune_sensor.db import schema
from attune_sensor.db import Database
from attune_sensor.placement.scheduler import Scheduler
from support import add_pending_sensors, base_env, config_for, query, run_cli, wait_for


def add_worker(url, name, runtimes=("python", "shell"), capacity=3, labels=None, taints=None, **columns):
    capabilities = {"runtimes": list(runtimes), "max_concurrent_sensors": capacity, "heartbeat_interval": 30}
    if labels:
        capabilities["labels"] = labels
    if taints:
        capabilities["taints"] = taints
    query(url, "INSERT INTO worker (name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat) "
               "VALUES (%s, 'local', 'sensor', %s, %s, %s, '{}', now())",
          (name, name, columns.get("status", "active"), json.dumps(capabilities)))


def load_mismatches(url):
    """Workers whose counted load (attune_sensor.worker_load, kept by a trigger) differs from
    the sensors actually assigned to them."""
    return query(url, "SELECT coalesce(l.worker_id, a.worker_id), l.load, a.n FROM attune_sensor.worker_load l "
                      "FULL JOIN (SELECT worker_id, count(*) AS n FROM attune_sensor.assignment "
                      "           WHERE worker_id IS NOT NULL GROUP BY worker_id) a ON a.worker_id = l.worker_id "
                      "WHERE coalesce(l.load, 0) <> coalesce(a.n, 0)")


def place(url, ref, *options):
    return run_cli("place", ref, *options, env={"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"})


def assignments(url, *options):
    result = run_cli("assignments", "--json", *options, env={"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"})
    assert result.returncode == 0, result.stderr
    return {a["sensor_ref"]: a["worker"] for a in json.loads(result.stdout)}


def test_placement_follows_runtime_labels_taints_and_load(db_url):
    add_worker(db_url, "py-eu", labels={"zone": "eu-west"})
    add_worker(db_url, "py-us", labels={"zone": "us-east"})
    add_worker(db_url, "node-eu", runtimes=("node",), labels={"zone": "eu-west"})
    add_worker(db_url, "gpu-eu", labels={"zone": "eu-west"}, taints=[{"key": "gpu", "effect": "no_schedule"}])
    add_worker(db_url, "gone", status="inactive")
    assert place(db_url, "s.node", "--runtime", "node").stdout.strip() == "node-eu"
    assert place(db_url, "s.eu1", "--runtime", "python", "--selector", "zone=eu-west").stdout.strip() == "py-eu"
    # least loaded next: py-eu has one, so the tainted gpu-eu only when tolerated
    assert place(db_url, "s.eu2", "--runtime", "python", "--selector", "zone=eu-west").stdout.strip() == "py-eu"
    assert place(db_url, "s.gpu", "--runtime", "python", "--selector", "zone=eu-west",
                 "--tolerate", "gpu").stdout.strip() == "gpu-eu"
    # placing again changes nothing
    assert place(db_url, "s.eu1", "--runtime", "python", "--selector", "zone=eu-west").stdout.strip() == "py-eu"
    refused = place(db_url, "s.ruby", "--runtime", "ruby")
    assert refused.returncode == 1 and "no schedulable worker offers runtime 'ruby'" in refused.stderr
    assert assignments(db_url, "--pending") == {"s.ruby": None}


def test_a_full_fleet_keeps_sensors_pending_until_capacity_appears(db_url, tmp_path, daemons):
    add_worker(db_url, "small", capacity=1)
    assert place(db_url, "s.1", "--runtime", "python").returncode == 0
    full = place(db_url, "s.2", "--runtime", "python")
    assert full.returncode == 1 and "full" in full.stderr
    # a new worker registers: the daemon places what is pending
    daemon = daemons(config_for(tmp_path, db_url, "sensor-new", capabilities={"runtimes": ["python"]}))
    daemon.wait_for_line("heartbeat: worker")
    wait_for(lambda: assignments(db_url).get("s.2") == "sensor-new", 10, what="the pending sensor placed")


def test_concurrent_placers_never_overfill_a_worker_or_place_a_sensor_twice(db_url):
    for n in range(10):  # ten workers filling up: ten times the placers race for a last place
        add_worker(db_url, f"cap-{n}", capacity=10)
    script = ("import sys\nfrom attune_sensor import config\nfrom attune_sensor.db import Database, schema\n"
              "from attune_sensor.placement.scheduler import Scheduler, NoEligibleWorker\n"
              "cfg = config.load(None, {'DATABASE_URL': sys.argv[1], 'ATTUNE_CONFIG': '/dev/null'})\n"
              "db = Database.from_config(cfg); s = Scheduler(db, schema.attach(db))\n"
              "for i in range(80):\n"
              "    ref = f's.{i % 40}.{int(sys.argv[2]) % 4}'\n"  # placers overlap on the same refs
              "    try: s.place(ref, 'python')\n"
              "    except NoEligibleWorker: pass\n")
    placers = [subprocess.Popen([sys.executable, "-c", script, db_url, str(p)], env=base_env()) for p in range(12)]
    assert all(p.wait(120) == 0 for p in placers)
    loads = dict(query(db_url, "SELECT w.name, count(a.*) FROM worker w LEFT JOIN attune_sensor.assignment a "
                               "ON a.worker_id = w.id GROUP BY w.name"))
    assert all(load <= 10 for load in loads.values()) and sum(loads.values()) == 100, loads
    refs = query(db_url, "SELECT count(*), count(DISTINCT sensor_ref) FROM attune_sensor.assignment")[0]
    assert refs == (160, 160)  # 40 x 4 distinct refs: 100 placed, 60 pending, none twice
    assert load_mismatches(db_url) == []


def test_a_killed_workers_sensors_move_to_the_living(db_url, tmp_path, daemons):
    survivor = daemons(config_for(tmp_path, db_url, "sensor-survivor", heartbeat_interval=1,
                                  capabilities={"runtimes": ["python"]}, max_concurrent_sensors=10))
    doomed = daemons(config_for(tmp_path, db_url, "sensor-doomed2", heartbeat_interval=1,
                                capabilities={"runtimes": ["python"]}, max_concurrent_sensors=10))
    for daemon in (survivor, doomed):
        daemon.wait_for_line("heartbeat: worker")
    for n in range(6):
        assert place(db_url, f"s.{n}", "--runtime", "python").returncode == 0
    before = assignments(db_url)
    assert set(before.values()) == {"sensor-survivor", "sensor-doomed2"}
    doomed.proc.send_signal(signal.SIGKILL)
    doomed.wait()
    # once it is stale (3 s), open the fleet's reaper gate: how soon the gate lets a scan
    # through is test_fleet.py's matter, what happens to the sensors of a reaped worker is this one's
    wait_for(lambda: query(db_url, "SET search_path TO public, attune; SELECT now() - last_heartbeat > "
                                   "interval '3.2 s' FROM worker WHERE name = 'sensor-doomed2'")[0][0], 10,
             what="the killed worker stale")
    query(db_url, "UPDATE attune_sensor.reaper_gate SET last_scan = '-infinity'")
    wait_for(lambda: set(assignments(db_url).values()) == {"sensor-survivor"}, 25,
             what="the killed worker's sensors re-placed")
    after = assignments(db_url)
    assert sorted(after) == sorted(before)  # none lost, none twice
    assert load_mismatches(db_url) == []
    survivor.wait_for_line("re-placed")


def test_unplace_forgets_and_says_when_there_was_nothing(db_url):
    add_worker(db_url, "w1")
    assert place(db_url, "s.x", "--runtime", "python").returncode == 0
    env = {"DATABASE_URL": db_url, "ATTUNE_CONFIG": "/dev/null"}
    assert run_cli("unplace", "s.x", env=env).returncode == 0
    again = run_cli("unplace", "s.x", env=env)
    assert again.returncode == 1 and "not placed" in again.stderr
    assert assignments(db_url) == {}


def test_the_worker_logs_its_sensors_and_keeps_a_file_for_its_runtime(db_url, tmp_path, daemons):
    path = config_for(tmp_path, db_url, "sensor-side", capabilities={"runtimes": ["python"]})
    daemon = daemons(path, env={"RUNTIME_DIRECTORY": tmp_path})
    daemon.wait_for_line("heartbeat: worker")
    assert place(db_url, "s.mine", "--runtime", "python").stdout.strip() == "sensor-side"
    # a reload reads the assignments at once; the periodic read's cadence is in test_service.py
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_line("assigned sensor s.mine (runtime python)", timeout=5)
    document = json.loads(open(f"{tmp_path}/assignments-sensor-side.json").read())
    assert document["worker"] == "sensor-side" and [s["sensor_ref"] for s in document["sensors"]] == ["s.mine"]
    mine = run_cli("--config", path, "assignments", "--mine", "--json")
    assert [a["sensor_ref"] for a in json.loads(mine.stdout)] == ["s.mine"]
    check = run_cli("--config", path, "check")
    assert check.returncode == 0 and "1 of 10 sensors placed" in check.stdout
    assert "1/10" in run_cli("--config", path, "workers").stdout
    assert run_cli("unplace", "s.mine", env={"DATABASE_URL": db_url, "ATTUNE_CONFIG": "/dev/null"}).returncode == 0
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_line("released sensor s.mine", timeout=5)
    assert json.loads(open(f"{tmp_path}/assignments-sensor-side.json").read())["sensors"] == []


def test_a_worker_that_stops_hands_its_sensors_to_the_others(db_url, tmp_path, daemons):
    staying = daemons(config_for(tmp_path, db_url, "sensor-stays", capabilities={"runtimes": ["python"]}))
    leaving = daemons(config_for(tmp_path, db_url, "sensor-leaves", capabilities={"runtimes": ["python"]}))
    for daemon in (staying, leaving):
        daemon.wait_for_line("heartbeat: worker")
    for n in range(4):
        assert place(db_url, f"s.{n}", "--runtime", "python").returncode == 0
    assert set(assignments(db_url).values()) == {"sensor-stays", "sensor-leaves"}
    leaving.signal(signal.SIGTERM)
    assert leaving.wait() == 0
    assert set(assignments(db_url).values()) == {"sensor-stays"}  # at once, not after a reaper pass
    assert "Sensors re-placed after this worker stopped" in leaving.output


def test_rebalance_evens_out_new_workers_moving_as_few_as_it_can(db_url):
    add_worker(db_url, "old-1", capacity=10)
    for n in range(8):
        assert place(db_url, f"s.{n}", "--runtime", "python").stdout.strip() == "old-1"
    add_worker(db_url, "new-1", capacity=10)
    add_worker(db_url, "new-2", capacity=10)
    add_worker(db_url, "node-only", runtimes=("node",), capacity=10)  # not eligible for these sensors
    result = run_cli("rebalance", env={"DATABASE_URL": db_url, "ATTUNE_CONFIG": "/dev/null"})
    assert result.returncode == 0, result.stderr
    loads = {}
    for worker in assignments(db_url).values():
        loads[worker] = loads.get(worker, 0) + 1
    assert sorted(loads.values()) == [2, 3, 3] and "node-only" not in loads  # 8 over three: the most even
    assert "5 sensor(s) moved" in result.stdout  # and exactly the 5 moves that takes
    assert load_mismatches(db_url) == []
    again = run_cli("rebalance", env={"DATABASE_URL": db_url, "ATTUNE_CONFIG": "/dev/null"})
    assert "0 sensor(s) moved" in again.stdout


def test_a_long_lived_scheduler_finds_a_worker_that_joined_since_its_last_sync(db_url):
    add_worker(db_url, "first", capacity=1)
    db = Database(db_url)
    now = [1000.0]
    try:
        scheduler = Scheduler(db, schema.attach(db), clock=lambda: now[0])
        assert scheduler.place("s.a", "python") == "first"
        add_worker(db_url, "second", capacity=1)
        now[0] += 2  # within the sync period (10 s), past the retry delay (1 s)
        assert scheduler.place("s.b", "python") == "second"  # not pending: it synced and walked again
    finally:
        db.close()


def test_the_counter_is_built_from_sensors_placed_before_it_existed(db_url):
    add_worker(db_url, "older")
    for ref in ("s.1", "s.2"):
        assert place(db_url, ref, "--runtime", "python").returncode == 0
    # a database set up by a version without the counter
    query(db_url, "DROP FUNCTION attune_sensor.count_worker_load() CASCADE; DROP TABLE attune_sensor.worker_load")
    refused = place(db_url, "s.3", "--runtime", "python")
    assert refused.returncode != 0 and "attune_sensor.worker_load" in refused.stderr
    assert "run 'attune-sensor migrate run'" in refused.stderr
    assert run_cli("migrate", "run", env={"DATABASE_URL": db_url, "ATTUNE_CONFIG": "/dev/null"}).returncode == 0
    # the first placement syncs: the counter is built from the assignments already there
    assert place(db_url, "s.3", "--runtime", "python").stdout.strip() == "older"
    assert load_mismatches(db_url) == []
    assert query(db_url, "SELECT runtime, load FROM attune_sensor.worker_load ORDER BY runtime") == \
        [("python", 3), ("shell", 3)]


def test_a_placement_pass_out_of_time_leaves_the_rest_for_the_next(db_url):
    add_pending_sensors(db_url, 250, "python")
    add_worker(db_url, "big", capacity=300)
    db = Database(db_url)
    try:
        scheduler = Scheduler(db, schema.attach(db))
        passes = []
        while True:
            _, placed = scheduler.reconcile(budget=0)  # no time at all: one batch per pass
            passes.append((len(placed), scheduler.unfinished))
            if not scheduler.unfinished:
                break
    finally:
        db.close()
    assert passes == [(100, True), (100, True), (50, False)]
    assert set(assignments(db_url).values()) == {"big"} and len(assignments(db_url)) == 250
    assert load_mismatches(db_url) == []
