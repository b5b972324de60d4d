"""A real failover: a primary with a streaming-replication standby, daemons heartbeating through
a multi-host URL, the primary stopped and the standby promoted. Each daemon keeps its row and
id, none restarts, and the largest gap between two stored heartbeats stays within one interval
plus the failover time (printed: `pytest -s` shows the figures; docs/operations.md has them)."""

import datetime
import os
import shutil
import subprocess
import time

import pytest

from pgcluster import ADMIN_PASSWORD, ADMIN_USER, Cluster, free_port
from support import config_for, query, run_cli, wait_for, worker_row, write_config

INTERVAL = 0.5
NAMES = ("sensor-ha-a", "sensor-ha-b")


@pytest.fixture
def replicated():
    """(primary, standby): the standby streams from the primary and is a hot standby."""
    primary = Cluster(settings=["wal_level = replica", "max_wal_senders = 5", "hot_standby = on",
                                "synchronous_commit = on"]).init().start()
    standby = Cluster(port=free_port())
    try:
        shutil.rmtree(standby.data, ignore_errors=True)
        argv = [os.path.join(primary.bindir, "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port),
                "-U", ADMIN_USER, "-D", standby.data, "-R", "-X", "stream", "--no-sync"]
        if standby.as_postgres:
            argv = ["runuser", "-u", "postgres", "--", "env", f"PGPASSWORD={ADMIN_PASSWORD}", *argv]
        result = subprocess.run(argv, env=dict(os.environ, PGPASSWORD=ADMIN_PASSWORD), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=120)
        assert result.returncode == 0, result.stdout
        with open(os.path.join(standby.data, "postgresql.conf"), "a") as handle:
            handle.write(f"\nport = {standby.port}\nunix_socket_directories = '{standby.base}'\n")
        standby.start()
        yield primary, standby
    finally:
        standby.destroy()
        primary.destroy()


def stamps(url):
    rows = query(url, "SELECT name, id, last_heartbeat FROM worker ORDER BY name")
    return {name: (worker_id, heartbeat) for name, worker_id, heartbeat in rows}


def test_promoting_the_standby_keeps_every_row_and_the_heartbeat_rhythm(replicated, tmp_path, daemons):
    primary, standby = replicated
    primary.psql("CREATE DATABASE ha")
    assert run_cli("migrate", "run", env={"DATABASE_URL": primary.url("ha")}).returncode == 0
    url = (f"postgresql://{ADMIN_USER}:{ADMIN_PASSWORD}@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/ha"
           "?target_session_attrs=read-write&connect_timeout=2")
    started = [daemons(write_config(tmp_path, {"database": {"url": url, "statement_timeout": 2},
                                              "sensor": {"worker_name": name, "heartbeat_interval": INTERVAL}}))
               for name in NAMES]
    for daemon in started:
        daemon.wait_for_line("heartbeat: worker", count=3)
    before = stamps(primary.url("ha"))
    wait_for(lambda: set(stamps(standby.url("ha"))) == set(NAMES), 20, what="the rows replicated")

    # sample each worker's stored heartbeat through the failover, from whichever server is writable
    samples = {name: [] for name in NAMES}
    failover_started = time.monotonic()
    primary.stop("fast")
    promote = subprocess.run(["runuser", "-u", "postgres", "--", os.path.join(standby.bindir, "pg_ctl"),
                              "-D", standby.data, "-w", "promote"] if standby.as_postgres else
                             [os.path.join(standby.bindir, "pg_ctl"), "-D", standby.data, "-w", "promote"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert promote.returncode == 0, promote.stdout
    failover_seconds = time.monotonic() - failover_started
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for name, (_, heartbeat) in stamps(standby.url("ha")).items():
            if not samples[name] or samples[name][-1] != heartbeat:
                samples[name].append(heartbeat)
        time.sleep(0.05)

    after = stamps(standby.url("ha"))
    assert {name: row[0] for name, row in after.items()} == {name: row[0] for name, row in before.items()}
    assert all(d.proc.poll() is None for d in started)  # no daemon restarted
    for daemon in started:
        assert "Registered sensor worker" in daemon.output
        assert daemon.output.count("Registered sensor worker") == 1
    report = []
    for name in NAMES:
        series = [before[name][1]] + samples[name]
        gaps = [(b - a).total_seconds() for a, b in zip(series, series[1:]) if b > a]
        largest = max(gaps)
        report.append(f"{name}: largest stored-heartbeat gap {largest:.2f}s across the failover")
        # one interval, the failover, and one bounded reconnect (statement_timeout 2 s)
        assert largest <= INTERVAL + failover_seconds + 2.0, (largest, failover_seconds)
        assert series[-1] > datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=5)
    print(f"\nfailover (stop primary + promote standby) took {failover_seconds:.2f}s; " + "; ".join(report))


# Multi-host URLs: the daemon follows target_session_attrs=read-write to the other server.


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


def test_failover_when_the_first_server_turns_read_only(cluster, second_cluster, tmp_path, daemons):
    url = failover_url(cluster, second_cluster, "failover_ro")
    daemon = daemons(config_for(tmp_path, url, "sensor-ha"))
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


def test_failover_when_the_first_server_dies(cluster, second_cluster, tmp_path, daemons):
    url = failover_url(cluster, second_cluster, "failover_dead")
    daemon = daemons(config_for(tmp_path, url, "sensor-ha2"))
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
