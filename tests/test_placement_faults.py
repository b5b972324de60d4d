"""Placement under faults and changes, on a real PostgreSQL, both flavours: a failover pass that
failed is retried, a deleted worker's sensors are found, a pass never brings back an unplaced
sensor, capacity and eligibility that appear are used, a worker keeps only what it may run,
a conflicting `place` is refused, and the load counter only orders."""

import json
import signal
import threading
import time

import psycopg2
import pytest

from attune_sensor import fleet
from attune_sensor.db import schema
from attune_sensor.db import Database
from attune_sensor.placement.scheduler import PLACEMENT_LOCK_KEY, Scheduler
from support import add_pending_sensors, config_for, query, run_cli, write_config, wait_for
from test_scheduler import add_worker, assignments, load_mismatches, place

CLI_ENV = {"ATTUNE_CONFIG": "/dev/null"}


def scheduler_for(url):
    db = Database(url)
    return Scheduler(db, schema.attach(db)), db


def worker_id(url, name):
    return query(url, "SET search_path TO public, attune; SELECT id FROM worker WHERE name = %s", (name,))[0][0]


def previous_workers(url):
    return dict(query(url, "SELECT sensor_ref, previous_worker_id FROM attune_sensor.assignment"))


def has_cordon(url):
    return bool(query(url, "SET search_path TO public, attune; SELECT 1 FROM information_schema.columns "
                           "WHERE table_name = 'worker' AND column_name = 'cordoned'"))


def hold_placement_lock(url, seconds):
    """Another session holds the placement lock for `seconds` (a stuck placer)."""
    conn = psycopg2.connect(url)
    cursor = conn.cursor()
    cursor.execute("SELECT pg_advisory_xact_lock(%s)", (PLACEMENT_LOCK_KEY,))

    def release():
        time.sleep(seconds)
        conn.rollback()
        conn.close()

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    return thread


def test_a_failed_failover_pass_is_tried_again_by_a_later_pass(db_url, tmp_path, daemons):
    survivor = daemons(config_for(tmp_path, db_url, "sensor-stays", heartbeat_interval=1,
                                  capabilities={"runtimes": ["python"]}, max_concurrent_sensors=10))
    doomed = daemons(config_for(tmp_path, db_url, "sensor-dies", heartbeat_interval=1,
                                capabilities={"runtimes": ["python"]}, max_concurrent_sensors=10))
    for daemon in (survivor, doomed):
        daemon.wait_for_line("heartbeat: worker")
    for n in range(6):
        assert place(db_url, f"s.{n}", "--runtime", "python").returncode == 0
    assert set(assignments(db_url).values()) == {"sensor-stays", "sensor-dies"}
    doomed.proc.kill()
    doomed.wait()
    wait_for(lambda: query(db_url, "SET search_path TO public, attune; SELECT now() - last_heartbeat > "
                                   "interval '3.2 s' FROM worker WHERE name = 'sensor-dies'")[0][0], 10,
             what="the killed worker stale")
    holder = hold_placement_lock(db_url, 15)
    query(db_url, "UPDATE attune_sensor.reaper_gate SET last_scan = '-infinity'")
    survivor.wait_for_line("Marked stale worker sensor-dies", timeout=15)
    survivor.wait_for_line("skipped", timeout=15)
    holder.join()
    # no unrelated event: the next passes find the stranded sensors
    wait_for(lambda: set(assignments(db_url).values()) == {"sensor-stays"}, 30,
             what="the dead worker's sensors re-placed after the lock was released")
    assert sorted(assignments(db_url)) == [f"s.{n}" for n in range(6)]
    assert load_mismatches(db_url) == []


def test_a_deleted_workers_sensors_are_pending_and_placed(db_url, tmp_path, daemons):
    daemon = daemons(config_for(tmp_path, db_url, "sensor-alive", capabilities={"runtimes": ["python"]},
                                max_concurrent_sensors=10))
    daemon.wait_for_line("heartbeat: worker")
    add_worker(db_url, "by-hand", runtimes=("python",), capacity=10, labels={"hand": "yes"})
    for n in range(3):
        assert place(db_url, f"h.{n}", "--runtime", "python", "--selector", "hand=yes").stdout.strip() == "by-hand"
    query(db_url, "SET search_path TO public, attune; DELETE FROM worker WHERE name = 'by-hand'")
    # what `assignments` calls pending, `--pending` lists too
    assert assignments(db_url, "--pending") == {f"h.{n}": None for n in range(3)}
    # the label is gone with the worker: an operator lets them run anywhere
    query(db_url, "UPDATE attune_sensor.assignment SET selector = '{}'")
    wait_for(lambda: set(assignments(db_url).values()) == {"sensor-alive"}, 10 + 2 + 5,
             what="the deleted worker's sensors placed by a periodic pass")
    assert load_mismatches(db_url) == []


def test_a_pass_never_brings_back_an_unplaced_sensor(db_url):
    add_pending_sensors(db_url, 1001, "python")
    add_worker(db_url, "big", runtimes=("python",), capacity=2000)
    scheduler, db = scheduler_for(db_url)
    original = scheduler._place_batch
    try:
        def unplace_all_first(sensors):
            if not getattr(unplace_all_first, "done", False):
                unplace_all_first.done = True
                other, other_db = scheduler_for(db_url)  # an operator, between the read and the batches
                try:
                    for n in range(1, 1002):
                        assert other.unplace(f"s.{n}")
                finally:
                    other_db.close()
            return original(sensors)

        scheduler._place_batch = unplace_all_first
        _, placed = scheduler.reconcile()
    finally:
        db.close()
    assert placed == {}
    assert query(db_url, "SELECT count(*) FROM attune_sensor.assignment") == [(0,)]
    assert load_mismatches(db_url) == []


def test_capacity_and_eligibility_that_appear_are_used(db_url, tmp_path, daemons):
    settings = {"worker_name": "sensor-grows", "heartbeat_interval": 0.5, "max_concurrent_sensors": 1,
                "capabilities": {"runtimes": ["python"]}}
    path = write_config(tmp_path, {"database": {"url": db_url}, "sensor": settings})
    daemon = daemons(path)
    daemon.wait_for_line("heartbeat: worker")
    assert place(db_url, "c.1", "--runtime", "python").stdout.strip() == "sensor-grows"
    assert place(db_url, "c.2", "--runtime", "python").returncode == 1  # full
    bound = max(0.5, 10) + 2
    # an unplace frees room: the worker's periodic survey places what waits
    assert run_cli("unplace", "c.1", env=dict(CLI_ENV, DATABASE_URL=db_url)).returncode == 0
    started = time.monotonic()
    wait_for(lambda: assignments(db_url).get("c.2") == "sensor-grows", bound + 1, what="c.2 placed after unplace")
    assert time.monotonic() - started <= bound
    db = Database(db_url)
    try:
        assert place(db_url, "c.3", "--runtime", "python").returncode == 1
        gauges = fleet.metrics(db, 3.0, schema.attach(db))
        assert gauges["pending"] == 1 and gauges["stranded"] == 0
    finally:
        db.close()
    # a raised capacity on reload
    settings["max_concurrent_sensors"] = 3
    open(path, "w").write(json.dumps({"database": {"url": db_url}, "sensor": settings}))
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: assignments(db_url).get("c.3") == "sensor-grows", 3, what="c.3 placed after a reload")
    # a new label on reload
    assert place(db_url, "c.4", "--runtime", "python", "--selector", "zone=eu").returncode == 1
    settings["labels"] = {"zone": "eu"}
    open(path, "w").write(json.dumps({"database": {"url": db_url}, "sensor": settings}))
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: assignments(db_url).get("c.4") == "sensor-grows", 3, what="c.4 placed after a new label")
    assert "pending sensors this worker may take: 0 released, 1 placed (c.4 on sensor-grows); none pending" \
        in daemon.output
    if has_cordon(db_url):  # a lifted cordon, where the table has cordons
        query(db_url, "SET search_path TO public, attune; UPDATE worker SET cordoned = true "
                      "WHERE name = 'sensor-grows'")
        assert run_cli("unplace", "c.4", env=dict(CLI_ENV, DATABASE_URL=db_url)).returncode == 0
        assert place(db_url, "c.5", "--runtime", "python").returncode == 1
        assert assignments(db_url)["c.2"] == "sensor-grows"  # a cordon keeps what is placed
        query(db_url, "SET search_path TO public, attune; UPDATE worker SET cordoned = false "
                      "WHERE name = 'sensor-grows'")
        wait_for(lambda: assignments(db_url).get("c.5") == "sensor-grows", bound + 1,
                 what="c.5 placed after the cordon was lifted")


def test_the_failover_line_says_how_many_stay_pending_and_why(db_url, tmp_path, daemons):
    add_pending_sensors(db_url, 3, "ruby", prefix="r.")
    add_pending_sensors(db_url, 2, "python", prefix="p.")
    daemon = daemons(config_for(tmp_path, db_url, "sensor-says", capabilities={"runtimes": ["python"]}))
    daemon.wait_for_line("Sensors re-placed after this worker registered: 0 released, 2 placed")
    assert "3 stay pending (3: no schedulable worker offers runtime 'ruby')" in daemon.output


def test_a_worker_keeps_only_what_it_may_still_run(db_url):
    add_worker(db_url, "a", runtimes=("python", "node"), capacity=4)
    for n in range(4):
        assert place(db_url, f"k.{n}", "--runtime", "python").stdout.strip() == "a"
    assert place(db_url, "k.node", "--runtime", "node").returncode == 1  # full
    add_worker(db_url, "b", runtimes=("python", "node"), capacity=6)
    a = worker_id(db_url, "a")
    # a lowered capacity: rebalance moves the last ones by ref, a still their previous worker
    query(db_url, "SET search_path TO public, attune; UPDATE worker SET capabilities = capabilities || "
                  "'{\"max_concurrent_sensors\": 2}' WHERE name = 'a'")
    result = run_cli("rebalance", env=dict(CLI_ENV, DATABASE_URL=db_url))
    assert result.returncode == 0, result.stderr
    assert "moved k.2: a -> b" in result.stdout and "moved k.3: a -> b" in result.stdout
    placed = assignments(db_url)
    assert placed["k.2"] == placed["k.3"] == placed["k.node"] == "b"  # k.node waited for room
    on_a = sorted(ref for ref, worker in placed.items() if worker == "a")
    assert on_a and set(on_a) <= {"k.0", "k.1"}  # and rebalance evened out the rest
    assert previous_workers(db_url)["k.3"] == a
    # a runtime dropped: its sensors move (the worker's own pass; here the scheduler's call)
    query(db_url, "SET search_path TO public, attune; UPDATE worker SET capabilities = capabilities || "
                  "'{\"runtimes\": [\"node\"]}' WHERE name = 'a'")
    scheduler, db = scheduler_for(db_url)
    try:
        assert scheduler.survey(a)[0] is True
        released, placed_now = scheduler.reconcile(worker_id=a)
        assert sorted(released) == on_a and placed_now == {ref: "b" for ref in on_a}
        assert scheduler.survey(a)[0] is False
    finally:
        db.close()
    assert all(previous_workers(db_url)[ref] == a for ref in on_a)
    assert load_mismatches(db_url) == []


def test_a_cordon_keeps_what_is_placed(cluster, attune_template):
    """Only the platform's worker table has cordons: its flavour alone."""
    from support import attune_database

    db_url = attune_database(cluster, attune_template)
    assert has_cordon(db_url)
    add_worker(db_url, "c", capacity=4)
    assert place(db_url, "k.1", "--runtime", "python").stdout.strip() == "c"
    add_worker(db_url, "d", capacity=4)
    query(db_url, "SET search_path TO public, attune; UPDATE worker SET cordoned = true WHERE name = 'c'")
    assert "0 sensor(s) moved" in run_cli("rebalance", env=dict(CLI_ENV, DATABASE_URL=db_url)).stdout
    assert assignments(db_url) == {"k.1": "c"}


@pytest.mark.parametrize("change", [("--runtime", "node"), ("--selector", "zone=us"),
                                    ("--entrypoint", "other.py")])
def test_placing_a_placed_sensor_with_other_settings_is_refused(db_url, change):
    add_worker(db_url, "py", runtimes=("python",), labels={"zone": "eu"})
    add_worker(db_url, "nd", runtimes=("node",), labels={"zone": "us"})
    first = ("--runtime", "python", "--selector", "zone=eu", "--entrypoint", "poll.py")
    assert place(db_url, "x.1", *first).stdout.strip() == "py"
    options = dict(zip(first[::2], first[1::2]))
    options[change[0]] = change[1]
    refused = place(db_url, "x.1", *[item for pair in options.items() for item in pair])
    assert refused.returncode == 2 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "already placed on py" in refused.stderr and "unplace" in refused.stderr
    row = query(db_url, "SELECT runtime, selector, entrypoint FROM attune_sensor.assignment")
    assert row == [("python", {"zone": "eu"}, "poll.py")]
    assert place(db_url, "x.1", *first).stdout.strip() == "py"  # the same settings: where it is


def test_rebalance_decides_on_counted_sensors_not_the_counter(db_url):
    add_worker(db_url, "heavy", runtimes=("python",), capacity=10)
    for n in range(6):
        assert place(db_url, f"r.{n}", "--runtime", "python").stdout.strip() == "heavy"
    add_worker(db_url, "light", runtimes=("python",), capacity=10)
    scheduler, db = scheduler_for(db_url)
    try:
        scheduler.sync()
        # the counter drifted after the sync: heavy looks empty, light looks full
        query(db_url, "UPDATE attune_sensor.worker_load SET load = CASE WHEN load > 0 THEN 0 ELSE 9 END")
        scheduler.sync = lambda: None
        moves = scheduler.rebalance()
    finally:
        db.close()
    assert len(moves) == 3 and all(source == "heavy" and target == "light" for _, source, target in moves)
    counts = {}
    for worker in assignments(db_url).values():
        counts[worker] = counts.get(worker, 0) + 1
    assert counts == {"heavy": 3, "light": 3}


def test_check_warns_and_metrics_count_sensors_pending_that_this_worker_could_run(db_url, tmp_path):
    """A worker alive with room while a sensor it may run stays pending (its passes fail): the
    monitoring probe says so, and the gauges count it."""
    query(db_url, "SET search_path TO public, attune; "
                  "INSERT INTO worker (name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat) "
                  "VALUES ('w-room', 'local', 'sensor', 'h', 'active', "
                  "'{\"runtimes\": [\"shell\"], \"max_concurrent_sensors\": 5, \"heartbeat_interval\": 30}', "
                  "'{\"instance_id\": \"i\"}', now()); "
                  "INSERT INTO attune_sensor.assignment (sensor_ref, runtime) VALUES ('waits.1', 'shell')")
    config = write_config(tmp_path, {"database": {"url": db_url}, "sensor": {"worker_name": "w-room"}})
    check = run_cli("--config", config, "check")
    assert check.returncode == 1 and check.stdout.startswith("WARNING: worker w-room"), check.stdout
    metrics = run_cli("--config", config, "metrics")
    assert "attune_sensor_sensors_pending 1" in metrics.stdout.splitlines()
