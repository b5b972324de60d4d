"""Fleet behaviour under the faults operators meet, each injected into real processes."""

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import ATTUNE_SENSOR, base_env, query, run_cli, wait_for, worker_row, write_config
from pgcluster import ADMIN_PASSWORD, ADMIN_USER, Cluster, free_port
from tcpproxy import TcpProxy
from test_daemon import config_for


def test_kill_9_then_restart_takes_the_row_back_at_once(db_url, workdir, daemons):
    path = config_for(workdir, db_url, "sensor-crash")
    first = daemons(path)
    first.wait_for_line("Registered sensor worker")
    worker_id = worker_row(db_url, "sensor-crash")["id"]
    first.proc.kill()
    first.wait()
    second = daemons(path)
    second.wait_for_line("Registered sensor worker")
    row = worker_row(db_url, "sensor-crash")
    assert row["id"] == worker_id and row["status"] == "active" and row["meta"]["pid"] == second.proc.pid


def test_many_daemons_with_one_name_on_one_host_leave_one_owner(db_url, workdir, daemons):
    path = config_for(workdir, db_url, "sensor-crowd", heartbeat_interval=0.3)
    crowd = [daemons(path) for _ in range(6)]
    wait_for(lambda: sum(d.proc.poll() is None for d in crowd) == 1, 30, what="a single survivor")
    survivor = next(d for d in crowd if d.proc.poll() is None)
    for daemon in crowd:
        if daemon is not survivor:
            assert daemon.proc.returncode == 78 and "taken over" in daemon.output, daemon.output
    assert query(db_url, "SELECT count(*) FROM worker")[0][0] == 1
    assert worker_row(db_url, "sensor-crowd")["meta"]["pid"] == survivor.proc.pid


def test_running_daemon_reaps_stale_peers_and_a_slow_one_comes_back(db_url, workdir, daemons):
    query(db_url, "INSERT INTO worker (name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat) "
                  "VALUES ('sensor-dead', 'local', 'sensor', 'gone', 'active', '{\"heartbeat_interval\": 1}', "
                  "'{\"instance_id\": \"dead\"}', now() - interval '10 seconds')")
    daemon = daemons(config_for(workdir, db_url, "sensor-reaper"))
    daemon.wait_for_line("Marked stale worker sensor-dead")
    row = worker_row(db_url, "sensor-dead")
    assert row["status"] == "inactive" and row["meta"]["reaped_by"] == "sensor-reaper"
    # the daemon itself, reaped while it was merely slow, is active again at its next heartbeat
    query(db_url, "UPDATE worker SET status = 'inactive' WHERE name = 'sensor-reaper'")
    wait_for(lambda: worker_row(db_url, "sensor-reaper")["status"] == "active", 10, what="reactivation")


def test_watch_prints_register_deregister_and_reap_events(spec_db_url, workdir, daemons):
    path = config_for(workdir, spec_db_url, "sensor-watched")
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
    from attune_sensor.registration import SensorWorkerRegistration
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


def test_least_privilege_role_runs_everything_but_migrations(cluster, db_url, workdir, daemons):
    dbname = db_url.rsplit("/", 1)[1]
    role = f"sensor_{dbname}"
    cluster.psql(f"CREATE ROLE {role} LOGIN PASSWORD 'daemon-pw-1' IN ROLE attune_sensor_daemon")
    url = f"postgresql://{role}:daemon-pw-1@127.0.0.1:{cluster.port}/{dbname}"
    path = config_for(workdir, url, "sensor-least")
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


def test_hung_connection_keeps_the_watchdog_rhythm_and_recovers(cluster, db_url, workdir, notify_socket, daemons):
    proxy = TcpProxy(cluster.port)
    url = db_url.replace(f":{cluster.port}/", f":{proxy.port}/")
    path = write_config(workdir, {"database": {"url": url, "statement_timeout": 1, "connect_timeout": 1},
                                  "sensor": {"worker_name": "sensor-hung", "heartbeat_interval": 0.5}})
    daemon = daemons(path, notify=notify_socket)
    try:
        notify_socket.wait_for("READY=1")
        proxy.pause()
        daemon.wait_for_line("no answer within the time limit", count=2)
        watchdogs = notify_socket.count("WATCHDOG=1")
        # each attempt ends within its bound, so WATCHDOG=1 keeps coming while nothing answers
        notify_socket.wait_for("WATCHDOG=1", count=watchdogs + 3, timeout=15)
        assert daemon.proc.poll() is None
        proxy.resume()
        beats = sum("heartbeat: worker" in line for line in daemon.lines)
        daemon.wait_for_line("heartbeat: worker", count=beats + 1)
        assert worker_row(db_url, "sensor-hung")["status"] == "active"
    finally:
        proxy.resume()
        daemon.stop()
        proxy.close()
    assert daemon.proc.returncode == 0


@pytest.fixture(scope="module")
def second_cluster():
    other = Cluster().init().start()
    yield other
    other.destroy()


def failover_url(first, second, dbname):
    """A migrated database of one name on both servers, and the multi-host URL naming both."""
    for server in (first, second):
        server.psql(f"CREATE DATABASE {dbname}")
        result = run_cli("migrate", "run", env={"DATABASE_URL": server.url(dbname)})
        assert result.returncode == 0, result.stderr
    return (f"postgresql://{ADMIN_USER}:{ADMIN_PASSWORD}@127.0.0.1:{first.port},127.0.0.1:{second.port}"
            f"/{dbname}?target_session_attrs=read-write")


def test_failover_when_the_first_server_turns_read_only(cluster, second_cluster, workdir, daemons):
    url = failover_url(cluster, second_cluster, "failover_ro")
    daemon = daemons(config_for(workdir, url, "sensor-ha"))
    try:
        daemon.wait_for_line("heartbeat: worker")
        assert worker_row(cluster.url("failover_ro"), "sensor-ha")["status"] == "active"
        # a demoted primary: new sessions are read-only, the daemon's own session is cut
        cluster.psql("ALTER DATABASE failover_ro SET default_transaction_read_only = on")
        cluster.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'failover_ro' "
                     "AND pid <> pg_backend_pid()")
        wait_for(lambda: (r := worker_row(second_cluster.url("failover_ro"), "sensor-ha")) and r["status"] == "active",
                 20, what="the worker on the second server")
        beats = sum("heartbeat: worker" in line for line in daemon.lines)
        daemon.wait_for_line("heartbeat: worker", count=beats + 2)
        assert daemon.proc.poll() is None
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0
    assert worker_row(second_cluster.url("failover_ro"), "sensor-ha")["status"] == "inactive"


def test_failover_when_the_first_server_dies(cluster, second_cluster, workdir, daemons):
    url = failover_url(cluster, second_cluster, "failover_dead")
    daemon = daemons(config_for(workdir, url, "sensor-ha2"))
    daemon.wait_for_line("heartbeat: worker")
    cluster.stop("immediate")
    try:
        wait_for(lambda: (r := worker_row(second_cluster.url("failover_dead"), "sensor-ha2")) and r["status"] == "active",
                 20, what="the worker on the second server")
        assert daemon.proc.poll() is None
    finally:
        cluster.start()
        daemon.stop()
    assert daemon.proc.returncode == 0


@pytest.fixture
def pgbouncer(cluster, workdir):
    import shutil

    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    assert os.path.exists(binary), "pgbouncer missing: run packaging/install-deps.sh"
    base = os.path.join(workdir, "pgbouncer")
    os.makedirs(base)
    port = free_port()
    with open(os.path.join(base, "users.txt"), "w") as handle:
        handle.write(f'"{ADMIN_USER}" "{ADMIN_PASSWORD}"\n')
    with open(os.path.join(base, "pgbouncer.ini"), "w") as handle:
        handle.write(f"[databases]\n* = host=127.0.0.1 port={cluster.port}\n[pgbouncer]\n"
                     f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
                     f"auth_type = scram-sha-256\nauth_file = {base}/users.txt\npool_mode = transaction\n"
                     f"logfile = {base}/pgbouncer.log\npidfile = {base}/pgbouncer.pid\n"
                     "max_client_conn = 100\ndefault_pool_size = 5\n")
    argv = [binary, os.path.join(base, "pgbouncer.ini")]
    if os.geteuid() == 0:
        os.chmod(workdir, 0o755)
        shutil.chown(base, "postgres")
        for name in os.listdir(base):
            shutil.chown(os.path.join(base, name), "postgres")
        argv = ["runuser", "-u", "postgres", "--", *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: subprocess.run(["bash", "-c", f"echo > /dev/tcp/127.0.0.1/{port}"],
                                    stderr=subprocess.DEVNULL).returncode == 0, 10, what="pgbouncer listening")
    yield port
    proc.terminate()
    proc.wait(10)


def test_everything_works_through_pgbouncer_in_transaction_mode(db_url, pgbouncer, workdir, daemons):
    pooled_lifecycle(db_url, pgbouncer, workdir, daemons)


def test_pgbouncer_and_the_platforms_schema_without_its_search_path(attune_url, pgbouncer, workdir, daemons):
    # every statement carries its own transaction-local search_path: no session state to lose
    pooled_lifecycle(attune_url, pgbouncer, workdir, daemons)


def pooled_lifecycle(db_url, pgbouncer, workdir, daemons):
    url = db_url.rsplit(":", 1)[0] + f":{pgbouncer}/" + db_url.rsplit("/", 1)[1]
    path = config_for(workdir, url, "sensor-pooled")
    daemon = daemons(path)
    daemon.wait_for_line("heartbeat: worker", count=3)
    for command in (["workers"], ["check"], ["metrics"], ["migrate", "info"]):
        result = run_cli("--config", path, *command)
        assert result.returncode == 0, (command, result.stderr)
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_line("Reloaded configuration")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert worker_row(db_url, "sensor-pooled")["status"] == "inactive"


def test_sigterm_while_the_database_is_down_exits_0_within_seconds(cluster, db_url, workdir, daemons):
    daemon = daemons(config_for(workdir, db_url, "sensor-downstop"))
    daemon.wait_for_line("heartbeat: worker")
    cluster.stop("immediate")
    try:
        daemon.wait_for_line("heartbeat failed")
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(10) == 0
        assert time.monotonic() - started < 6
        assert "peers will mark it inactive" in daemon.output
    finally:
        cluster.start()


@pytest.mark.parametrize("form", ["url", "dsn", "environment"])
def test_password_in_any_url_form_never_reaches_any_output(cluster, db_url, workdir, daemons, form):
    dbname = db_url.rsplit("/", 1)[1]
    secret = "s3cr3t-" + form
    role = f"pw_{form}_{dbname}"
    cluster.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{secret}' IN ROLE attune_sensor_daemon")
    urls = {"url": f"postgresql://{role}:{secret}@127.0.0.1:{cluster.port}/{dbname}",
            "dsn": f"host=127.0.0.1 port={cluster.port} dbname={dbname} user={role} password={secret}"}
    url = urls.get(form, urls["url"])
    env = {"DATABASE_URL": url} if form == "environment" else {}
    path = write_config(workdir, {"sensor": {"worker_name": f"sensor-{form}", "heartbeat_interval": 0.3}}
                        if form == "environment" else
                        {"database": {"url": url}, "sensor": {"worker_name": f"sensor-{form}", "heartbeat_interval": 0.3}})
    outputs = []
    daemon = daemons(path, env=env)
    daemon.wait_for_line("heartbeat: worker")
    ps = subprocess.run(["ps", "axww", "-o", "args"], stdout=subprocess.PIPE, text=True).stdout
    for command in (["config"], ["workers", "--json"], ["check"], ["metrics"], ["migrate", "info"]):
        result = run_cli("--config", path, *command, env=env)
        outputs += [result.stdout, result.stderr]
    cluster.stop("immediate")
    try:
        daemon.wait_for_line("heartbeat failed")
        for command in (["workers"], ["check"], ["migrate", "run"]):
            result = run_cli("--config", path, *command, env=env)
            outputs += [result.stdout, result.stderr]
    finally:
        cluster.start()
    daemon.stop()
    bad_path = write_config(workdir, {"database": {"url": url.replace(str(cluster.port), "1")}})
    outputs += [run_cli("--config", bad_path, "workers", env={} if form != "environment" else
                        {"DATABASE_URL": url.replace(str(cluster.port), "1")}).stderr]
    assert secret not in ps
    assert all(secret not in text for text in outputs + [daemon.output])
    assert any("***" in text for text in outputs)  # config shows the masked form


def test_a_role_without_privileges_stops_with_78_and_says_what_to_grant(cluster, db_url, workdir, daemons):
    dbname = db_url.rsplit("/", 1)[1]
    role = f"bare_{dbname}"
    cluster.psql(f"CREATE ROLE {role} LOGIN PASSWORD 'bare-pw'")
    daemon = daemons(config_for(workdir, f"postgresql://{role}:bare-pw@127.0.0.1:{cluster.port}/{dbname}", "sensor-bare"))
    assert daemon.wait() == 78
    assert "permission denied" in daemon.output and "GRANT attune_sensor_daemon TO" in daemon.output
    assert "Traceback" not in daemon.output and "bare-pw" not in daemon.output


def test_many_daemons_starting_at_once_make_one_row_each(db_url, workdir, daemons):
    started = [daemons(config_for(workdir, db_url, f"sensor-many-{n}")) for n in range(8)]
    for daemon in started:
        daemon.wait_for_line("Registered sensor worker")
    rows = query(db_url, "SELECT name, count(*) FROM worker GROUP BY name ORDER BY name")
    assert rows == [(f"sensor-many-{n}", 1) for n in range(8)]
    assert all(d.proc.poll() is None for d in started)


def test_a_heartbeat_that_times_out_is_cancelled_on_the_server(cluster, db_url, workdir, daemons):
    import psycopg2

    path = write_config(workdir, {"database": {"url": db_url, "statement_timeout": 0.5},
                                  "sensor": {"worker_name": "sensor-locked", "heartbeat_interval": 0.3}})
    daemon = daemons(path)
    daemon.wait_for_line("heartbeat: worker")
    locker = psycopg2.connect(db_url)
    cursor = locker.cursor()
    cursor.execute("SET search_path TO public, attune; "
                   "SELECT id FROM worker WHERE name = 'sensor-locked' FOR UPDATE")  # held until rollback
    backends = []
    try:
        daemon.wait_for_line("no answer within the time limit", count=3)
        for _ in range(30):
            backends.append(query(db_url, "SELECT count(*) FROM pg_stat_activity "
                                          "WHERE application_name = 'attune-sensor'")[0][0])
            time.sleep(0.1)
    finally:
        locker.rollback()
        locker.close()
    # the one in use, and at most one whose cancel is on its way; without cancelling they pile up
    assert max(backends) <= 2, backends
    beats = sum("heartbeat: worker" in line for line in daemon.lines)
    daemon.wait_for_line("heartbeat: worker", count=beats + 1)


def test_a_killed_worker_is_marked_inactive_in_bounded_time_with_one_scan_per_period(db_url, workdir, daemons):
    # interval 1 s: stale after 3 s; the bound is stale threshold + max(interval, 10 s) = 13 s
    alive = [daemons(config_for(workdir, db_url, f"sensor-live-{n}", heartbeat_interval=1)) for n in range(3)]
    doomed = daemons(config_for(workdir, db_url, "sensor-doomed", heartbeat_interval=1))
    for daemon in alive + [doomed]:
        daemon.wait_for_line("heartbeat: worker")
    gate_updates = "SELECT n_tup_upd FROM pg_stat_user_tables WHERE schemaname = 'attune_sensor' AND relname = 'reaper_gate'"
    query(db_url, "SELECT pg_stat_force_next_flush()")
    scans_before = query(db_url, gate_updates)[0][0]
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
    query(db_url, "SELECT pg_stat_force_next_flush()")
    elapsed = query(db_url, "SELECT extract(epoch FROM now() - %s::timestamptz)", (last_beat,))[0][0]
    scans = query(db_url, gate_updates)[0][0] - scans_before
    # three live daemons heartbeat 3 times a second, yet the gate opened at most once per 10 s
    assert 1 <= scans <= elapsed // 10 + 1, (scans, elapsed)
    assert all(d.proc.poll() is None for d in alive)
