"""The platform's sensors placed by the sync pass (platform/sync.py), on a database built by the
platform's own migrations (../shared/attune-schema; the project's fixture when that folder is
absent, said in the output):

1. a pass at size: BENCH_PLATFORM_SENSORS runnable sensors (each with a trigger and a rule)
   over BENCH_PLATFORM_WORKERS workers; the first pass (all added, then placed), a pass that
   changes nothing, and one after a tenth of the rules were disabled, against the baseline of
   the platform's own read of the same rows (its sensor service's "enabled sensors with an
   active rule": one count per sensor, as it does at start, here in one statement);
   and the memory of `attune-sensor sync` against `attune-sensor --version`;
2. latency with a real daemon (interval 1 s): from the INSERT of a runnable sensor's rule to its
   placement and to the sensor's own first line, and from disabling the rule to the sensor's
   exit, against the target max(interval, 10 s) + 2 s = 12 s (docs/scheduling.md).

Sizes (BENCH_QUICK=1: 50, 5, 1): BENCH_PLATFORM_SENSORS (default 10000),
BENCH_PLATFORM_WORKERS (default 1000), BENCH_SYNC_SAMPLES (default 5). Exits non-zero when a
daemon dies or anything it waits for never comes.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ATTUNE_SENSOR, ROOT, fail, knob, median, table

sys.path.insert(0, str(ROOT / "packaging"))
from pgcluster import Cluster  # noqa: E402

SENSORS = knob("BENCH_PLATFORM_SENSORS", 10000, 50)
WORKERS = knob("BENCH_PLATFORM_WORKERS", 1000, 5)
SAMPLES = knob("BENCH_SYNC_SAMPLES", 5, 1)
TARGET = 12.0
SCHEMA_DIR = Path(os.environ.get("ATTUNE_SCHEMA_DIR") or ROOT.parent / "shared" / "attune-schema")
FIXTURE = ROOT / "tests" / "attune_flavour.sql"

STARTS = """import os, time
with open(os.environ["ATTUNE_SENSOR_REF"].replace(".", "_") + ".out", "a") as f:
    f.write(f"{time.time():.6f}\\n")
while True:
    time.sleep(3600)
"""


def connect(url):
    import psycopg2

    conn = psycopg2.connect(url)
    conn.autocommit = True
    return conn


def execute(url, sql, params=None):
    conn = connect(url)
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []
    finally:
        conn.close()


def build(cluster, name):
    """A platform-flavour database, migrated by attune-sensor; returns (url, source)."""
    cluster.psql(f"CREATE DATABASE {name}")
    url = cluster.url(name)
    files = sorted(SCHEMA_DIR.glob("*.sql"))
    conn = connect(url)
    with conn.cursor() as cursor:
        if files:
            for path in files:
                cursor.execute("SET search_path TO attune, public")
                cursor.execute(path.read_text())
            cursor.execute(f"ALTER DATABASE {name} SET search_path TO attune, public")
        else:
            cursor.execute(FIXTURE.read_text())
    conn.close()
    from attune_sensor.db import migrations

    migrations.run(url, log=lambda *_: None)
    return url, ("the platform's migrations" if files else "the project's fixture")


def populate(url, sensors, workers):
    has_pack = execute(url, "SELECT to_regclass('pack') IS NOT NULL")[0][0]
    pack = "INSERT INTO pack (ref, label, version) VALUES ('bench', 'bench', '1.0.0'); " if has_pack else ""
    execute(url, pack + "INSERT INTO runtime (ref, name, aliases, distributions) "
                        "VALUES ('core.python', 'Python', '{python,python3}', '{}')")
    execute(url, "INSERT INTO sensor (ref, pack_ref, label, entrypoint, runtime, runtime_ref, enabled, worker_selector) "
                 "SELECT 'bench.s' || g, 'bench', 's' || g, 'starts.py', r.id, r.ref, true, "
                 "       CASE WHEN g %% 4 = 0 THEN '{\"zone\": \"a\"}'::jsonb ELSE '{}'::jsonb END "
                 "  FROM generate_series(1, %s) AS g, runtime AS r", (sensors,))
    execute(url, "INSERT INTO trigger (ref, pack_ref, label, sensor, sensor_ref) "
                 "SELECT 'bench.t' || s.id, 'bench', 't', s.id, s.ref FROM sensor AS s")
    pack_column, pack_value = (", pack", ", (SELECT id FROM pack)") if has_pack else ("", "")
    execute(url, f"INSERT INTO rule (ref, pack_ref, label, action_ref, trigger, trigger_ref, trigger_params, enabled"
                 f"{pack_column}) SELECT 'bench.r' || t.id, 'bench', 'r', 'core.echo', t.id, t.ref, "
                 f"jsonb_build_object('interval', t.id % 60), true{pack_value} FROM trigger AS t")
    execute(url, "INSERT INTO worker (name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat) "
                 "SELECT 'w' || g, 'local', 'sensor', 'h' || g, 'active', jsonb_build_object('runtimes', "
                 "'[\"python\"]'::jsonb, 'max_concurrent_sensors', 1000, 'heartbeat_interval', 3600, "
                 "'attune_sensor_schema', 20261201000005, 'labels', "
                 "jsonb_build_object('zone', CASE WHEN g %% 2 = 0 THEN 'a' ELSE 'b' END)), '{}', now() "
                 "FROM generate_series(1, %s) AS g", (workers,))


def timed(what, action):
    began = time.perf_counter()
    result = action()
    return what, time.perf_counter() - began, result


def pass_at_size(url):
    from attune_sensor.db import Database, schema
    from attune_sensor.placement.scheduler import PLACEMENT_LOCK_KEY, Scheduler
    from attune_sensor.platform import sync

    db = Database(url, statement_timeout=600)
    table_info = schema.attach(db)
    if not table_info.platform_sensors:
        fail("the database built has no readable platform sensors")
    scheduler = Scheduler(db, table_info)
    rows = []

    def one_pass():
        result = sync.run(db, "bench", PLACEMENT_LOCK_KEY, force=True)
        _, placed = scheduler.reconcile(limit=SENSORS + 1)
        return result, placed

    # the platform's own start-up read: each enabled sensor, and whether it has an active rule
    baseline_sql = ("SELECT s.id, s.ref, (SELECT count(*) FROM rule r JOIN trigger t ON r.trigger = t.id "
                    "WHERE t.sensor = s.id AND r.enabled) FROM sensor s WHERE s.enabled")
    _, base, base_rows = timed("baseline", lambda: db.execute(baseline_sql))
    if len(base_rows) != SENSORS:
        fail(f"the baseline read {len(base_rows)} sensors, not {SENSORS}")
    rows.append(("the platform's own read of its runnable sensors (baseline)", f"{base * 1000:.0f} ms", "1.00",
                 f"{len(base_rows)} sensors read"))
    for what, setup in (("first pass: every sensor added and placed", None),
                        ("a pass that changes nothing", None),
                        ("a pass after a tenth of the rules were disabled", "disable")):
        if setup == "disable":
            execute(url, "UPDATE rule SET enabled = false WHERE id % 10 = 0")
        _, seconds, (result, placed) = timed(what, one_pass)
        if not result.ran:
            fail(f"{what}: the pass did not run")
        changes = {kind: result.count(kind) for kind in ("added", "changed", "removed")}
        rows.append((what, f"{seconds * 1000:.0f} ms", f"{seconds / base:.2f}",
                     f"{result.runnable} runnable, {changes['added']} added, {changes['removed']} removed, "
                     f"{len(placed)} placed"))
    expected_removed = SENSORS // 10
    if changes["removed"] != expected_removed:
        fail(f"the last pass removed {changes['removed']} sensors, not {expected_removed}")
    db.close()
    # memory: a `sync` command's peak RSS, against the same program doing nothing. Read from the
    # process's own VmHWM while it runs (exec resets it): a fork of this bench, counted by
    # getrusage, would report the bench's own size for both.
    peaks = {}
    for label, args in (("attune-sensor --version", ["--version"]), ("attune-sensor sync", ["sync"])):
        with tempfile.TemporaryFile("w+") as errors:
            proc = subprocess.Popen([ATTUNE_SENSOR, *args], env={"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null",
                                                                  "PATH": os.environ["PATH"]},
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
            peak = 0
            while proc.poll() is None:
                peak = max(peak, vm_hwm(proc.pid))
                time.sleep(0.002)
            if proc.returncode != 0:
                errors.seek(0)
                fail(f"{label} exited {proc.returncode}: {errors.read().strip()}")
        if not peak:
            fail(f"{label} ended before its memory could be read")
        peaks[label] = peak
    table(f"A sync pass at {SENSORS:,} platform sensors over {WORKERS:,} workers",
          ["pass", "time", "x baseline", "what it did"], rows)
    base_rss = peaks["attune-sensor --version"]
    table("Peak memory of a process", ["process", "peak RSS", "x baseline"],
          [(label, f"{peak / 1024:.1f} MiB", f"{peak / base_rss:.2f}") for label, peak in peaks.items()])


def vm_hwm(pid):
    """The process's peak resident set in KiB (0 once it is gone or before it exec'd Python)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def wait_for(predicate, timeout, what, daemon):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if daemon.poll() is not None:
            fail(f"the daemon exited ({daemon.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def latency(url, workdir):
    packs = Path(workdir) / "packs" / "bench" / "sensors"
    packs.mkdir(parents=True)
    (packs / "starts.py").write_text(STARTS)
    config = Path(workdir) / "d.yaml"
    config.write_text(json.dumps({"database": {"url": url}, "packs_base_dir": str(Path(workdir) / "packs"),
                                  "api": {"token_file": "none"}, "log": {"level": "warning"},
                                  "sensor": {"worker_name": "sensor-bench", "heartbeat_interval": 1,
                                             "sensor_timeout": 2, "max_concurrent_sensors": 50}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTUNE") and k != "DATABASE_URL"}
    env["ATTUNE_SENSOR_RUNTIMES"] = "python"
    log = open(Path(workdir) / "daemon.log", "w")
    daemon = subprocess.Popen([ATTUNE_SENSOR, "--config", str(config), "run"], env=env, stdin=subprocess.DEVNULL,
                              stdout=log, stderr=subprocess.STDOUT)
    placed_after, running_after, stopped_after = [], [], []
    try:
        wait_for(lambda: execute(url, "SELECT 1 FROM worker WHERE name = 'sensor-bench' AND status = 'active'"),
                 30, "the daemon's registration", daemon)
        for n in range(SAMPLES):
            ref = f"bench.late{n}"
            sensor_id = execute(url, "INSERT INTO sensor (ref, pack_ref, label, entrypoint, runtime, runtime_ref, "
                                     "enabled) SELECT %s, 'bench', 'late', 'starts.py', id, ref, true FROM runtime "
                                     "RETURNING id", (ref,))[0][0]
            trigger_id = execute(url, "INSERT INTO trigger (ref, pack_ref, label, sensor, sensor_ref) "
                                      "VALUES (%s, 'bench', 't', %s, %s) RETURNING id",
                                 (f"bench.tlate{n}", sensor_id, ref))[0][0]
            has_pack = execute(url, "SELECT to_regclass('pack') IS NOT NULL")[0][0]
            began = time.time()
            execute(url, "INSERT INTO rule (ref, pack_ref, label, action_ref, trigger, trigger_ref, enabled"
                         + (", pack" if has_pack else "") + ") VALUES (%s, 'bench', 'r', 'core.echo', %s, %s, true"
                         + (", (SELECT id FROM pack)" if has_pack else "") + ")",
                    (f"bench.rlate{n}", trigger_id, f"bench.tlate{n}"))
            wait_for(lambda: execute(url, "SELECT 1 FROM attune_sensor.assignment WHERE sensor_ref = %s "
                                          "AND worker_id IS NOT NULL", (ref,)), 60, f"{ref} placed", daemon)
            placed_after.append(time.time() - began)
            out = packs / (ref.replace(".", "_") + ".out")
            first = wait_for(lambda: out.exists() and out.read_text().split(), 60, f"{ref} running", daemon)
            running_after.append(float(first[0]) - began)
            pid_rows = wait_for(lambda: execute(url, "SELECT pid FROM attune_sensor.sensor_run WHERE sensor_ref = %s "
                                                     "AND status = 'running'", (ref,)), 60, f"{ref} reported", daemon)
            began = time.time()
            execute(url, "UPDATE rule SET enabled = false WHERE ref = %s", (f"bench.rlate{n}",))
            pid = pid_rows[0][0]
            wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
                     open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z",
                     60, f"{ref} stopped", daemon)
            stopped_after.append(time.time() - began)
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
    table(f"A platform sensor with one daemon at interval 1 s ({SAMPLES} samples)",
          ["from", "to", "median", "max", "target"],
          [("its rule enabled", "placed", f"{median(placed_after):.1f} s", f"{max(placed_after):.1f} s",
            f"{TARGET:.0f} s"),
           ("its rule enabled", "the sensor's first line", f"{median(running_after):.1f} s",
            f"{max(running_after):.1f} s", "-"),
           ("its rule disabled", "the sensor stopped", f"{median(stopped_after):.1f} s",
            f"{max(stopped_after):.1f} s", "-")])


def main():
    cluster = Cluster().init().start()
    try:
        url, source = build(cluster, "plat")
        print(f"database built by {source}")
        populate(url, SENSORS, WORKERS)
        pass_at_size(url)
        lat_url, _ = build(cluster, "lat")
        populate(lat_url, 0, 0)
        with tempfile.TemporaryDirectory() as workdir:
            latency(lat_url, workdir)
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main()
