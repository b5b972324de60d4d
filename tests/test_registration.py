"""SensorWorkerRegistration, the Python API, against a real PostgreSQL."""

import subprocess
import sys

import pytest

from attune_sensor import SensorWorkerRegistration, config, fleet
from attune_sensor.db import Database
from attune_sensor.errors import DatabaseUnavailable, WorkerNameConflict, WorkerTakenOver
from support import base_env, query, worker_row


def make(url, name, **sensor):
    sensor.setdefault("heartbeat_interval", 30)
    cfg = config.load(None, environ={"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"})
    cfg = cfg.with_sensor(worker_name=name, **sensor)
    db = Database.from_config(cfg)
    return SensorWorkerRegistration(db, cfg, ["python", "shell"]), db


def test_register_heartbeat_deregister(db_url):
    registration, db = make(db_url, "api-1", worker_type="remote")
    worker_id = registration.register()
    assert registration.worker_id == worker_id and registration.worker_name == "api-1"
    row = worker_row(db_url, "api-1")
    assert (row["id"], row["status"], row["role"], row["worker_type"]) == (worker_id, "active", "sensor", "remote")
    before = row["last_heartbeat"]
    assert registration.heartbeat().updated is True
    assert worker_row(db_url, "api-1")["last_heartbeat"] > before
    assert registration.deregister() is True
    assert worker_row(db_url, "api-1")["status"] == "inactive"
    db.close()


def test_add_capability_and_update(db_url):
    registration, db = make(db_url, "api-caps")
    registration.register()
    registration.add_capability("gpu_enabled", True)
    registration.update_capabilities()
    caps = worker_row(db_url, "api-caps")["capabilities"]
    assert caps["gpu_enabled"] is True and caps["runtimes"] == ["python", "shell"]
    db.close()


def test_heartbeat_reactivates_a_reaped_worker(db_url):
    registration, db = make(db_url, "api-reaped")
    registration.register()
    query(db_url, "UPDATE worker SET status = 'inactive' WHERE name = 'api-reaped'")
    assert registration.heartbeat().updated is True
    assert worker_row(db_url, "api-reaped")["status"] == "active"
    db.close()


def test_live_worker_of_another_machine_is_not_taken_over(db_url):
    query(db_url, "INSERT INTO worker (name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat) "
                  "VALUES ('api-c', 'local', 'sensor', 'h-other', 'active', '{\"heartbeat_interval\": 30}', "
                  "'{\"machine_id\": \"m-other\", \"hostname\": \"h-other\"}', now())")
    registration, db = make(db_url, "api-c")
    with pytest.raises(WorkerNameConflict, match="h-other"):
        registration.register()
    # stale by its own interval (3 x 30 s): now it may be taken over, keeping the id
    query(db_url, "UPDATE worker SET last_heartbeat = now() - interval '91 seconds' WHERE name = 'api-c'")
    original = worker_row(db_url, "api-c")["id"]
    assert registration.register() == original
    db.close()


def test_per_worker_interval_decides_staleness(db_url):
    # heartbeat_interval 600: 5 minutes without a heartbeat is not stale for this worker
    query(db_url, "INSERT INTO worker (name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat) "
                  "VALUES ('api-slow', 'local', 'sensor', 'h-slow', 'active', '{\"heartbeat_interval\": 600}', "
                  "'{\"machine_id\": \"m-slow\", \"hostname\": \"h-slow\"}', now() - interval '5 minutes')")
    registration, db = make(db_url, "api-slow")
    with pytest.raises(WorkerNameConflict):
        registration.register()
    assert fleet.reap_stale(db, "me", 3.0) == ([], 1)
    db.close()


def test_takeover_fences_the_old_instance(db_url):
    first, db1 = make(db_url, "api-fence")
    second, db2 = make(db_url, "api-fence")
    first.register()
    assert second.register() == first.worker_id  # same machine: takeover allowed
    with pytest.raises(WorkerTakenOver):
        first.heartbeat()
    assert first.deregister() is False
    assert worker_row(db_url, "api-fence")["status"] == "active"
    db1.close()
    db2.close()


def test_reaper_marks_stale_workers_and_records_who(db_url):
    query(db_url, "INSERT INTO worker (name, worker_type, worker_role, status, capabilities, meta, last_heartbeat) VALUES "
                  "('old', 'local', 'sensor', 'active', '{\"heartbeat_interval\": 10}', '{}', now() - interval '31 seconds'),"
                  "('fresh', 'local', 'sensor', 'active', '{\"heartbeat_interval\": 10}', '{}', now()),"
                  "('action', 'local', 'action', 'active', '{}', '{}', now() - interval '1 day')")
    _, db = make(db_url, "api-reaper")
    stale = [w["name"] for w in fleet.list_workers(db, 3.0, stale_only=True)]
    assert stale == ["old"]
    reaped, active = fleet.reap_stale(db, "api-reaper", 3.0)
    # the count is taken from the snapshot before the reap; action workers are not counted
    assert [r[1] for r in reaped] == ["old"] and active == 2
    row = worker_row(db_url, "old")
    assert row["status"] == "inactive" and row["meta"]["reaped_by"] == "api-reaper" and row["meta"]["reaped_at"]
    assert worker_row(db_url, "action")["status"] == "active"  # not ours to judge
    assert fleet.list_workers(db, 3.0, stale_only=True) == []
    db.close()


def test_reaper_is_elected_one_at_a_time(db_url):
    _, db = make(db_url, "api-lock")
    holder = __import__("psycopg2").connect(db_url)
    with holder.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (fleet.REAPER_LOCK_KEY,))
        # a row attune-sensor registered (its meta carries an instance id): the platform's own are not ours to reap
        query(db_url, "INSERT INTO worker (name, worker_type, worker_role, status, capabilities, meta, last_heartbeat) "
                      "VALUES ('old2', 'local', 'sensor', 'active', '{}', '{\"instance_id\": \"x\"}', "
                      "now() - interval '1 hour')")
        assert fleet.reap_stale(db, "api-lock", 3.0)[0] == []  # someone else holds the lock
        assert worker_row(db_url, "old2")["status"] == "active"
    holder.rollback()
    holder.close()
    assert [r[1] for r in fleet.reap_stale(db, "api-lock", 3.0)[0]] == ["old2"]
    db.close()


def test_unreachable_database_is_reported_without_password(cluster):
    url = "postgresql://someone:hunter2-secret@127.0.0.1:1/nothing"
    registration, db = make(url, "api-down")
    with pytest.raises(DatabaseUnavailable) as caught:
        registration.register()
    assert "hunter2-secret" not in str(caught.value)


CONCURRENT = """
import sys
from attune_sensor import SensorWorkerRegistration, config
from attune_sensor.db import Database
cfg = config.load(None, environ={"DATABASE_URL": sys.argv[1], "ATTUNE_CONFIG": "/dev/null"}).with_sensor(worker_name="race")
reg = SensorWorkerRegistration(Database.from_config(cfg), cfg, ["shell"])
sys.stdin.readline()
print(reg.register())
"""


def test_concurrent_registration_of_one_name_makes_one_row(db_url):
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, db_url], env=base_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    for proc in procs:  # release them together
        proc.stdin.write("go\n")
        proc.stdin.flush()
    ids = {proc.communicate(timeout=60)[0].strip() for proc in procs}
    assert len(ids) == 1 and ids != {""}
    assert query(db_url, "SELECT count(*) FROM worker WHERE name = 'race'")[0][0] == 1


def test_reaper_delay_spreads_one_attempt_per_period_over_the_fleet():
    assert fleet.reaper_delay(10, 1, rng=lambda: 0.5) == 30  # base period: max(30 s, interval)
    assert fleet.reaper_delay(60, 1, rng=lambda: 0.5) == 60
    assert fleet.reaper_delay(30, 1000, rng=lambda: 0.5) == 30_000  # 1000 workers: fleet-wide once per 30 s
    assert fleet.reaper_delay(30, 0, rng=lambda: 0.0) == 15  # jitter 0.5 to 1.5


def test_a_reaped_worker_that_comes_back_is_no_longer_counted_as_reaped(db_url, tmp_path):
    registration, db = make(db_url, "api-back", heartbeat_interval=1)
    registration.register()
    query(db_url, "UPDATE worker SET last_heartbeat = now() - interval '1 hour' WHERE name = 'api-back'")
    reaped, _ = fleet.reap_stale(db, "the-reaper", 3.0)
    assert [r[1] for r in reaped] == ["api-back"]
    beat = registration.heartbeat()
    assert beat.updated is True  # alive after all: active again
    assert beat.outside_change == "reaped by the-reaper"
    row = worker_row(db_url, "api-back")
    assert row["status"] == "active" and not {"reaped_at", "reaped_by"} & set(row["meta"])
    registration.deregister()  # a clean stop later must not count as reaped either
    db.close()
    path = f"{tmp_path}/c.yaml"
    with open(path, "w") as handle:
        handle.write(f"database: {{url: '{db_url}'}}\n")
    metrics = subprocess.run([sys.executable, "-m", "attune_sensor.cli", "--config", path, "metrics"],
                             env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "attune_sensor_workers_reaped 0" in metrics.stdout, metrics.stderr


def test_another_writer_is_reported_and_its_row_left_alone(db_url):
    from attune_sensor.errors import ForeignWriter

    registration, db = make(db_url, "api-foreign")
    registration.register()
    query(db_url, "UPDATE worker SET host = 'elsewhere' WHERE name = 'api-foreign'")
    with pytest.raises(ForeignWriter, match="host changed"):
        registration.heartbeat()
    assert registration.deregister() is False
    assert worker_row(db_url, "api-foreign")["status"] == "active"
    db.close()
