"""Fleet scale on one PostgreSQL: simulated workers heartbeating through the project's own
heartbeat code (SensorWorkerRegistration.heartbeat over the bounded Database), paced at
fleet_size / 30 s, to find the largest fleet with p99 heartbeat latency under 50 ms; and the
unpaced maximum rate against pgbench sending the same UPDATE (the server's own ceiling).

Knobs: BENCH_FLEETS (default 100000,200000,300000), BENCH_SCALE_SECONDS (20 per size),
BENCH_SCALE_PROCESSES (4 client processes); BENCH_QUICK=1: 200 workers for 1 s.
"""

from common import database, fail, heartbeat_clients, insert_workers, knob, median, percentile, pgbench, table
from attune_sensor.worker.registration import HEARTBEAT_SQL

INTERVAL = 30.0
SECONDS = knob("BENCH_SCALE_SECONDS", 20.0, 1.0, float)
PROCESSES = knob("BENCH_SCALE_PROCESSES", 4, 4)
FLEETS = [int(n) for n in knob("BENCH_FLEETS", "100000,200000,300000", "200", str).split(",")]


def pgbench_rate(cluster, url, rows, seconds):
    """The heartbeat's UPDATE from pgbench, the fastest client there is. pgbench keeps no state
    between statements, so its fence compares each row's xmin with itself (always true, the
    same work on the server): a floor for the client side, not the daemon's statement."""
    statement = " ".join(HEARTBEAT_SQL.split()).replace("%(id)s", ":id").replace("%(xmin)s::xid", "xmin")
    if ":id" not in statement or "%(" in statement:
        fail(f"HEARTBEAT_SQL changed shape; cannot turn it into pgbench's: {statement}")
    out = pgbench(cluster, url, f"\\set id random(1, {rows})\n{statement};\n",
                  "-c", str(PROCESSES), "-j", str(PROCESSES), "-T", str(max(1, round(seconds))))
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
            _, rate, latencies = heartbeat_clients(url, 1, fleet, PROCESSES, rate=target, seconds=SECONDS)
            p99 = percentile(latencies, 99) * 1000
            sustained = rate >= 0.98 * target and p99 < 50
            rows.append((f"{fleet:,}", f"{target:,.0f}/s", f"{rate:,.0f}/s", f"{median(latencies) * 1000:.2f} ms",
                         f"{p99:.2f} ms", "yes" if sustained else "no"))
        table(f"Paced fleet, {PROCESSES} client processes, {SECONDS:g} s each",
              ("fleet @ 30 s", "needed", "achieved", "median", "p99", "sustained (p99 < 50 ms)"), rows)
        _, ours, _ = heartbeat_clients(url, 1, FLEETS[0], PROCESSES, seconds=SECONDS)
        theirs = pgbench_rate(cluster, url, FLEETS[0], SECONDS)
        table("Unpaced maximum rate, same client count",
              ("client", "heartbeats/s", "ratio to pgbench", "target"),
              [("attune-sensor heartbeat()", f"{ours:,.0f}", f"{ours / theirs:.2f}", ">= 0.8"),
               ("pgbench, the same UPDATE (fence: xmin = xmin)", f"{theirs:,.0f}", "1.00", "-")])
        sustained = [int(r[0].replace(",", "")) for r in rows if r[5] == "yes"]
        print(f"\nlargest sustained fleet measured: {max(sustained or [0]):,} workers at 30 s; the unpaced rate "
              f"would carry about {ours * INTERVAL:,.0f} workers at 30 s.")


if __name__ == "__main__":
    main()
