"""Fleet scale on one PostgreSQL: simulated workers heartbeating through the project's own
heartbeat code (SensorWorkerRegistration.heartbeat over the bounded Database), paced at
fleet_size / 30 s, to find the largest fleet with p99 heartbeat latency under 50 ms; and the
unpaced maximum rate against pgbench running the same UPDATE (the server's own ceiling)."""

import json
import os
import subprocess
import sys
import time

from common import database, insert_workers, median, percentile, pgbench, table

INTERVAL = 30.0
SECONDS = float(os.environ.get("BENCH_SCALE_SECONDS", "20"))
PROCESSES = int(os.environ.get("BENCH_SCALE_PROCESSES", "4"))
FLEETS = [int(n) for n in os.environ.get("BENCH_FLEETS", "100000,200000,300000").split(",")]


def simulate(url, first, last, rate, seconds):
    """One client process: workers first..last, `rate` heartbeats/s (0 = as fast as possible)."""
    from attune_sensor import config as config_module
    from attune_sensor.db import Database
    from attune_sensor.registration import SensorWorkerRegistration

    cfg = config_module.load(None, environ={"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"})
    db = Database.from_config(cfg)
    workers = []
    rows = {row[0]: row[1:] for row in db.execute(
        "SELECT id, xmin::text, host, worker_role::text, capabilities, meta, last_heartbeat FROM worker "
        "WHERE id BETWEEN %s AND %s", (first, last))}
    for n in range(first, last + 1):
        registration = SensorWorkerRegistration(db, cfg.with_sensor(worker_name=f"w{n}"), ["shell"])
        registration.worker_id, registration.instance_id = n, f"bench-{n}"  # rows made by insert_workers
        registration._remember(rows[n])  # the fence: as if this process had written the row last
        workers.append(registration)
    latencies = []
    started = time.perf_counter()
    deadline = started + seconds
    next_at = started
    i = 0
    while True:
        now = time.perf_counter()
        if now >= deadline:
            break
        if rate:
            if now < next_at:
                time.sleep(next_at - now)
            next_at += 1 / rate
        t0 = time.perf_counter()
        assert workers[i % len(workers)].heartbeat()
        latencies.append(time.perf_counter() - t0)
        i += 1
    db.close()
    json.dump({"count": len(latencies), "elapsed": time.perf_counter() - started, "latencies": latencies}, sys.stdout)


def run_clients(url, fleet, rate_total, seconds):
    per = fleet // PROCESSES
    procs = [subprocess.Popen([sys.executable, __file__, "client", url, str(p * per + 1), str((p + 1) * per),
                               str(rate_total / PROCESSES), str(seconds)], stdout=subprocess.PIPE, text=True)
             for p in range(PROCESSES)]
    results = [json.loads(p.communicate()[0]) for p in procs]
    latencies = [x for r in results for x in r["latencies"]]
    rate = sum(r["count"] / r["elapsed"] for r in results)
    return rate, latencies


def pgbench_rate(cluster, url, rows, seconds):
    out = pgbench(cluster, url, f"\\set id random(1, {rows})\n"
                  "UPDATE worker SET last_heartbeat = now(), status = 'active' "
                  "WHERE id = :id AND xmin = xmin RETURNING xmin::text, last_heartbeat;\n",
                  "-c", str(PROCESSES), "-j", str(PROCESSES), "-T", str(int(seconds)))
    return float(next(line for line in out.splitlines() if line.startswith("tps")).split()[2])


def main():
    rows = []
    with database() as (cluster, url):
        made = 0
        for fleet in FLEETS:
            if fleet > made:
                insert_workers(url, fleet - made, start=made)
                made = fleet
            target = fleet / INTERVAL
            rate, latencies = run_clients(url, fleet, target, SECONDS)
            p99 = percentile(latencies, 99) * 1000
            sustained = rate >= 0.98 * target and p99 < 50
            rows.append((f"{fleet:,}", f"{target:,.0f}/s", f"{rate:,.0f}/s", f"{median(latencies) * 1000:.2f} ms",
                         f"{p99:.2f} ms", "yes" if sustained else "no"))
        table(f"Paced fleet, {PROCESSES} client processes, {SECONDS:g} s each",
              ("fleet @ 30 s", "needed", "achieved", "median", "p99", "sustained (p99 < 50 ms)"), rows)
        ours, _ = run_clients(url, FLEETS[0], 0, SECONDS)
        theirs = pgbench_rate(cluster, url, FLEETS[0], SECONDS)
        table("Unpaced maximum rate, same UPDATE, same client count",
              ("client", "heartbeats/s", "ratio to pgbench", "target"),
              [("attune-sensor heartbeat()", f"{ours:,.0f}", f"{ours / theirs:.2f}", ">= 0.8"),
               ("pgbench (extended protocol)", f"{theirs:,.0f}", "1.00", "-")])
        print(f"\nlargest sustained fleet measured: {max([int(r[0].replace(',', '')) for r in rows if r[5] == 'yes'] or [0]):,} "
              f"workers at 30 s; ceiling from the unpaced rate: about {ours * INTERVAL:,.0f} workers.")


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"]:
        url, first, last, rate, seconds = sys.argv[2:]
        simulate(url, int(first), int(last), float(rate), float(seconds))
    else:
        main()
