"""Cost of one heartbeat: the statements a daemon sends per heartbeat (counted by
pg_stat_statements against the heartbeats it logged), the reaper's statements, the server time
of the daemon's heartbeat (the call of attune_sensor.heartbeat, with its gated reaper) against
the bare fenced UPDATE sent raw beside it, and the latency of the daemon's heartbeat against the
same statement sent raw with psycopg2 on a connection of its own (the physical floor: one round
trip), interleaved in the same run.

Server time: one daemon (reaper on) at the 0.1 s floor until it logged BENCH_SERVER_HEARTBEATS
heartbeats, while this script sends registration.HEARTBEAT_SQL (the bare UPDATE with its real
xmin fence, no reaper) for a row of its own at the same pace, as text on a plain connection (so
planned at every call, like every statement of the daemon). pg_stat_statements with
track_planning = on gives each statement's mean planning and mean execution time; the ratio of
their sums is the figure (target <= 1.3, docs/performance.md section 2).

Knobs: BENCH_COUNTED_HEARTBEATS (100 per daemon, at the 0.1 s floor), BENCH_REAPER_DAEMONS (5)
and BENCH_REAPER_SECONDS (5), BENCH_SERVER_HEARTBEATS (600), BENCH_HEARTBEATS (3000 timed
heartbeats a side), BENCH_RUNS (3); BENCH_QUICK=1: 10 counted, 2 daemons for 2 s, 20 for the
server time, 100 timed, one run.
"""

import math
import tempfile
import time

import psycopg2

from common import (RUNS, Daemon, database, fail, gate_scans, knob, median, percentile, table,
                    write_config)
from attune_sensor import config as config_module
from attune_sensor.db import Database
from attune_sensor.fleet import REAP_PERIOD
from attune_sensor.worker.registration import HEARTBEAT_SQL, REAPING_HEARTBEAT_SQL, SensorWorkerRegistration

ITERATIONS = knob("BENCH_HEARTBEATS", 3000, 100)
COUNTED = knob("BENCH_COUNTED_HEARTBEATS", 100, 10)
REAPER_DAEMONS = knob("BENCH_REAPER_DAEMONS", 5, 2)
REAPER_SECONDS = knob("BENCH_REAPER_SECONDS", 5.0, 2.0, float)
SERVER_HEARTBEATS = knob("BENCH_SERVER_HEARTBEATS", 600, 20)
# pg_stat_statements times planning too only with this (off by default)
SETTINGS = ("pg_stat_statements.track_planning = on",)
HEARTBEAT = "heartbeat: worker"


def kind(query):
    """What a statement in pg_stat_statements is, by the shape of the project's SQL."""
    if "attune_sensor.heartbeat(" in query:  # registration.REAPING_HEARTBEAT_SQL
        return "heartbeat (attune_sensor.heartbeat: with the gated reaper)"
    if "UPDATE worker SET last_heartbeat" in query:  # registration.HEARTBEAT_SQL (and RESUME_SQL)
        return "heartbeat"
    if query.strip().upper() in ("BEGIN", "COMMIT", "ROLLBACK"):
        return "transaction control"
    return "other"


def stat_statements(cursor):
    cursor.execute("SELECT query, calls FROM pg_stat_statements "
                   "WHERE query NOT LIKE '%%pg_stat_statements%%' AND dbid = (SELECT oid FROM pg_database "
                   "WHERE datname = current_database()) ORDER BY calls DESC, query")
    return cursor.fetchall()


def statements_per_heartbeat(url, workdir, reaper):
    """One daemon at the floor interval until it logged COUNTED heartbeats, then stopped; every
    statement it sent, by kind, against the heartbeats it logged in all."""
    path = write_config(workdir, url, f"counted-{str(reaper).lower()}",
                        heartbeat_interval=config_module.MIN_HEARTBEAT_INTERVAL, reaper=reaper,
                        capabilities={"runtimes": ["shell"]})
    admin = psycopg2.connect(url)
    admin.autocommit = True
    cursor = admin.cursor()
    cursor.execute("SELECT pg_stat_statements_reset()")
    with Daemon(path, name=f"daemon (reaper {'on' if reaper else 'off'})") as daemon:
        daemon.wait_for(HEARTBEAT, COUNTED, timeout=COUNTED * config_module.MIN_HEARTBEAT_INTERVAL * 5 + 60)
        daemon.stop_cleanly()
        logged = daemon.count(HEARTBEAT)
    rows = stat_statements(cursor)
    admin.close()
    return logged, [(kind(q), " ".join(q.split())[:60], c) for q, c in rows]


def reaper_statements(url, workdir):
    """REAPER_DAEMONS daemons at 1 s for REAPER_SECONDS: how often the fleet's gate opened, and
    how many reap statements were sent besides the heartbeats."""
    admin = psycopg2.connect(url)
    admin.autocommit = True
    cursor = admin.cursor()
    cursor.execute("SELECT pg_stat_statements_reset()")
    before = gate_scans(cursor)
    daemons = [Daemon(write_config(workdir, url, f"reaper-{n}", heartbeat_interval=1,
                                   capabilities={"runtimes": ["shell"]}), name=f"daemon reaper-{n}")
               for n in range(REAPER_DAEMONS)]
    try:
        started = time.monotonic()
        while time.monotonic() - started < REAPER_SECONDS:
            for daemon in daemons:
                daemon.check_running(f"{REAPER_SECONDS:g} s of heartbeats")
            time.sleep(0.1)
        for daemon in daemons:
            daemon.wait_for(HEARTBEAT, 1, timeout=10)
            daemon.stop_cleanly()
    finally:
        for daemon in daemons:
            daemon.__exit__(None, None, None)
    time.sleep(1.5)  # the daemons' statistics reach the shared counters
    cursor.execute("SELECT pg_stat_clear_snapshot()")
    scans = gate_scans(cursor) - before
    separate = sum(calls for query, calls in stat_statements(cursor)
                   if kind(query) == "other" and "pg_try_advisory_xact_lock" in query)
    admin.close()
    return scans, separate


def server_time(url, workdir):
    """{statement: (calls, mean planning ms, mean execution ms)} for the daemon's heartbeat and
    the bare fenced UPDATE sent raw beside it, from pg_stat_statements, and the heartbeats the
    daemon logged."""
    path = write_config(workdir, url, "server-time", heartbeat_interval=config_module.MIN_HEARTBEAT_INTERVAL,
                        capabilities={"runtimes": ["shell"]})
    cfg = config_module.load(None, environ={"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"})
    bare = SensorWorkerRegistration(Database.from_config(cfg), cfg.with_sensor(worker_name="bare"), ["shell"])
    bare.register()
    bare.db.close()
    fence = {"id": bare.worker_id, "xmin": bare._row["xmin"]}
    raw = psycopg2.connect(url)
    raw.autocommit = True
    cursor = raw.cursor()
    cursor.execute("SELECT pg_stat_statements_reset()")
    sent = 0
    with Daemon(path, name="daemon (reaper on)") as daemon:
        daemon.wait_for("Registered sensor worker", timeout=60)
        deadline = time.monotonic() + SERVER_HEARTBEATS * config_module.MIN_HEARTBEAT_INTERVAL * 5 + 60
        while True:
            daemon.poll()
            if daemon.count(HEARTBEAT) >= SERVER_HEARTBEATS:
                break
            daemon.check_running(f"{SERVER_HEARTBEATS} heartbeats")
            if time.monotonic() > deadline:
                fail(f"the daemon logged {daemon.count(HEARTBEAT)} of {SERVER_HEARTBEATS} heartbeats in time")
            cursor.execute(HEARTBEAT_SQL, fence)  # as text: planned at every call, like the daemon's
            rows = cursor.fetchall()
            if not rows:
                fail("the bare heartbeat matched no row: its fence missed")
            fence["xmin"] = rows[0][0]
            sent += 1
            time.sleep(config_module.MIN_HEARTBEAT_INTERVAL)
        daemon.stop_cleanly()
        logged = daemon.count(HEARTBEAT)
    cursor.execute("SELECT query, calls, mean_plan_time, mean_exec_time FROM pg_stat_statements "
                   "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND toplevel")
    found = {}
    for query, calls, plan, execute in cursor.fetchall():
        what = kind(query)
        if what.startswith("heartbeat") and "RETURNING xmin::text, last_heartbeat" in " ".join(query.split()) \
                or what.startswith("heartbeat (attune_sensor"):
            found[what] = (calls, plan, execute)
    raw.close()
    for what, expected in (("heartbeat (attune_sensor.heartbeat: with the gated reaper)", logged),
                           ("heartbeat", sent)):
        if what not in found:
            fail(f"pg_stat_statements has no {what!r} statement")
        if found[what][0] < expected:
            fail(f"pg_stat_statements counted {found[what][0]} calls of {what!r}, fewer than the {expected} made")
    return found, logged, sent


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
    blocks = 10
    for _ in range(blocks):  # interleaved blocks: drift on a shared machine hits both sides
        for _ in range(max(1, ITERATIONS // blocks)):
            started = time.perf_counter()
            beat = registration.heartbeat()
            ours.append(time.perf_counter() - started)
            if not beat:
                fail("the daemon's heartbeat() matched no row")
        for _ in range(max(1, ITERATIONS // blocks)):
            started = time.perf_counter()
            cursor.execute(REAPING_HEARTBEAT_SQL, fence)
            rows = cursor.fetchall()
            floor.append(time.perf_counter() - started)
            if not rows or rows[0][0] is None:
                fail("the raw heartbeat matched no row: its fence missed")
            fence["xmin"] = rows[0][0]
    db.close()
    raw.close()
    return ours, floor


def main():
    with database(settings=SETTINGS) as (_, url), tempfile.TemporaryDirectory() as workdir:
        for reaper in (False, True):
            logged, rows = statements_per_heartbeat(url, workdir, reaper)
            if not logged:
                fail("the daemon logged no heartbeat")
            per_kind = {}
            for k, _, calls in rows:
                per_kind[k] = per_kind.get(k, 0) + calls
            heartbeats = sum(c for k, c in per_kind.items() if k.startswith("heartbeat"))
            table(f"Statements of one daemon (pg_stat_statements), reaper {'on' if reaper else 'off'}, "
                  f"{logged} heartbeats logged", ("kind", "statement", "calls", "per heartbeat logged"),
                  [(k, text, calls, f"{calls / logged:.3f}") for k, text, calls in rows])
            print(f"\n{heartbeats} heartbeat statement(s) for {logged} heartbeats logged ({heartbeats / logged:.3f} "
                  f"each), {per_kind.get('transaction control', 0)} BEGIN/COMMIT/ROLLBACK; "
                  f"{per_kind.get('other', 0)} other statement(s) in the whole run (start-up, placement passes, "
                  f"assignment reads, deregistration): {per_kind.get('other', 0) / logged:.2f} per heartbeat at "
                  f"{config_module.MIN_HEARTBEAT_INTERVAL:g} s.")
        scans, separate = reaper_statements(url, workdir)
        print(f"reaper: {REAPER_DAEMONS} daemons at 1 s for {REAPER_SECONDS:g} s: the gate opened {scans} time(s) "
              f"(its bound: {math.floor(REAPER_SECONDS / REAP_PERIOD) + 1}, one per {REAP_PERIOD:g} s fleet-wide); "
              f"{separate} reap statement(s) besides the heartbeats.")
        found, logged, sent = server_time(url, workdir)
        daemon = found["heartbeat (attune_sensor.heartbeat: with the gated reaper)"]
        bare = found["heartbeat"]
        rows = [(name, calls, f"{plan * 1000:.1f} us", f"{execute * 1000:.1f} us", f"{(plan + execute) * 1000:.1f} us")
                for name, (calls, plan, execute) in (("daemon: attune_sensor.heartbeat(...) with the gated reaper",
                                                      daemon), ("baseline: bare fenced UPDATE sent raw", bare))]
        ratio = (daemon[1] + daemon[2]) / (bare[1] + bare[2])
        table(f"Server time per heartbeat (pg_stat_statements, track_planning on; daemon at "
              f"{config_module.MIN_HEARTBEAT_INTERVAL:g} s, {logged} heartbeats logged, {sent} bare UPDATEs beside it)",
              ("statement", "calls", "mean planning", "mean execution", "planning + execution"), rows)
        print(f"\nratio daemon / bare UPDATE: {ratio:.2f} (target <= 1.3: {'met' if ratio <= 1.3 else 'missed'})")
        medians, p99s = [], []
        for _ in range(RUNS):
            ours, floor = latency(url)
            medians.append((median(ours), median(floor)))
            p99s.append((percentile(ours, 99), percentile(floor, 99)))
        ours_med = median([m[0] for m in medians])
        floor_med = median([m[1] for m in medians])
        ours_p99 = median([p[0] for p in p99s])
        floor_p99 = median([p[1] for p in p99s])
        table(f"Heartbeat latency, {len(ours)} each, median of {RUNS} runs",
              ("measure", "daemon heartbeat()", "baseline: raw psycopg2, same statement", "ratio", "target"), [
                  ("median", f"{ours_med * 1e6:.0f} us", f"{floor_med * 1e6:.0f} us", f"{ours_med / floor_med:.2f}",
                   "<= 1.2"),
                  ("p99", f"{ours_p99 * 1e6:.0f} us", f"{floor_p99 * 1e6:.0f} us", f"{ours_p99 / floor_p99:.2f}", "-"),
              ])


if __name__ == "__main__":
    main()
