"""SensorService's loop in-process: a controlled clock and sleep, a recording notifier, and a real
database. Timing, reload and shutdown rules run in milliseconds here; what only a real process
can show (signals, systemd's socket, exit codes) stays in test_daemon.py."""

import pytest

from attune_sensor import config
from attune_sensor.worker import service as service_module
from attune_sensor.worker.service import SensorService
from pgcluster import free_port
from support import add_pending_sensors, query, run_cli, worker_row, write_config


class Clock:
    """Monotonic time that moves only when the service sleeps."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Notifier:
    def __init__(self):
        self.sent = []

    def ready(self, status):
        self.sent.append("READY=1")

    def watchdog(self):
        self.sent.append("WATCHDOG=1")

    def status(self, text):
        self.sent.append("STATUS")

    def extend_timeout(self, seconds, status):
        self.sent.append("EXTEND_TIMEOUT_USEC")
        self.extends = getattr(self, "extends", []) + [(seconds, status)]

    def reloading(self):
        self.sent.append("RELOADING=1")

    def stopping(self):
        self.sent.append("STOPPING=1")


def service_for(path, on_sleep):
    """A service whose sleeps advance the clock at once; on_sleep(service, slept) may act."""
    environ = {"ATTUNE_SENSOR_RUNTIMES": "shell"}
    cfg = config.load(path, environ)
    clock = Clock()
    service = SensorService(cfg, config_path=path, environ=environ, notifier=Notifier(), clock=clock)
    service.slept = []

    def sleep(seconds):
        if service.signals.stop_requested or service.signals.reload_requested:
            return
        clock.now += seconds
        service.slept.append(round(seconds, 6))
        on_sleep(service, seconds)

    service._sleep = sleep
    return service


def write(tmp_path, url, name, **sensor):
    sensor.setdefault("heartbeat_interval", 10)
    sensor.setdefault("reaper", False)
    return write_config(tmp_path, {"database": {"url": url}, "sensor": {"worker_name": name, **sensor}})


def stop_after(beats):
    def on_sleep(service, _):
        if service.notifier.sent.count("WATCHDOG=1") >= beats:
            service.stop()
    return on_sleep


def test_beats_keep_the_interval_and_stop_deregisters_last(db_url, tmp_path):
    service = service_for(write(tmp_path, db_url, "svc-rhythm"), stop_after(5))
    service.start()
    assert service.notifier.sent == ["READY=1"] + ["WATCHDOG=1"] * 5 + ["STOPPING=1"]
    assert service.slept[:6] == [10.0] * 6  # one interval between beats, none skipped, none doubled
    assert worker_row(db_url, "svc-rhythm")["status"] == "inactive"


def test_after_a_long_stall_the_rhythm_starts_afresh_without_a_burst(db_url, tmp_path):
    def on_sleep(service, slept):
        beats = service.notifier.sent.count("WATCHDOG=1")
        if beats == 2 and not getattr(service, "stalled", False):
            service.stalled = True
            service.clock.now += 95  # the process was frozen for 95 s
        elif beats >= 5:
            service.stop()

    service = service_for(write(tmp_path, db_url, "svc-stall"), on_sleep)
    service.start()
    # after the stall: one beat at once (overdue), then whole intervals again, not nine catch-ups
    assert service.slept[-3:] == [10.0, 10.0, 10.0]
    assert service.notifier.sent.count("WATCHDOG=1") == 5


def test_an_outage_keeps_the_watchdog_and_recovery_is_logged_before_the_beat(db_url, tmp_path, caplog):
    good = db_url
    dead = f"postgresql://nobody@127.0.0.1:{free_port()}/none"

    def on_sleep(service, _):
        beats = service.notifier.sent.count("WATCHDOG=1")
        if beats == 1:
            service.db.close()
            service.db.url = dead  # the database goes away
        elif beats == 4:
            service.db.url = good  # and comes back
        elif beats >= 6:
            service.stop()

    service = service_for(write(tmp_path, db_url, "svc-outage"), on_sleep)
    with caplog.at_level("INFO", logger="attune_sensor"):
        service.start()
    assert service.notifier.sent.count("WATCHDOG=1") == 6  # one per attempt, failed or not
    messages = [r.getMessage() for r in caplog.records]
    failures = [m for m in messages if m.startswith("heartbeat failed")]
    assert len(failures) == 3
    back = messages.index("Database reachable again")
    # said as soon as it is true: right after the last failure, before the beat that proved it
    assert messages[back - 1].startswith("heartbeat failed") and messages[back + 1].startswith("heartbeat: worker")
    assert worker_row(db_url, "svc-outage")["status"] == "inactive"


@pytest.mark.parametrize("new_text, applied", [
    ("sensor: {worker_name: svc-reload, heartbeat_interval: 10, reaper: false, max_concurrent_sensors: 4}", True),
    ("sensor: {worker_name: svc-reload, heartbeat_interval: -1}", False),
])
def test_reload_takes_a_good_config_and_keeps_the_running_one_for_a_bad_one(db_url, tmp_path, new_text, applied):
    path = write(tmp_path, db_url, "svc-reload")

    def on_sleep(service, _):
        beats = service.notifier.sent.count("WATCHDOG=1")
        if beats == 1 and "RELOADING=1" not in service.notifier.sent:
            with open(path, "w") as handle:
                handle.write(f"database: {{url: '{db_url}'}}\n{new_text}\n")
            service.reload()
        elif beats >= 3:
            service.stop()

    service = service_for(path, on_sleep)
    service.start()
    sent = service.notifier.sent
    assert sent[sent.index("RELOADING=1") + 1] == "READY=1"
    capacity = worker_row(db_url, "svc-reload")["capabilities"]["max_concurrent_sensors"]
    assert capacity == (4 if applied else 10)


def test_waiting_minutes_for_the_database_keeps_asking_systemd_for_bounded_time(db_url, tmp_path):
    dead = f"postgresql://nobody@127.0.0.1:{free_port()}/none"
    good = db_url

    def on_sleep(service, _):
        if service.clock.now - 1000.0 > 300:  # five minutes without a database, then it appears
            service.db.url = good
        if "READY=1" in service.notifier.sent:
            service.stop()

    service = service_for(write(tmp_path, db_url, "svc-late"), on_sleep)
    service.db.url = dead
    service.start()
    sent = service.notifier.sent
    waited = sent.index("READY=1")
    assert waited >= 10 and set(sent[:waited]) == {"EXTEND_TIMEOUT_USEC", "WATCHDOG=1"}
    extends = service.notifier.extends
    assert all(status.startswith("Waiting for the database") for _, status in extends)
    # the backoff is capped: each request for more time stays bounded, however long the wait
    assert max(seconds for seconds, _ in extends) <= 30 * 1.2 + 10 + 5
    assert max(service.slept) <= 30 * 1.2
    assert worker_row(db_url, "svc-late")["status"] == "inactive"  # registered, then stopped


def test_a_worker_sees_a_new_sensor_at_its_next_slower_read_not_its_next_beat(db_url, tmp_path, caplog):
    # Reads of a worker's own assignments come every max(10 s, interval), never one more
    # statement per heartbeat (docs/scheduling.md, "The worker's side").
    listing = tmp_path / "mine.json"
    seen = {}

    def on_sleep(service, _):
        beats = service.notifier.sent.count("WATCHDOG=1")
        if beats == 1 and "placed" not in seen:
            placed = run_cli("place", "s.cadence", "--runtime", "shell",
                             env={"DATABASE_URL": db_url, "ATTUNE_CONFIG": "/dev/null"})
            assert placed.stdout.strip() == "svc-cadence", placed.stderr
            seen["placed"] = service.clock()
        if "placed" in seen and "seen" not in seen and listing.exists() and "s.cadence" in listing.read_text():
            seen["seen"] = service.clock()
        if beats >= 30:
            service.stop()

    service = service_for(write(tmp_path, db_url, "svc-cadence", heartbeat_interval=1,
                                assignments_file=str(listing)), on_sleep)
    with caplog.at_level("INFO", logger="attune_sensor"):
        service.start()
    # placed one beat after the start-up read: seen at the read 10 s after that one, not at the
    # beat right after the placement (1 s), nor later than one read period
    assert 5 < seen["seen"] - seen["placed"] <= 10
    assert [r.getMessage() for r in caplog.records].count("assigned sensor s.cadence (runtime shell)") == 1


def test_placement_that_runs_out_of_time_goes_on_at_the_next_beats(db_url, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(service_module, "RECONCILE_SHARE", 0)  # no time at all: one batch per pass
    add_pending_sensors(db_url, 250, "shell")

    def on_sleep(service, _):
        if service.notifier.sent.count("WATCHDOG=1") >= 4:
            service.stop()

    service = service_for(write(tmp_path, db_url, "svc-placing", max_concurrent_sensors=300), on_sleep)
    with caplog.at_level("INFO", logger="attune_sensor"):
        service.start()
    passes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Sensors re-placed")]
    # registration places one batch, then each beat goes on where the last pass stopped
    assert [p.split(":", 1)[0] for p in passes[:3]] == [
        "Sensors re-placed after this worker registered",
        "Sensors re-placed after the previous pass, which ran out of time",
        "Sensors re-placed after the previous pass, which ran out of time"]
    assert [", 100 placed" in passes[0], ", 100 placed" in passes[1], ", 50 placed" in passes[2]] == [True] * 3
    assert ["more at the next beat" in p for p in passes[:3]] == [True, True, False]


def test_the_loop_wakes_for_the_fences_sigterm_whatever_else_it_waits_for(spec_db_url, tmp_path):
    """While sensors run, no sleep outlasts the moment the fence must stop them (runner/fence.py):
    the loop would otherwise act only at its next heartbeat, at or past the stale threshold."""
    from attune_sensor.runner import fence
    from attune_sensor.runner.supervisor import SensorSpec, _Child

    path = write(tmp_path, spec_db_url, "svc-fence", heartbeat_interval=10, stale_multiplier=3, sensor_timeout=30)
    service = service_for(path, lambda *_: None)
    service._last_ok = service.clock()
    child = _Child(SensorSpec(ref="s", runtime="shell", entrypoint="x.sh"))
    child.state = "waiting"  # nothing of the supervisor's own is due
    service.supervisor.children["s"] = child
    waited = []
    service.signals.wait = lambda seconds, fds=(): waited.append(seconds) or []
    SensorService._sleep(service, 1000.0)  # the real one: service_for replaced it with a fake
    term_at, _ = fence.deadlines(service._last_ok, 10, 3, 30)
    assert waited == [pytest.approx(term_at - service.clock())]
    assert waited[0] < 30 - 1  # before the window (3 x 10 s) less the margin


def test_a_fenced_out_heartbeat_logs_the_workers_it_reaped_and_moves_their_sensors(db_url, tmp_path, caplog):
    """The heartbeat's reap commits even when its fence misses (someone else wrote our row in
    between): its workers are logged and their sensors placed again at that beat, not at some
    later event."""
    sql = "SET search_path TO public, attune; "
    seen = {}

    def on_sleep(service, _):
        beats = service.notifier.sent.count("WATCHDOG=1")
        if beats == 1 and "dead" not in seen:
            seen["dead"] = query(db_url, sql + (
                "INSERT INTO worker (name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat) "
                "VALUES ('svc-dead', 'local', 'sensor', 'h', 'active', '{\"heartbeat_interval\": 1}', "
                "'{\"instance_id\": \"gone\"}', now() - interval '1 hour') RETURNING id"))[0][0]
            query(db_url, sql + "INSERT INTO attune_sensor.assignment (sensor_ref, runtime, worker_id, assigned_at) "
                                "VALUES ('s.orphaned', 'shell', %s, now()); "
                                "UPDATE attune_sensor.reaper_gate SET last_scan = '-infinity'; "
                                "UPDATE worker SET host = host WHERE name = 'svc-fenced'", (seen["dead"],))
        if beats >= 2:
            service.stop()

    service = service_for(write(tmp_path, db_url, "svc-fenced", reaper=True), on_sleep)
    with caplog.at_level("INFO", logger="attune_sensor"):
        service.start()
    messages = [r.getMessage() for r in caplog.records]
    assert f"Marked stale worker svc-dead (id {seen['dead']}, host h) inactive" in messages
    # placed on the only live worker, this one, which took it at once (its stop hands it back)
    assert any(m.startswith("Sensors re-placed after reaping svc-dead") and "(s.orphaned on svc-fenced)" in m
               for m in messages), messages
    assert "assigned sensor s.orphaned (runtime shell)" in messages
