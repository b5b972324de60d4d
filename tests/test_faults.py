"""Faults between a daemon and its database, each injected into a real process: a hung network
path, a database down at stop, a statement that never answers, missing privileges, and
passwords in every form kept out of every output."""

import signal
import subprocess
import time

import pytest

from support import config_for, query, run_cli, worker_row, write_config
from tcpproxy import TcpProxy


def test_hung_connection_keeps_the_watchdog_rhythm_and_recovers(cluster, db_url, tmp_path, notify_socket, daemons):
    proxy = TcpProxy(cluster.port)
    url = db_url.replace(f":{cluster.port}/", f":{proxy.port}/")
    path = write_config(tmp_path, {"database": {"url": url, "statement_timeout": 1, "connect_timeout": 1},
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


def test_sigterm_while_the_database_is_down_exits_0_within_seconds(cluster, db_url, tmp_path, daemons):
    daemon = daemons(config_for(tmp_path, db_url, "sensor-downstop"))
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
def test_password_in_any_url_form_never_reaches_any_output(cluster, db_url, tmp_path, daemons, form):
    dbname = db_url.rsplit("/", 1)[1]
    secret = "s3cr3t-" + form
    role = f"pw_{form}_{dbname}"
    cluster.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{secret}' IN ROLE attune_sensor_daemon")
    urls = {"url": f"postgresql://{role}:{secret}@127.0.0.1:{cluster.port}/{dbname}",
            "dsn": f"host=127.0.0.1 port={cluster.port} dbname={dbname} user={role} password={secret}"}
    url = urls.get(form, urls["url"])
    env = {"DATABASE_URL": url} if form == "environment" else {}
    path = write_config(tmp_path, {"sensor": {"worker_name": f"sensor-{form}", "heartbeat_interval": 0.3}}
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
    bad_path = write_config(tmp_path, {"database": {"url": url.replace(str(cluster.port), "1")}})
    outputs += [run_cli("--config", bad_path, "workers", env={} if form != "environment" else
                        {"DATABASE_URL": url.replace(str(cluster.port), "1")}).stderr]
    assert secret not in ps
    assert all(secret not in text for text in outputs + [daemon.output])
    assert any("***" in text for text in outputs)  # config shows the masked form


def test_a_role_without_privileges_stops_with_78_and_says_what_to_grant(cluster, db_url, tmp_path, daemons):
    dbname = db_url.rsplit("/", 1)[1]
    role = f"bare_{dbname}"
    cluster.psql(f"CREATE ROLE {role} LOGIN PASSWORD 'bare-pw'")
    daemon = daemons(config_for(tmp_path, f"postgresql://{role}:bare-pw@127.0.0.1:{cluster.port}/{dbname}", "sensor-bare"))
    assert daemon.wait() == 78
    assert "permission denied" in daemon.output and "GRANT attune_sensor_daemon TO" in daemon.output
    assert "Traceback" not in daemon.output and "bare-pw" not in daemon.output


def test_a_heartbeat_that_times_out_is_cancelled_on_the_server(cluster, db_url, tmp_path, daemons):
    import psycopg2

    path = write_config(tmp_path, {"database": {"url": db_url, "statement_timeout": 0.5},
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


def test_reloads_during_an_outage_never_add_connection_attempts(cluster, spec_db_url, tmp_path, daemons):
    """50 SIGHUPs while the database is down: the daemon keeps its heartbeat rhythm of attempts
    (a reload stores capabilities later) instead of one connection attempt per signal."""
    daemon = daemons(config_for(tmp_path, spec_db_url, "sensor-hupstorm", heartbeat_interval=1))
    daemon.wait_for_line("heartbeat: worker")
    cluster.stop("immediate")
    try:
        daemon.wait_for_line("heartbeat failed")
        before = sum("cannot connect" in line for line in daemon.lines)
        for _ in range(50):
            daemon.signal(signal.SIGHUP)
            time.sleep(0.02)
        daemon.wait_for_line("Reloaded configuration; capabilities will be stored", count=1)
        time.sleep(1.0)
        attempts = sum("cannot connect" in line for line in daemon.lines) - before
        assert attempts <= 4, f"{attempts} connection attempts during 2 s of reloads:\n{daemon.output}"
    finally:
        cluster.start()
    daemon.wait_for_line("Database reachable again", timeout=30)


def test_a_server_error_that_ends_a_call_says_its_primary_message_only(spec_db_url):
    """A serialization failure or a shutdown is a "database call failed" (retried), and like every
    other error it shows the server's primary message only: its DETAIL and CONTEXT may quote a
    statement or a row's values, which no log line should carry."""
    from attune_sensor.db import Database
    from attune_sensor.errors import DatabaseUnavailable

    db = Database(spec_db_url)
    try:
        with pytest.raises(DatabaseUnavailable) as raised:
            db.execute("DO $$ BEGIN RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001', "
                       "DETAIL = 'row (token=hunter2)'; END $$")
    finally:
        db.close()
    assert str(raised.value) == "database call failed: could not serialize access"
