"""Sensor placement at scale: placements per second with 4 concurrent placers, balance (largest
load over mean), capacity never exceeded, and the time to re-place the sensors of a tenth of
the workers dying at once: by one reconcile pass, then by a real daemon whose heartbeat finds
another tenth dead. Baseline measured in the same run: each sensor inserted on a random
worker offering its runtime, with no lock and no load ordering (what a placer costs at the
least, and what balance looks like without it).

Knobs: BENCH_WORKERS (default 1000), BENCH_SENSORS (default 10 per worker), BENCH_PLACERS (4);
BENCH_QUICK=1: 20 workers, 60 sensors. The issue's full size is BENCH_WORKERS=10000
BENCH_SENSORS=100000.
"""

import random
import sys
import tempfile
import time

import psycopg2

from common import Daemon, daemon_env, database, fail, insert_workers, knob, run_processes, table, write_config

WORKERS = knob("BENCH_WORKERS", 1000, 20)
SENSORS = knob("BENCH_SENSORS", WORKERS * 10, WORKERS * 3)
PLACERS = knob("BENCH_PLACERS", 4, 4)
CAPACITY = 12
# the real daemon's failover: the longest it may take before the bench gives up (and fails)
FAILOVER_SECONDS = 300


def scheduler_for(url):
    """(db, Scheduler) as a placer or an operator's command gets them: the project's own code."""
    from attune_sensor import config
    from attune_sensor.db import schema
    from attune_sensor.db import Database
    from attune_sensor.placement.scheduler import Scheduler

    db = Database.from_config(config.load(None, {"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"}))
    return db, Scheduler(db, schema.attach(db))


def placer(url, first, last):
    from attune_sensor.placement.scheduler import NoEligibleWorker

    db, scheduler = scheduler_for(url)
    for n in range(first, last):
        try:
            scheduler.place(f"sensor.{n}", ("python", "node", "shell")[n % 3], explain=False)
        except NoEligibleWorker:
            pass
    db.close()


def prepare(url):
    # heartbeat_interval 1 h: the simulated workers send no heartbeats, and must not turn stale
    # (3 x their interval) while a large run is still placing
    insert_workers(url, WORKERS, interval=3600)
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cursor:
        # every worker offers shell; a third python, a third node (insert_workers); all fresh
        cursor.execute("UPDATE worker SET last_heartbeat = now(), capabilities = capabilities || "
                       "jsonb_build_object('max_concurrent_sensors', %s)", (CAPACITY,))
        cursor.execute("VACUUM ANALYZE worker")
    return conn


def placed_count(cursor):
    cursor.execute("SELECT count(worker_id) FROM attune_sensor.assignment")
    return cursor.fetchone()[0]


def loads(cursor):
    cursor.execute("SELECT w.id, count(a.sensor_ref), (w.capabilities ->> 'max_concurrent_sensors')::int "
                   "FROM worker w LEFT JOIN attune_sensor.assignment a ON a.worker_id = w.id "
                   "WHERE w.status = 'active' GROUP BY w.id")
    return cursor.fetchall()


def balance(rows):
    counts = [r[1] for r in rows]
    mean = sum(counts) / len(counts)
    over = sum(1 for _, load, capacity in rows if load > capacity)
    return max(counts) / mean if mean else 0.0, over


def baseline(url):
    conn = prepare(url)
    cursor = conn.cursor()
    cursor.execute("SELECT id, capabilities -> 'runtimes' FROM worker")
    offering = {}
    for worker_id, runtimes in cursor.fetchall():
        for runtime in runtimes:
            offering.setdefault(runtime, []).append(worker_id)
    started = time.perf_counter()
    for n in range(SENSORS):
        runtime = ("python", "node", "shell")[n % 3]
        cursor.execute("INSERT INTO attune_sensor.assignment (sensor_ref, runtime, worker_id, assigned_at) "
                       "VALUES (%s, %s, %s, now())", (f"sensor.{n}", runtime, random.choice(offering[runtime])))
    seconds = time.perf_counter() - started
    placed = placed_count(cursor)
    ratio, over = balance(loads(cursor))
    conn.close()
    return placed / seconds, placed, ratio, over


def ours(url):
    conn = prepare(url)
    cursor = conn.cursor()
    per = SENSORS // PLACERS
    bounds = [(p * per, (p + 1) * per if p < PLACERS - 1 else SENSORS) for p in range(PLACERS)]
    started = time.perf_counter()
    # bounded generously (50 ms a placement, over 10 minutes); a placer that fails ends the bench
    run_processes([[__file__, "placer", url, str(a), str(b)] for a, b in bounds], timeout=600 + SENSORS * 0.05,
                  what="placer")
    seconds = time.perf_counter() - started
    placed_by_placers = placed_count(cursor)
    rate = placed_by_placers / seconds
    ratio, over = balance(loads(cursor))
    # online least-loaded cannot foresee later sensors' constraints; rebalance evens out the rest
    db, scheduler = scheduler_for(url)
    db.statement_timeout = 600
    started = time.perf_counter()
    rebalance_moves = len(scheduler.rebalance())
    rebalance_seconds = time.perf_counter() - started
    ratio_rebalanced, _ = balance(loads(cursor))
    # a twentieth more workers join, empty and offering every runtime: rebalance evens them in
    joined = max(1, WORKERS // 20)
    cursor.execute("INSERT INTO worker (name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat) "
                   "SELECT 'joined-' || g, 'local', 'sensor', 'joined-' || g, 'active', jsonb_build_object("
                   "'runtimes', '[\"python\", \"node\", \"shell\"]'::jsonb, 'max_concurrent_sensors', %s, "
                   "'heartbeat_interval', 3600), '{}', now() FROM generate_series(1, %s) AS g", (CAPACITY, joined))
    ratio_joined, _ = balance(loads(cursor))
    started = time.perf_counter()
    joined_moves = len(scheduler.rebalance())
    joined_seconds = time.perf_counter() - started
    ratio_joined_after, over_joined = balance(loads(cursor))
    cursor.execute("SELECT count(*), count(DISTINCT sensor_ref), count(worker_id) FROM attune_sensor.assignment")
    total, distinct, placed = cursor.fetchone()
    # a tenth of the workers die at once: their rows are reaped, then one reconcile re-places
    cursor.execute("UPDATE worker SET status = 'inactive' WHERE id % 10 = 0")
    started = time.perf_counter()
    released, moved = scheduler.reconcile(limit=SENSORS)
    replace_seconds = time.perf_counter() - started
    db.close()
    cursor.execute("SELECT count(*), count(DISTINCT sensor_ref), count(worker_id) FROM attune_sensor.assignment")
    after = cursor.fetchone()
    ratio_after, over_after = balance(loads(cursor))
    daemon = daemon_failover(url, cursor)
    conn.close()
    return {"rate": rate, "placed_by_placers": placed_by_placers, "ratio": ratio, "over": over, "total": total, "distinct": distinct, "placed": placed,
            "released": len(released), "moved": len(moved), "replace_seconds": replace_seconds,
            "after": after, "ratio_after": ratio_after, "over_after": over_after,
            "rebalance_moves": rebalance_moves, "rebalance_seconds": rebalance_seconds,
            "ratio_rebalanced": ratio_rebalanced, "daemon": daemon,
            "joined": (joined, joined_moves, joined_seconds, ratio_joined, ratio_joined_after, over_joined)}


def daemon_failover(url, cursor):
    """Another tenth of the workers stop heartbeating (the first tenth is back, empty); one real
    daemon (heartbeat 10 s, the platform's default) starts and re-places their sensors with its
    own passes, bounded to half an interval each. Seconds from its start to the last
    placement it made."""
    # the tenth that died above comes back empty, so that the fleet can hold every sensor again
    cursor.execute("UPDATE worker SET status = 'active', last_heartbeat = now() WHERE status = 'inactive'")
    cursor.execute("UPDATE worker SET last_heartbeat = now() - interval '1 hour', "
                   "capabilities = capabilities || '{\"heartbeat_interval\": 1}' "
                   "WHERE id % 10 = 1 AND status = 'active' RETURNING id")
    dead = [row[0] for row in cursor.fetchall()]
    cursor.execute("SELECT count(*) FROM attune_sensor.assignment WHERE worker_id = ANY(%s)", (dead,))
    held = cursor.fetchone()[0]
    cursor.execute("SELECT now()")
    started_at = cursor.fetchone()[0]
    with tempfile.TemporaryDirectory() as workdir:
        config = write_config(workdir, url, "bench-daemon", database={"statement_timeout": 30},
                              heartbeat_interval=10, max_concurrent_sensors=CAPACITY)
        # its log goes to a file (common.Daemon): a pipe read only at the end fills up after a
        # mass reap and blocks the daemon in its logging
        with Daemon(config, env=daemon_env(ATTUNE_SENSOR_RUNTIMES="shell"), name="the failover daemon") as daemon:
            seconds, pending = wait_for_failover(cursor, daemon, dead, started_at)
            daemon.stop_cleanly(60)
            output = daemon.lines
    # the daemon's own account, with its timestamps: registration, each pass, each reaping beat
    passes = [line.split(" (")[0][:160] for line in output
              if "Sensors re-placed" in line or "Registered" in line or "heartbeat:" in line]
    for line in passes:
        print("  daemon:", line)
    passes = sum("Sensors re-placed" in line for line in passes)
    return {"dead": len(dead), "held": held, "seconds": seconds, "passes": passes, "pending": pending}


def wait_for_failover(cursor, daemon, dead, started_at):
    """(seconds from the daemon's start to its last placement, sensors left pending): done when
    nothing is left on the dead workers and nothing is pending, or when the pending count has not
    moved for 120 s (what stays pending has no eligible worker with room). Fails when the daemon
    exits, or after FAILOVER_SECONDS."""
    started = time.perf_counter()
    last, last_change = None, started
    while True:
        daemon.check_running("its placement passes")
        cursor.execute("SELECT count(*) FILTER (WHERE worker_id = ANY(%s)), count(*) FILTER (WHERE worker_id IS NULL), "
                       "extract(epoch FROM max(assigned_at) - %s)::float8 FROM attune_sensor.assignment",
                       (dead, started_at))
        on_dead, pending, latest = cursor.fetchone()
        if (on_dead, pending) != last:
            last, last_change = (on_dead, pending), time.perf_counter()
        if on_dead == 0 and (pending == 0 or time.perf_counter() - last_change > 120):
            return latest, pending
        if time.perf_counter() - started > FAILOVER_SECONDS:
            fail(f"{daemon.name} left {on_dead:,} sensors on dead workers and {pending:,} pending after "
                 f"{FAILOVER_SECONDS} s; its last lines:\n{daemon.tail()}")
        time.sleep(0.5)


def main():
    with database() as (_, url):
        base_rate, base_placed, base_ratio, base_over = baseline(url)
    with database() as (_, url):
        result = ours(url)
    table(f"Placing {SENSORS:,} sensors over {WORKERS:,} workers (capacity {CAPACITY}), {PLACERS} placers",
          ("placer", "placed", "placements/s", "largest load / mean", "workers over capacity"),
          [("baseline: random worker, no lock, no ordering", f"{base_placed:,}", f"{base_rate:,.0f}",
            f"{base_ratio:.2f}", base_over),
           ("attune-sensor Scheduler.place (least loaded, locked)", f"{result['placed_by_placers']:,}",
            f"{result['rate']:,.0f}", f"{result['ratio']:.2f}", result["over"])])
    print(f"\nrebalance after placing: {result['rebalance_moves']:,} moves in {result['rebalance_seconds']:.1f} s, "
          f"largest load / mean {result['ratio']:.2f} -> {result['ratio_rebalanced']:.2f} (goal <= 1.05)")
    joined, moves, seconds, before, after, over = result["joined"]
    print(f"{joined:,} empty workers join: rebalance made {moves:,} moves in {seconds:.1f} s, largest load / mean "
          f"{before:.2f} -> {after:.2f}, {over} over capacity")
    total, distinct, placed = result["after"]
    table(f"A tenth of the workers die at once: one reconcile pass ({result['released']:,} sensors released)",
          ("re-placed", "seconds", "sensors / distinct / placed after", "largest load / mean", "over capacity"),
          [(f"{result['moved']:,}", f"{result['replace_seconds']:.1f}", f"{total:,} / {distinct:,} / {placed:,}",
            f"{result['ratio_after']:.2f}", result["over_after"])])
    daemon = result["daemon"]
    seconds = "-" if daemon["seconds"] is None else f"{daemon['seconds']:.1f} s"
    print(f"\nanother {daemon['dead']:,} workers stop heartbeating, holding {daemon['held']:,} sensors: a real daemon "
          f"(heartbeat 10 s) made its last placement {seconds} after it started, in {daemon['passes']} pass(es) "
          "(its start-up included)" + (f"; {daemon['pending']:,} stay pending: no eligible worker has room"
                                        if daemon["pending"] else "; none pending"))


if __name__ == "__main__":
    if sys.argv[1:2] == ["placer"]:
        placer(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
