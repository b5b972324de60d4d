"""Dead-worker detection latency: how long after its last heartbeat a worker that stopped is
marked inactive, at 2, 50 and 10,000 simulated workers, with the reaper on the heartbeat path
(this version) against the periodic reaper it replaced (baseline), both measured in this run.

Live workers heartbeat through SensorWorkerRegistration from a few client processes; a share of
the rows never heartbeats after the start. Lateness is the time past each dead worker's own
stale threshold (3 x its interval); the goal is at most max(interval, 10 s) at any size. Each
run lasts the threshold + max(interval, the reaper's 10 s period) + a slack.
Knobs: BENCH_DETECTION_FLEETS (e.g. "2:1,50:1,10000:10": size:interval), BENCH_DETECTION_SLACK
(10 s), BENCH_PROCESSES (4); BENCH_QUICK=1: 2 workers at 0.1 s, no slack (about 25 s).
"""

import json
import random
import sys
import time

import psycopg2

from common import database, gate_scans, insert_workers, knob, median, run_processes, table
from attune_sensor.fleet import REAP_PERIOD as PERIOD

FLEETS = [tuple(float(x) for x in item.split(":"))
          for item in knob("BENCH_DETECTION_FLEETS", "2:1,50:1,10000:10", "2:0.1", str).split(",")]
SLACK = knob("BENCH_DETECTION_SLACK", 10.0, 0.0, float)
PROCESSES = knob("BENCH_PROCESSES", 4, 2)
MULTIPLIER = 3.0


def simulate(url, ids, interval, seconds, design):
    """One client process heartbeating the workers `ids` for `seconds`."""
    from attune_sensor import config as config_module, fleet
    from attune_sensor.db import Database
    from attune_sensor.worker.registration import SensorWorkerRegistration

    cfg = config_module.load(None, environ={"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"})
    db = Database.from_config(cfg)
    rows = {r[0]: r[1:] for r in db.execute(
        "SELECT id, xmin::text, host, worker_role::text, capabilities, meta, last_heartbeat FROM worker "
        "WHERE id = ANY(%s)", (ids,))}
    workers = []
    for n in ids:
        registration = SensorWorkerRegistration(db, cfg.with_sensor(worker_name=f"w{n}"), ["shell"])
        registration.worker_id, registration.instance_id = n, f"bench-{n}"
        registration._remember(rows[n])
        if design == "heartbeat":
            registration.reap_multiplier = MULTIPLIER
        workers.append(registration)
    active = len(ids) * PROCESSES
    start = time.monotonic()
    # random phases, as a fleet started over time would have
    due = {id(w): start + random.random() * interval for w in workers}
    reap_due = {id(w): start + fleet.reaper_delay(interval, active) for w in workers}
    while time.monotonic() < start + seconds:
        worker = min(workers, key=lambda w: due[id(w)])
        wait = due[id(worker)] - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        worker.heartbeat()
        due[id(worker)] += interval
        if design == "periodic" and time.monotonic() >= reap_due[id(worker)]:
            _, active = fleet.reap_stale(db, worker.worker_name, MULTIPLIER)
            reap_due[id(worker)] = time.monotonic() + fleet.reaper_delay(interval, active)
    db.close()


def run(url, size, interval, design):
    dead = max(1, size // 200)
    live_ids = list(range(dead + 1, size + 1))
    conn = psycopg2.connect(url)
    conn.autocommit = True
    cursor = conn.cursor()
    cursor.execute("UPDATE worker SET status = 'active', last_heartbeat = now(), meta = meta - 'reaped_at' "
                   "- 'reaped_by' - 'reaped_last_heartbeat'")
    cursor.execute("UPDATE attune_sensor.reaper_gate SET last_scan = '-infinity'")
    cursor.execute("SELECT pg_stat_force_next_flush()")
    gate_before = gate_scans(cursor)
    seconds = MULTIPLIER * interval + max(interval, PERIOD) + SLACK
    chunks = [live_ids[p::PROCESSES] for p in range(PROCESSES)]
    run_processes([[__file__, "client", url, json.dumps(chunk), str(interval), str(seconds), design]
                   for chunk in chunks if chunk], timeout=seconds + 120)
    cursor.execute("SELECT extract(epoch FROM (meta ->> 'reaped_at')::timestamptz - last_heartbeat)::float8 "
                   "FROM worker WHERE id <= %s", (dead,))
    latencies = [r[0] for r in cursor.fetchall()]
    cursor.execute("SELECT pg_stat_force_next_flush()")
    time.sleep(1.5)  # the clients' own statistics reach the shared counters
    scans = gate_scans(cursor) - gate_before
    conn.close()
    found = [x for x in latencies if x is not None]
    threshold = MULTIPLIER * interval
    late = [x - threshold for x in found]
    return {"dead": dead, "found": len(found), "median": median(late) if late else None,
            "max": max(late) if late else None, "goal": max(interval, PERIOD), "seconds": seconds,
            "scans": scans if design == "heartbeat" else None}


def main():
    rows = []
    for size, interval in FLEETS:
        size = int(size)
        for design in ("periodic", "heartbeat"):
            with database() as (_, url):
                insert_workers(url, size, interval=interval)
                result = run(url, size, interval, design)
            fmt = lambda v: "-" if v is None else f"{v:.1f} s"  # noqa: E731
            rows.append((f"{size:,}", f"{interval:g} s", design, f"{result['found']} of {result['dead']}",
                         fmt(result["median"]), fmt(result["max"]), f"{result['goal']:g} s",
                         "-" if result["scans"] is None else f"{result['scans']} in {result['seconds']:.0f} s"))
    table("Dead-worker detection: seconds past each dead worker's stale threshold (3 x interval)",
          ("workers", "interval", "reaper", "marked", "median late", "max late", "goal (max)", "gate scans"), rows)


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"]:
        simulate(sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6])
    else:
        main()
