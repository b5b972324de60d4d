"""A fleet of real daemons on one database: crashes and restarts, one name claimed many times,
peers reaping the dead, the event stream, least privilege. Faults on the path to the database
are in test_faults.py, failover in test_failover.py, PgBouncer in test_pooling.py."""

import json
import signal
import subprocess
import time

import pytest

from support import ATTUNE_SENSOR, base_env, config_for, query, run_cli, wait_for, worker_row


def test_kill_9_then_restart_takes_the_row_back_at_once(db_url, tmp_path, daemons):
    path = config_for(tmp_path, db_url, "sensor-crash")
    first = daemons(path)
    first.wait_for_line("Registered sensor worker")
    worker_id = worker_row(db_url, "sensor-crash")["id"]
    first.proc.kill()
    first.wait()
    second = daemons(path)
    second.wait_for_line("Registered sensor worker")
    row = worker_row(db_url, "sensor-crash")
    assert row["id"] == worker_id and row["status"] == "active" and row["meta"]["pid"] == second.proc.pid


def test_many_daemons_with_one_name_on_one_host_leave_one_owner(db_url, tmp_path, daemons):
    path = config_for(tmp_path, db_url, "sensor-crowd", heartbeat_interval=0.3)
    crowd = [daemons(path) for _ in range(6)]
    wait_for(lambda: sum(d.proc.poll() is None for d in crowd) == 1, 30, what="a single survivor")
    survivor = next(d for d in crowd if d.proc.poll() is None)
    for daemon in crowd:
        if daemon is not survivor:
            assert daemon.proc.returncode == 78 and "taken over" in daemon.output, daemon.output
    assert query(db_url, "SELECT count(*) FROM worker")[0][0] == 1
    assert worker_row(db_url, "sensor-crowd")["meta"]["pid"] == survivor.proc.pid


def test_running_daemon_reaps_stale_peers_and_a_slow_one_comes_back(db_url, tmp_path, daemons):
    query(db_url, "INSERT INTO worker (name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat) "
                  "VALUES ('sensor-dead', 'local', 'sensor', 'gone', 'active', '{\"heartbeat_interval\": 1}', "
                  "'{\"instance_id\": \"dead\"}', now() - interval '10 seconds')")
    daemon = daemons(config_for(tmp_path, db_url, "sensor-reaper"))
    daemon.wait_for_line("Marked stale worker sensor-dead")
    row = worker_row(db_url, "sensor-dead")
    assert row["status"] == "inactive" and row["meta"]["reaped_by"] == "sensor-reaper"
    # the daemon itself, reaped while it was merely slow, is active again at its next heartbeat
    query(db_url, "UPDATE worker SET status = 'inactive' WHERE name = 'sensor-reaper'")
    wait_for(lambda: worker_row(db_url, "sensor-reaper")["status"] == "active", 10, what="reactivation")


def test_watch_prints_register_deregister_and_reap_events(spec_db_url, tmp_path, daemons):
    path = config_for(tmp_path, spec_db_url, "sensor-watched")
    watcher = subprocess.Popen([ATTUNE_SENSOR, "--config", path, "workers", "--watch", "--json"],
                               env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(watcher.stdout.readline())["summary"]["total"] == 0
        assert "watching" in watcher.stderr.readline()
        daemon = daemons(path)
        daemon.wait_for_line("Registered sensor worker")
        daemon.signal(signal.SIGTERM)
        daemon.wait()
        query(spec_db_url, "UPDATE worker SET status = 'active', last_heartbeat = now() - interval '1 hour' "
                      "WHERE name = 'sensor-watched'")
        run_cli("--config", path, "metrics")  # unrelated command: no event
        from attune_sensor import fleet
        from attune_sensor.db import Database

        db = Database(spec_db_url)
        fleet.reap_stale(db, "the-reaper", 3.0)
        db.close()
        events = [json.loads(watcher.stdout.readline()) for _ in range(4)]
    finally:
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(10) == 0
    assert [(e["event"], e["name"]) for e in events] == [
        ("registered", "sensor-watched"), ("deregistered", "sensor-watched"),
        ("registered", "sensor-watched"), ("reaped", "sensor-watched")]
    assert events[3]["by"] == "the-reaper"


def test_heartbeats_send_no_events(spec_db_url):
    from attune_sensor import config
    from attune_sensor.db import Database
    from attune_sensor.worker.registration import SensorWorkerRegistration
    import psycopg2

    cfg = config.load(None, {"DATABASE_URL": spec_db_url, "ATTUNE_CONFIG": "/dev/null"}).with_sensor(worker_name="quiet")
    db = Database.from_config(cfg)
    registration = SensorWorkerRegistration(db, cfg, ["shell"])
    listener = psycopg2.connect(spec_db_url)
    listener.autocommit = True
    listener.cursor().execute("LISTEN attune_worker_events")
    registration.register()
    assert all(registration.heartbeat() for _ in range(5))  # the statement the package ships
    registration.deregister()
    db.close()
    time.sleep(0.2)
    listener.poll()
    events = [json.loads(n.payload)["event"] for n in listener.notifies]
    listener.close()
    assert events == ["registered", "deregistered"]  # and nothing for the five heartbeats


def test_least_privilege_role_runs_everything_but_migrations(cluster, db_url, tmp_path, daemons):
    dbname = db_url.rsplit("/", 1)[1]
    role = f"sensor_{dbname}"
    cluster.psql(f"CREATE ROLE {role} LOGIN PASSWORD 'daemon-pw-1' IN ROLE attune_sensor_daemon")
    url = f"postgresql://{role}:daemon-pw-1@127.0.0.1:{cluster.port}/{dbname}"
    path = config_for(tmp_path, url, "sensor-least")
    daemon = daemons(path)
    daemon.wait_for_line("heartbeat: worker", count=2)
    assert run_cli("--config", path, "check").returncode == 0
    assert run_cli("--config", path, "workers").returncode == 0
    assert run_cli("--config", path, "migrate", "info").returncode == 0
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert worker_row(db_url, "sensor-least")["status"] == "inactive"
    # no DDL and no DELETE for the daemon's role
    assert "up to date" in run_cli("--config", path, "migrate", "run").stdout  # nothing to do, no DDL
    if query(db_url, "SELECT to_regclass('attune_sensor_migrations') IS NOT NULL")[0][0]:
        query(db_url, "DELETE FROM attune_sensor_migrations WHERE version = 20260203000001")
        denied = run_cli("--config", path, "migrate", "run")
    else:  # the platform's schema: the one DDL there is the operator's opt-in tuning
        history = query(db_url, "SELECT operation FROM worker_history WHERE entity_ref = 'sensor-least' ORDER BY time")
        assert history[0] == ("INSERT",) and ("UPDATE",) in history  # its trigger wrote as the daemon's role
        denied = run_cli("--config", path, "migrate", "run", "--tune-heartbeats")
    assert denied.returncode == 1 and "daemon-pw-1" not in denied.stderr
    assert "permission denied" in denied.stderr or "must be owner" in denied.stderr, denied.stderr
    import psycopg2

    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        query(url, "DELETE FROM worker")


def test_many_daemons_starting_at_once_make_one_row_each(db_url, tmp_path, daemons):
    started = [daemons(config_for(tmp_path, db_url, f"sensor-many-{n}")) for n in range(8)]
    for daemon in started:
        daemon.wait_for_line("Registered sensor worker")
    rows = query(db_url, "SELECT name, count(*) FROM worker GROUP BY name ORDER BY name")
    assert rows == [(f"sensor-many-{n}", 1) for n in range(8)]
    assert all(d.proc.poll() is None for d in started)


def test_a_killed_worker_is_marked_inactive_in_bounded_time_with_one_scan_per_period(db_url, tmp_path, daemons):
    # interval 1 s: stale after 3 s; the bound is stale threshold + max(interval, 10 s) = 13 s
    alive = [daemons(config_for(tmp_path, db_url, f"sensor-live-{n}", heartbeat_interval=1)) for n in range(3)]
    doomed = daemons(config_for(tmp_path, db_url, "sensor-doomed", heartbeat_interval=1))
    for daemon in alive + [doomed]:
        daemon.wait_for_line("heartbeat: worker")
    # every opening of the reaper gate, counted by a trigger of the test's own (statistics
    # counters lag: other backends flush them when they please)
    query(db_url, """
        CREATE TABLE attune_sensor.test_gate_log (at timestamptz NOT NULL DEFAULT clock_timestamp());
        CREATE FUNCTION attune_sensor.test_log_gate() RETURNS trigger LANGUAGE plpgsql AS
            $$BEGIN INSERT INTO attune_sensor.test_gate_log DEFAULT VALUES; RETURN NULL; END$$;
        CREATE TRIGGER test_log_gate AFTER UPDATE ON attune_sensor.reaper_gate
            FOR EACH ROW EXECUTE FUNCTION attune_sensor.test_log_gate()""")
    doomed.proc.kill()
    doomed.wait()
    last_beat = worker_row(db_url, "sensor-doomed")["last_heartbeat"]
    row = wait_for(lambda: (r := worker_row(db_url, "sensor-doomed"))["status"] == "inactive" and r, 20,
                   what="the killed worker marked inactive")
    detected = (row["meta"]["reaped_at"] if isinstance(row["meta"]["reaped_at"], str) else None)
    latency = query(db_url, "SELECT extract(epoch FROM (meta ->> 'reaped_at')::timestamptz - last_heartbeat) "
                            "FROM worker WHERE name = 'sensor-doomed'")[0][0]
    assert detected and latency <= 3 + 10 + 1, latency  # one bounded statement of slack
    assert row["meta"]["reaped_by"].startswith("sensor-live-") and row["last_heartbeat"] == last_beat
    elapsed, scans = query(db_url, "SELECT extract(epoch FROM now() - %s::timestamptz), count(*) "
                                   "FROM attune_sensor.test_gate_log", (last_beat,))[0]
    # three live daemons heartbeat 3 times a second, yet the gate opened at most once per 10 s
    assert 1 <= scans <= elapsed // 10 + 1, (scans, elapsed)
    assert all(d.proc.poll() is None for d in alive)
