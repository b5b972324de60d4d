"""Cost of one heartbeat: statements and round trips per heartbeat in the steady state (counted
by pg_stat_statements), the reaper's statements, and the latency of the daemon's heartbeat
against the same statement sent raw with psycopg2 (the physical floor: one round trip)."""

import os
import subprocess
import tempfile
import time

import psycopg2

from common import ATTUNE_SENSOR, RUNS, database, gate_scans, median, percentile, table
from attune_sensor import config as config_module
from attune_sensor.db import Database
from attune_sensor.registration import REAPING_HEARTBEAT_SQL, SensorWorkerRegistration

ITERATIONS = int(os.environ.get("BENCH_HEARTBEATS", "3000"))


def is_heartbeat(query):
    """The heartbeat, with or without the reaper's CTEs in front (registration.py)."""
    return "UPDATE worker SET last_heartbeat" in query


def statements_per_heartbeat(url, workdir, heartbeats=100, reaper=False):
    path = os.path.join(workdir, f"count-{reaper}.yaml")
    with open(path, "w") as handle:
        handle.write(f"database: {{url: '{url}'}}\nsensor:\n  worker_name: counted-{str(reaper).lower()}\n"
                     f"  heartbeat_interval: 0.1\n  reaper: {str(reaper).lower()}\n  capabilities: {{runtimes: [shell]}}\n")
    admin = psycopg2.connect(url)
    admin.autocommit = True
    cursor = admin.cursor()
    cursor.execute("SELECT pg_stat_statements_reset()")
    proc = subprocess.Popen([ATTUNE_SENSOR, "--config", path, "run"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seen = 0
    for line in proc.stderr:
        seen += "heartbeat: worker" in line
        if seen == heartbeats:
            break
    proc.terminate()
    proc.wait()
    cursor.execute("SELECT query, calls FROM pg_stat_statements "
                   "WHERE query NOT LIKE '%%pg_stat_statements%%' AND dbid = (SELECT oid FROM pg_database "
                   "WHERE datname = current_database()) ORDER BY calls DESC")
    rows = cursor.fetchall()
    admin.close()
    heartbeat_calls = sum(calls for query, calls in rows if is_heartbeat(query))
    other = [(" ".join(q.split())[:60], c) for q, c in rows if not is_heartbeat(q)]
    return heartbeats, heartbeat_calls, other


def reaper_statements(url, workdir, daemons=5, seconds=5):
    admin = psycopg2.connect(url)
    admin.autocommit = True
    cursor = admin.cursor()
    cursor.execute("SELECT pg_stat_statements_reset()")
    procs = []
    for n in range(daemons):
        path = os.path.join(workdir, f"reaper{n}.yaml")
        with open(path, "w") as handle:
            handle.write(f"database: {{url: '{url}'}}\nsensor:\n  worker_name: reaper-{n}\n  heartbeat_interval: 1\n"
                         "  capabilities: {runtimes: [shell]}\n")
        procs.append(subprocess.Popen([ATTUNE_SENSOR, "--config", path, "run"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
    before = gate_scans(cursor)
    time.sleep(seconds)
    for proc in procs:
        proc.terminate()
        proc.wait()
    time.sleep(1.5)  # the daemons' statistics reach the shared counters
    scans = gate_scans(cursor) - before
    cursor.execute("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query NOT LIKE '%%pg_stat%%' "
                   "AND query NOT LIKE '%%UPDATE worker SET last_heartbeat%%' "
                   "AND query LIKE '%%pg_try_advisory_xact_lock%%'")
    separate = cursor.fetchone()[0]
    admin.close()
    return daemons, seconds, scans, separate


def latency(url):
    cfg = config_module.load(None, environ={"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"})
    cfg = cfg.with_sensor(worker_name="latency")
    db = Database.from_config(cfg)
    registration = SensorWorkerRegistration(db, cfg, ["shell"])
    registration.register()
    registration.reap_multiplier = 3.0  # as the daemon runs it: the reaper's gate in every heartbeat
    # the floor heartbeats a row of its own, so the two fences never cross
    floor_registration = SensorWorkerRegistration(db, cfg.with_sensor(worker_name="floor"), ["shell"])
    floor_registration.register()
    # the same statement as the daemon's (with the reaper's CTEs), sent raw
    fence = {"id": floor_registration.worker_id, "xmin": floor_registration._row["xmin"], "name": "floor",
             "multiplier": 3.0}
    raw = psycopg2.connect(url)
    raw.autocommit = True
    cursor = raw.cursor()
    ours, floor = [], []
    for block in range(10):  # interleaved blocks: drift on a shared machine hits both sides
        for _ in range(ITERATIONS // 10):
            started = time.perf_counter()
            registration.heartbeat()
            ours.append(time.perf_counter() - started)
        for _ in range(ITERATIONS // 10):
            started = time.perf_counter()
            cursor.execute(REAPING_HEARTBEAT_SQL, fence)
            fence["xmin"] = cursor.fetchall()[0][0]
            floor.append(time.perf_counter() - started)
    db.close()
    raw.close()
    return ours, floor


def main():
    with database() as (cluster, url), tempfile.TemporaryDirectory() as workdir:
        for reaper in (False, True):
            beats, calls, other = statements_per_heartbeat(url, workdir, reaper=reaper)
            table(f"Statements per heartbeat (pg_stat_statements, one daemon, reaper {'on' if reaper else 'off'})",
                  ("statement", "calls"), [(f"heartbeat ({beats} heartbeats logged)", calls)] + other)
            print(f"\nsteady state: {calls / beats:.3f} heartbeat statements per heartbeat, one round trip each "
                  f"(async protocol, no BEGIN/COMMIT); other statements: start-up and deregister only.")
        daemons, seconds, scans, separate = reaper_statements(url, workdir)
        print(f"reaper: {daemons} daemons at 1 s for {seconds}s: {scans} stale scan(s) through the gate "
              f"(at most one per 10 s fleet-wide), {separate} reap statements besides the heartbeats.")
        medians, p99s = [], []
        for _ in range(RUNS):
            ours, floor = latency(url)
            medians.append((median(ours), median(floor)))
            p99s.append((percentile(ours, 99), percentile(floor, 99)))
        ours_med = median([m[0] for m in medians])
        floor_med = median([m[1] for m in medians])
        ours_p99 = median([p[0] for p in p99s])
        floor_p99 = median([p[1] for p in p99s])
        table(f"Heartbeat latency, {ITERATIONS} each, median of {RUNS} runs",
              ("measure", "daemon heartbeat()", "raw psycopg2 UPDATE", "ratio", "target"), [
                  ("median", f"{ours_med * 1e6:.0f} us", f"{floor_med * 1e6:.0f} us", f"{ours_med / floor_med:.2f}", "<= 1.2"),
                  ("p99", f"{ours_p99 * 1e6:.0f} us", f"{floor_p99 * 1e6:.0f} us", f"{ours_p99 / floor_p99:.2f}", "-"),
              ])


if __name__ == "__main__":
    main()
