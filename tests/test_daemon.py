"""The real daemon, as a subprocess, against a real PostgreSQL and a real notify socket."""

import signal
import time

import pytest

from support import config_for, query, worker_row, write_config


def test_lifecycle_registers_heartbeats_and_deregisters_in_order(db_url, tmp_path, notify_socket, daemons):
    path = config_for(tmp_path, db_url, "sensor-life", max_concurrent_sensors=7,
                      capabilities={"runtimes": ["python", "shell"], "custom_feature": True})
    daemon = daemons(path, env={"INVOCATION_ID": "abc123"}, notify=notify_socket)

    notify_socket.wait_for("READY=1")
    # READY=1 only once the row is committed: it must be visible to another session now.
    row = worker_row(db_url, "sensor-life")
    assert row["status"] == "active" and row["role"] == "sensor"
    assert row["capabilities"]["runtimes"] == ["python", "shell"]
    assert row["capabilities"]["max_concurrent_sensors"] == 7
    assert row["capabilities"]["custom_feature"] is True
    assert row["capabilities"]["heartbeat_interval"] == 0.5
    assert row["capabilities"]["sensor_version"]
    assert row["meta"]["pid"] == daemon.proc.pid
    assert row["meta"]["invocation_id"] == "abc123"
    assert {"instance_id", "machine_id", "hostname", "started_at"} <= set(row["meta"])
    first_beat = row["last_heartbeat"]

    notify_socket.wait_for("WATCHDOG=1", count=3)
    daemon.wait_for_line("heartbeat", count=3)
    assert worker_row(db_url, "sensor-life")["last_heartbeat"] > first_beat

    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert worker_row(db_url, "sensor-life")["status"] == "inactive"

    fields = notify_socket.fields()
    assert fields.index("READY=1") < fields.index("WATCHDOG=1") < fields.index("STOPPING=1")
    assert "Registering sensor worker sensor-life" in daemon.lines[0]
    heartbeat_lines = [line for line in daemon.lines if "heartbeat" in line and "INFO" in line]
    watchdogs_before_stop = fields[: fields.index("STOPPING=1")].count("WATCHDOG=1")
    # one INFO heartbeat line and one WATCHDOG=1 per heartbeat
    assert len(heartbeat_lines) == watchdogs_before_stop


def test_reregistering_keeps_the_id(db_url, tmp_path, daemons):
    path = config_for(tmp_path, db_url, "sensor-again")
    first = daemons(path)
    first.wait_for_line("Registered sensor worker")
    original_id = worker_row(db_url, "sensor-again")["id"]
    first.signal(signal.SIGTERM)
    assert first.wait() == 0

    second = daemons(path)
    second.wait_for_line("Registered sensor worker")
    row = worker_row(db_url, "sensor-again")
    assert row["id"] == original_id and row["status"] == "active"
    assert query(db_url, "SELECT count(*) FROM worker")[0][0] == 1


def test_sigint_also_deregisters(db_url, tmp_path, daemons):
    daemon = daemons(config_for(tmp_path, db_url, "sensor-int"))
    daemon.wait_for_line("Registered sensor worker")
    daemon.signal(signal.SIGINT)
    assert daemon.wait() == 0
    assert worker_row(db_url, "sensor-int")["status"] == "inactive"


def test_sighup_reloads_capabilities(db_url, tmp_path, notify_socket, daemons):
    path = config_for(tmp_path, db_url, "sensor-reload", capabilities={"runtimes": ["shell"]})
    daemon = daemons(path, notify=notify_socket)
    notify_socket.wait_for("READY=1")
    original = worker_row(db_url, "sensor-reload")

    with open(path, "w") as handle:
        handle.write(f"database: {{url: '{db_url}'}}\nsensor:\n  worker_name: sensor-reload\n"
                     "  heartbeat_interval: 0.5\n  max_concurrent_sensors: 3\n"
                     "  capabilities: {runtimes: [shell, node], gpu: true}\n")
    daemon.signal(signal.SIGHUP)
    notify_socket.wait_for("READY=1", count=2)
    row = worker_row(db_url, "sensor-reload")
    assert row["capabilities"]["runtimes"] == ["shell", "node"]
    assert row["capabilities"]["gpu"] is True
    assert row["capabilities"]["max_concurrent_sensors"] == 3
    assert row["id"] == original["id"] and row["meta"]["instance_id"] == original["meta"]["instance_id"]
    fields = notify_socket.fields()
    reloading = fields.index("RELOADING=1")
    assert fields[reloading + 1].startswith("MONOTONIC_USEC=") and int(fields[reloading + 1].split("=")[1]) > 0
    assert "READY=1" in fields[reloading:]
    assert daemon.proc.poll() is None


def test_sighup_with_a_bad_config_keeps_the_running_one(db_url, tmp_path, notify_socket, daemons):
    path = config_for(tmp_path, db_url, "sensor-badreload", capabilities={"runtimes": ["shell"]})
    daemon = daemons(path, notify=notify_socket)
    notify_socket.wait_for("READY=1")
    with open(path, "w") as handle:
        handle.write("sensor: [this is: not valid\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_line("Reload failed, keeping the running configuration")
    notify_socket.wait_for("READY=1", count=2)
    beats = sum("heartbeat:" in line for line in daemon.lines)
    daemon.wait_for_line("heartbeat:", count=beats + 2)
    assert worker_row(db_url, "sensor-badreload")["capabilities"]["runtimes"] == ["shell"]
    assert daemon.proc.poll() is None
    assert "YAML syntax error at line 2" in daemon.output


def test_watchdog_too_short_for_interval_exits_78(db_url, tmp_path, daemons):
    daemon = daemons(config_for(tmp_path, db_url, "sensor-wd", heartbeat_interval=30),
                     env={"WATCHDOG_USEC": "20000000"})
    assert daemon.wait() == 78
    assert "heartbeat_interval" in daemon.output and "WatchdogSec" in daemon.output
    assert "Traceback" not in daemon.output
    assert worker_row(db_url, "sensor-wd") is None


def test_name_conflict_with_live_worker_on_other_host_exits_78(db_url, tmp_path, daemons):
    query(db_url, "INSERT INTO worker (name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat) "
                  "VALUES ('sensor-taken', 'local', 'sensor', 'other-host', 'active', '{\"heartbeat_interval\": 30}', "
                  "'{\"machine_id\": \"another-machine\", \"hostname\": \"other-host\", \"instance_id\": \"x\"}', now())")
    before = worker_row(db_url, "sensor-taken")
    daemon = daemons(config_for(tmp_path, db_url, "sensor-taken"))
    assert daemon.wait() == 78
    assert "other-host" in daemon.output and "Traceback" not in daemon.output
    assert worker_row(db_url, "sensor-taken") == before


def test_deleted_row_is_registered_again(db_url, tmp_path, daemons):
    daemon = daemons(config_for(tmp_path, db_url, "sensor-deleted"))
    daemon.wait_for_line("Registered sensor worker")
    query(db_url, "DELETE FROM worker WHERE name = 'sensor-deleted'")
    daemon.wait_for_line("was missing from the database and was registered again")
    assert worker_row(db_url, "sensor-deleted")["status"] == "active"


def test_takeover_by_another_process_ends_the_first_with_78(db_url, tmp_path, daemons):
    first = daemons(config_for(tmp_path, db_url, "sensor-shared"))
    first.wait_for_line("Registered sensor worker")
    row = worker_row(db_url, "sensor-shared")
    # Another instance takes the row over (same machine: allowed); the first is fenced out.
    query(db_url, "UPDATE worker SET meta = jsonb_set(meta, '{instance_id}', '\"other\"') || "
                  "'{\"hostname\": \"intruder\"}' WHERE id = %s", (row["id"],))
    assert first.wait() == 78
    assert "taken over" in first.output and "intruder" in first.output
    # the fenced daemon must not have marked the new owner's row inactive
    assert worker_row(db_url, "sensor-shared")["status"] == "active"


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_database_loss_and_return(cluster, db_url, tmp_path, notify_socket, daemons, mode):
    daemon = daemons(config_for(tmp_path, db_url, "sensor-outage"), notify=notify_socket)
    notify_socket.wait_for("READY=1")
    worker_id = worker_row(db_url, "sensor-outage")["id"]
    # The test cluster commits asynchronously: make the registration durable before a crash.
    cluster.psql("CHECKPOINT")
    cluster.stop(mode)
    try:
        daemon.wait_for_line("heartbeat failed", count=3)
        watchdogs = notify_socket.count("WATCHDOG=1")
        notify_socket.wait_for("WATCHDOG=1", count=watchdogs + 2)  # the rhythm goes on
        assert daemon.proc.poll() is None
    finally:
        cluster.start()
    beats = sum("heartbeat: worker" in line for line in daemon.lines)
    daemon.wait_for_line("heartbeat: worker", count=beats + 1)
    row = worker_row(db_url, "sensor-outage")
    assert row["id"] == worker_id and row["status"] == "active"
    assert query(db_url, "SELECT count(*) FROM worker")[0][0] == 1, query(db_url, "SELECT name, worker_role, host, status FROM worker")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_waits_for_database_at_start_then_registers(cluster, spec_db_url, tmp_path, notify_socket, daemons):
    cluster.stop("fast")
    try:
        daemon = daemons(config_for(tmp_path, spec_db_url, "sensor-late"), notify=notify_socket)
        notify_socket.wait_for("EXTEND_TIMEOUT_USEC=", count=2)
        time.sleep(3)  # minutes of waiting are covered in-process (test_service.py)
        assert notify_socket.count("READY=1") == 0 and daemon.proc.poll() is None
        assert any(f.startswith("STATUS=Waiting for the database") for f in notify_socket.fields())
        extends = [int(f.split("=")[1]) for f in notify_socket.fields() if f.startswith("EXTEND_TIMEOUT_USEC=")]
        assert max(extends) <= (30 * 1.2 + 10 + 5) * 1_000_000  # capped backoff, never an unbounded wait
    finally:
        cluster.start()
    notify_socket.wait_for("READY=1", timeout=45)
    assert worker_row(spec_db_url, "sensor-late")["status"] == "active"


def test_sigterm_during_start_retry_exits_0_promptly(cluster, db_url, tmp_path, notify_socket, daemons):
    cluster.stop("fast")
    try:
        daemon = daemons(config_for(tmp_path, db_url, "sensor-giveup"), notify=notify_socket)
        notify_socket.wait_for("EXTEND_TIMEOUT_USEC=")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=10) == 0  # not after its backoff: the signal cuts the wait short
    finally:
        cluster.start()
    assert worker_row(db_url, "sensor-giveup") is None


def test_password_never_appears_in_output(cluster, db_url, tmp_path, daemons):
    from pgcluster import ADMIN_PASSWORD

    daemon = daemons(config_for(tmp_path, db_url, "sensor-secret", heartbeat_interval=0.3))
    daemon.wait_for_line("heartbeat: worker")
    cluster.stop("immediate")
    try:
        daemon.wait_for_line("heartbeat failed")
    finally:
        cluster.start()
    daemon.signal(signal.SIGTERM)
    daemon.wait()
    assert ADMIN_PASSWORD not in daemon.output


def test_missing_schema_exits_78_saying_what_to_do(empty_db_url, tmp_path, daemons):
    daemon = daemons(config_for(tmp_path, empty_db_url, "sensor-noschema"))
    assert daemon.wait() == 78
    assert "attune-sensor migrate run" in daemon.output and "Traceback" not in daemon.output


def test_json_logs(db_url, tmp_path, daemons):
    import json

    path = write_config(tmp_path, {"database": {"url": db_url}, "log": {"format": "json"},
                                  "sensor": {"worker_name": "sensor-json", "heartbeat_interval": 0.3}})
    daemon = daemons(path)
    daemon.wait_for_line("heartbeat: worker")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    records = [json.loads(line) for line in daemon.lines]
    assert records[0]["message"].startswith("Registering sensor worker sensor-json")
    assert {"levelname", "asctime", "name"} <= set(records[0])


def test_journal_priority_prefixes(db_url, tmp_path, daemons):
    daemon = daemons(config_for(tmp_path, db_url, "sensor-journal"), env={"JOURNAL_STREAM": "8:1234"})
    daemon.wait_for_line("heartbeat: worker")
    assert daemon.lines[0].startswith("<6>INFO Registering sensor worker")


def test_a_notify_receiver_that_stops_reading_does_not_stall_heartbeats(db_url, tmp_path, daemons):
    import socket as socketlib

    path = f"{tmp_path}/deaf.sock"
    deaf = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
    deaf.bind(path)  # bound, never read
    filler = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
    filler.setblocking(False)
    sent = 0
    try:
        while sent < 100_000:  # fill its queue before the daemon starts: every notify finds it full
            filler.sendto(b"X=1", path)
            sent += 1
    except BlockingIOError:
        pass
    assert sent < 100_000, "the receiver's queue never filled"
    try:
        daemon = daemons(config_for(tmp_path, db_url, "sensor-deaf", heartbeat_interval=0.1, reaper=False),
                         env={"NOTIFY_SOCKET": path})
        daemon.wait_for_line("heartbeat: worker", count=20, timeout=30)
        assert daemon.proc.poll() is None
    finally:
        filler.close()
        deaf.close()


def test_sighup_while_waiting_for_the_database_keeps_waiting_and_uses_the_new_config(
        cluster, db_url, tmp_path, notify_socket, daemons):
    path = config_for(tmp_path, db_url, "sensor-hup-early", capabilities={"runtimes": ["shell"]})
    cluster.stop("fast")
    try:
        daemon = daemons(path, notify=notify_socket)
        notify_socket.wait_for("EXTEND_TIMEOUT_USEC=")
        with open(path, "w") as handle:
            handle.write(f"database: {{url: '{db_url}'}}\nsensor:\n  worker_name: sensor-hup-early\n"
                         "  heartbeat_interval: 0.5\n  capabilities: {runtimes: [shell, node]}\n")
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_line("used at registration")
        attempts = sum("Database not reachable" in line for line in daemon.lines)
        time.sleep(3)
        # still backing off (not spinning), and nothing told systemd it is ready or reloading
        assert sum("Database not reachable" in line for line in daemon.lines) <= attempts + 2
        assert notify_socket.count("READY=1") == 0 and notify_socket.count("RELOADING=1") == 0
    finally:
        cluster.start()
    notify_socket.wait_for("READY=1", timeout=45)
    assert worker_row(db_url, "sensor-hup-early")["capabilities"]["runtimes"] == ["shell", "node"]


def test_json_logs_carry_journal_priorities_under_systemd(db_url, tmp_path, daemons):
    import json

    path = write_config(tmp_path, {"database": {"url": db_url}, "log": {"format": "json"},
                                  "sensor": {"worker_name": "sensor-jsonj", "heartbeat_interval": 0.3}})
    daemon = daemons(path, env={"JOURNAL_STREAM": "8:1234"})
    daemon.wait_for_line("heartbeat: worker")
    first = daemon.lines[0]
    assert first.startswith("<6>{")
    assert json.loads(first[3:])["message"].startswith("Registering sensor worker sensor-jsonj")


# Loaded by the daemon's interpreter (PYTHONPATH) before the console script runs: when the CLI
# module starts to load, it says so (with whether SIGHUP is held or handled by then, and which
# of our modules came before) and makes that import take 0.2 s, so that SIGHUPs sent from that
# line on land inside it every time, not by luck of timing.
SLOW_CLI_IMPORT = """\
import signal, sys, time

class SlowCli:
    def find_spec(self, name, path=None, target=None):
        if name == "attune_sensor.cli":
            held = signal.SIGHUP in signal.pthread_sigmask(signal.SIG_BLOCK, [])
            handled = signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, None)
            ours = sorted(m for m in sys.modules if m.startswith("attune_sensor"))
            sys.stderr.write(f"loading the CLI: sighup held={held} handled={handled} after={','.join(ours)}\\n")
            sys.stderr.flush()
            time.sleep(0.2)
        return None

sys.meta_path.insert(0, SlowCli())
"""


def test_sighups_from_the_start_of_our_code_reload_instead_of_killing(db_url, tmp_path, daemons):
    # Nothing can take SIGHUP during the interpreter's own start-up (~10 ms: the default action
    # ends the process; systemd starts us with it unblocked), nor during the `import re` of the
    # console script setup.cfg generates. From the entry point's first line on it must be
    # taken: so SIGHUPs come without pause from the moment the CLI starts loading (imports,
    # config load, runtime probes, connecting, registering), for 0.6 s.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_CLI_IMPORT)
    daemon = daemons(config_for(tmp_path, db_url, "sensor-early-hup"), env={"PYTHONPATH": str(hook)})
    started = time.monotonic()
    while not any("loading the CLI" in line for line in daemon.lines):
        assert daemon.proc.poll() is None and time.monotonic() - started < 20, daemon.output
        time.sleep(0.001)
    flood_started, sent = time.monotonic(), 0
    while time.monotonic() - flood_started < 0.6 and daemon.proc.poll() is None:
        daemon.signal(signal.SIGHUP)
        sent += 1
    assert daemon.proc.poll() is None, f"killed after {sent} SIGHUPs: {daemon.proc.returncode}\n{daemon.output}"
    loading = next(line for line in daemon.lines if "loading the CLI" in line)
    assert "after=attune_sensor,attune_sensor.worker,attune_sensor.worker.signals" in loading  # held as the very first thing
    daemon.wait_for_line("heartbeat: worker", count=2)
    daemon.wait_for_line("Reloaded configuration")  # the SIGHUPs were acted on, not held for good
    assert worker_row(db_url, "sensor-early-hup")["status"] == "active"
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert worker_row(db_url, "sensor-early-hup")["status"] == "inactive"
    assert "Traceback" not in daemon.output


def test_a_burst_of_sighups_while_waiting_does_not_bypass_the_backoff(tmp_path, daemons):
    from pgcluster import free_port

    # nothing listens there: every attempt is refused at once
    daemon = daemons(config_for(tmp_path, f"postgresql://nobody@127.0.0.1:{free_port()}/none", "sensor-burst"))
    daemon.wait_for_line("Database not reachable")
    for _ in range(100):
        daemon.signal(signal.SIGHUP)
        time.sleep(0.02)
    attempts = sum("Database not reachable" in line for line in daemon.lines)
    # 2 s of SIGHUPs inside a backoff of 1 s, then 2 s (x 0.8-1.2): a handful of attempts, not 100
    assert attempts <= 3, attempts
    assert daemon.proc.poll() is None
