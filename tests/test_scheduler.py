"""Sensor placement on a real PostgreSQL, both flavours: eligibility, least-loaded balance,
capacity under concurrent placers, pending sensors, and failover after a kill -9."""

import json
import signal
import subprocess
import sys
import threading

import psycopg2

from attune_sensor.db import schema
from attune_sensor.db import Database
from attune_sensor.placement.scheduler import PLACEMENT_LOCK_KEY, NoEligibleWorker, Scheduler
from platform_db import loads_by_worker
from support import ATTUNE_SENSOR, add_pending_sensors, base_env, config_for, query, run_cli, wait_for


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


PLACER = ("import sys\nfrom attune_sensor import config\nfrom attune_sensor.db import Database, schema\n"
          "from attune_sensor.placement.scheduler import Scheduler, NoEligibleWorker\n"
          "cfg = config.load(None, {'DATABASE_URL': sys.argv[1], 'ATTUNE_CONFIG': '/dev/null'})\n"
          "db = Database.from_config(cfg); s = Scheduler(db, schema.attach(db)); p = int(sys.argv[2])\n")


def run_placers(url, count, body):
    """`count` processes at once, each running PLACER then `body` (its number is `p`, its
    Scheduler `s`); [(ref, worker)] of the lines they print as "ref worker"."""
    placers = [subprocess.Popen([sys.executable, "-c", PLACER + body, url, str(p)], env=base_env(),
                                stdout=subprocess.PIPE, text=True) for p in range(count)]
    outputs = [p.communicate(timeout=120)[0] for p in placers]
    assert all(p.returncode == 0 for p in placers)
    return [tuple(line.split()) for out in outputs for line in out.splitlines()]


def test_concurrent_placers_never_overfill_a_worker_or_place_a_sensor_twice(db_url):
    for n in range(10):  # ten workers filling up: ten times the placers race for a last place
        add_worker(db_url, f"cap-{n}", capacity=10)
    said = run_placers(db_url, 12, "for i in range(80):\n"
                                   "    ref = f's.{i % 40}.{p % 4}'\n"  # placers overlap on the same refs
                                   "    try: print(ref, s.place(ref, 'python'))\n"
                                   "    except NoEligibleWorker: pass\n")
    loads = loads_by_worker(db_url)
    assert all(load <= 10 for load in loads.values()) and sum(loads.values()) == 100, loads
    refs = query(db_url, "SELECT count(*), count(DISTINCT sensor_ref) FROM attune_sensor.assignment")[0]
    assert refs == (160, 160)  # 40 x 4 distinct refs: 100 placed, 60 pending, none twice
    assert load_mismatches(db_url) == []
    # every placer that placed a ref, first or not, said where it is
    placed = assignments(db_url)
    assert said and [(ref, worker) for ref, worker in said if placed[ref] != worker] == []


def test_placement_is_right_whatever_isolation_the_database_defaults_to(db_url):
    """A DBA's `default_transaction_isolation = 'repeatable read'` on the database: placement
    reads after taking its locks, so its statements run at READ COMMITTED whatever the default.
    Before, concurrent placers failed with "could not serialize access" (about one placement in
    eight with six placers)."""
    query(db_url, query(db_url, "SELECT format('ALTER DATABASE %I SET default_transaction_isolation = %L', "
                                "current_database(), 'repeatable read')")[0][0])
    for n in range(3):
        add_worker(db_url, f"rr-{n}", capacity=20)
    said = run_placers(db_url, 6, "for i in range(10): print(f's.{p}.{i}', s.place(f's.{p}.{i}', 'python'))\n")
    assert len(said) == 60 and sorted(loads_by_worker(db_url).values()) == [20, 20, 20]
    assert load_mismatches(db_url) == []


def test_placers_running_together_still_choose_the_least_loaded_worker(db_url):
    for n in range(4):
        add_worker(db_url, f"even-{n}", capacity=1000)
    run_placers(db_url, 12, "for i in range(25): s.place(f's.{p}.{i}', 'python')\n")
    # each placement went to a worker that was the least loaded when it was written
    assert sorted(loads_by_worker(db_url).values()) == [75, 75, 75, 75]


def test_a_worker_another_placer_is_writing_to_is_waited_for_not_called_full(db_url):
    add_worker(db_url, "only", capacity=60)  # every placer wants this worker at the same moment
    said = run_placers(db_url, 12, "for i in range(5): print(f's.{p}.{i}', s.place(f's.{p}.{i}', 'python'))\n")
    assert len(said) == 60 and assignments(db_url, "--pending") == {}
    assert loads_by_worker(db_url) == {"only": 60}


def test_place_and_a_failover_pass_together_never_overfill_a_worker(db_url):
    for n in range(5):
        add_worker(db_url, f"both-{n}", capacity=8)
    add_pending_sensors(db_url, 300, "python", prefix="pending.")
    run_placers(db_url, 8, "if p < 2:\n"
                           "    for _ in range(20): s.reconcile(limit=20)\n"  # a daemon's failover passes
                           "else:\n"
                           "    for i in range(30):\n"
                           "        try: s.place(f'new.{p}.{i}', 'python')\n"
                           "        except NoEligibleWorker: pass\n")
    loads = loads_by_worker(db_url)
    assert loads == {f"both-{n}": 8 for n in range(5)}, loads
    assert load_mismatches(db_url) == []


def test_place_waits_for_a_failover_pass_that_holds_the_placement_lock(db_url):
    add_worker(db_url, "last-place", capacity=1)
    add_pending_sensors(db_url, 1, "python", prefix="failover.")
    db = Database(db_url)
    scheduler = Scheduler(db, schema.attach(db))
    scheduler.sync()  # a long-lived placer that synced a moment ago: the next `place` is one call
    outcome = []
    placing = threading.Thread(target=lambda: outcome.append(_place_or_why(scheduler, "s.new")))
    # a failover pass mid-batch: the placement lock held, the worker's last place taken, not committed
    conn = psycopg2.connect(db_url)
    try:
        cursor = conn.cursor()
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (PLACEMENT_LOCK_KEY,))
        cursor.execute("SELECT set_config('search_path', 'public, attune', true), "
                       "attune_sensor.place_queued('failover.1', 3.0)")
        assert cursor.fetchone()[1] == "last-place"
        placing.start()
        wait_for(lambda: query(db_url, "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory' "
                                       "AND query LIKE '%%place_sensor%%'")[0][0] == 1,
                 30, what="`place` waiting for the placement lock")
    finally:
        conn.commit()
        conn.close()
        placing.join(60)
        db.close()
    assert "full" in outcome[0]  # it saw the pass's placement once it was written
    assert loads_by_worker(db_url) == {"last-place": 1}


def test_a_worker_another_placement_is_writing_to_waits_for_it(db_url):
    add_worker(db_url, "one", capacity=1)
    db = Database(db_url)
    scheduler = Scheduler(db, schema.attach(db))
    scheduler.sync()
    outcome = []
    placing = threading.Thread(target=lambda: outcome.append(_place_or_why(scheduler, "s.new")))
    # another `place` mid-write: it holds the worker's claim and wrote its last place, not committed
    conn = psycopg2.connect(db_url)
    try:
        cursor = conn.cursor()
        cursor.execute("SELECT set_config('search_path', 'public, attune', true), "
                       "pg_advisory_xact_lock_shared(%s), attune_sensor.claim(w.id) FROM worker AS w "
                       "WHERE w.name = 'one'", (PLACEMENT_LOCK_KEY,))
        assert cursor.fetchone()[2] is True
        cursor.execute("INSERT INTO attune_sensor.assignment (sensor_ref, runtime, worker_id, assigned_at) "
                       "SELECT 'other.1', 'python', id, now() FROM worker WHERE name = 'one'")
        placing.start()
        # it neither writes the worker too nor calls the sensor pending: it waits for the other
        wait_for(lambda: query(db_url, "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory' "
                                       "AND query LIKE '%%place_sensor%%'")[0][0] == 1,
                 30, what="`place` waiting for the other placement")
        assert outcome == []
    finally:
        conn.commit()
        conn.close()
        placing.join(60)
        db.close()
    assert "full" in outcome[0]
    assert loads_by_worker(db_url) == {"one": 1}


def _place_or_why(scheduler, ref):
    try:
        return scheduler.place(ref, "python")
    except NoEligibleWorker as exc:
        return str(exc)


def test_a_sensor_leaving_a_worker_puts_it_first_again(db_url):
    for name in ("left", "mid", "right"):
        add_worker(db_url, name, capacity=10)
    db = Database(db_url)
    try:
        scheduler = Scheduler(db, schema.attach(db), clock=lambda: 1000.0)  # one sync, at its first placement
        placed = {f"s.{n}": scheduler.place(f"s.{n}", "python") for n in range(7)}  # 3, 2, 2: ties go first
        on_left = sorted(ref for ref, worker in placed.items() if worker == "left")
        assert len(on_left) == 3
        for ref in on_left[:2]:
            assert scheduler.unplace(ref)
        # "left" holds one now, the others two: the next sensor goes there
        assert scheduler.place("s.next", "python") == "left"
    finally:
        db.close()


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


def test_a_long_lived_scheduler_puts_a_worker_that_joined_first_once_it_syncs(db_url):
    add_worker(db_url, "busy-1", capacity=10)
    add_worker(db_url, "busy-2", capacity=10)
    db = Database(db_url)
    now = [1000.0]
    try:
        scheduler = Scheduler(db, schema.attach(db), clock=lambda: now[0])
        assert {scheduler.place(f"s.{n}", "python") for n in range(4)} == {"busy-1", "busy-2"}
        add_worker(db_url, "joined", capacity=10)
        assert scheduler.place("s.4", "python") in ("busy-1", "busy-2")  # not synced yet: walks what it knows
        now[0] += 11  # past the sync period: the next placement syncs first
        assert scheduler.place("s.5", "python") == "joined"
        assert scheduler.place("s.6", "python") == "joined"
    finally:
        db.close()


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
