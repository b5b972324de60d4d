"""Through PgBouncer in transaction mode, as many Attune sites deploy it: every statement must
carry what it needs (search_path included), since no session state survives."""

import os
import shutil
import signal
import subprocess
import tempfile
import threading

import pytest

from pgcluster import ADMIN_PASSWORD, ADMIN_USER, free_port
from support import add_pending_sensors, config_for, query, run_cli, wait_for, worker_row


@pytest.fixture
def pgbouncer(cluster):
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    assert os.path.exists(binary), "pgbouncer missing: run packaging/install-deps.sh"
    # not under tmp_path: pytest keeps that 0700 to root, and pgbouncer runs as postgres
    base = tempfile.mkdtemp(prefix="attune-pgbouncer-")
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
    shutil.rmtree(base, ignore_errors=True)


def test_everything_works_through_pgbouncer_in_transaction_mode(db_url, pgbouncer, tmp_path, daemons):
    pooled_lifecycle(db_url, pgbouncer, tmp_path, daemons)


def test_pgbouncer_and_the_platforms_schema_without_its_search_path(attune_url, pgbouncer, tmp_path, daemons):
    # every statement carries its own transaction-local search_path: no session state to lose
    pooled_lifecycle(attune_url, pgbouncer, tmp_path, daemons)


def keep_busy(url, stop):
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            while not stop.is_set():
                cursor.execute("SELECT pg_sleep(0.03)")
    finally:
        conn.close()


def pooled_lifecycle(db_url, pgbouncer, tmp_path, daemons):
    url = db_url.rsplit(":", 1)[0] + f":{pgbouncer}/" + db_url.rsplit("/", 1)[1]
    path = config_for(tmp_path, url, "sensor-pooled", capabilities={"runtimes": ["shell"]},
                      max_concurrent_sensors=300)
    # pending sensors: the daemon places them when it registers, in batches whose placement
    # statement is prepared and executed inside one pooled transaction
    add_pending_sensors(db_url, 150, "shell", prefix="pooled.")
    # which server backend ran each of this worker's writes: transaction pooling hands a client
    # whichever server connection is free, so with other clients busy they must land on several
    query(db_url, "CREATE TABLE public.test_backends (pid int); "
                  "CREATE FUNCTION public.test_note_backend() RETURNS trigger LANGUAGE plpgsql AS "
                  "$$ BEGIN INSERT INTO public.test_backends VALUES (pg_backend_pid()); RETURN NULL; END $$; "
                  "SET search_path TO public, attune; "
                  "CREATE TRIGGER test_note_backend AFTER UPDATE ON worker FOR EACH ROW "
                  "WHEN (NEW.name = 'sensor-pooled') EXECUTE FUNCTION public.test_note_backend()")
    others = [daemons(config_for(tmp_path, url, f"sensor-pooled-{n}", capabilities={"runtimes": ["shell"]}))
              for n in (1, 2, 3)]
    busy, stop = [], threading.Event()
    for _ in range(3):  # clients holding server connections in short transactions
        thread = threading.Thread(target=keep_busy, args=(url, stop), daemon=True)
        thread.start()
        busy.append(thread)
    daemon = daemons(path)
    try:
        daemon.wait_for_line("heartbeat: worker", count=3)
        wait_for(lambda: query(db_url, "SELECT count(DISTINCT pid) FROM public.test_backends")[0][0] >= 2, 20,
                 what="the worker's heartbeats served by two server backends or more")
    finally:
        stop.set()
        for thread in busy:
            thread.join(5)
    for other in others:
        other.signal(signal.SIGTERM)
        assert other.wait() == 0
    assert query(db_url, "SET search_path TO public, attune; "
                         "SELECT count(*) FROM attune_sensor.assignment a JOIN worker w ON w.id = a.worker_id "
                         "WHERE w.name = 'sensor-pooled'")[0][0] == 150
    for command in (["workers"], ["check"], ["metrics"], ["migrate", "info"]):
        result = run_cli("--config", path, *command)
        assert result.returncode == 0, (command, result.stderr)
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_line("Reloaded configuration")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert worker_row(db_url, "sensor-pooled")["status"] == "inactive"
