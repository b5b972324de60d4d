"""The spec's queries, `attune-sensor workers`, the reaper and `metrics` at 100,000 workers:
median execution time (EXPLAIN ANALYZE, server side) and the plan's access path, against a
baseline measured in the same run: one bare scan of the table (`SELECT count(*) FROM worker`).

Knobs: BENCH_ROWS (default 100000); BENCH_QUICK=1: 200 rows.
"""

import psycopg2

from common import database, insert_workers, knob, median, table
from attune_sensor import fleet
from attune_sensor.db import schema
from attune_sensor.db import Database

ROWS = knob("BENCH_ROWS", 100000, 200)
REPEAT = 7
BASELINE = ("baseline: bare scan, SELECT count(*) FROM worker", "SELECT count(*) FROM worker", None)

QUERIES = [
    ("spec: active sensor workers",
     "SELECT id, name, host, capabilities, last_heartbeat FROM worker WHERE worker_role = 'sensor' AND status = 'active'", None),
    ("spec: active with python runtime",
     "SELECT id, name, host, capabilities->'runtimes' as runtimes FROM worker WHERE worker_role = 'sensor' "
     "AND status = 'active' AND capabilities->'runtimes' ? 'python'", None),
    ("spec: stale (5 minutes)",
     "SELECT id, name, last_heartbeat FROM worker WHERE worker_role = 'sensor' AND status = 'active' "
     "AND last_heartbeat < NOW() - INTERVAL '5 minutes'", None),
    ("spec: monitoring (60 seconds)",
     "SELECT name, host, status, last_heartbeat, NOW() - last_heartbeat AS time_since_heartbeat FROM worker "
     "WHERE worker_role = 'sensor' AND status = 'active' AND last_heartbeat < NOW() - INTERVAL '60 seconds' "
     "ORDER BY last_heartbeat", None),
    ("spec: scheduling (runtime python)",
     "SELECT * FROM worker WHERE worker_role IN ('sensor', 'hybrid') AND status = 'active' "
     "AND capabilities->'runtimes' ? %(runtime)s ORDER BY last_heartbeat DESC", {"runtime": "python"}),
    ("reaper (nothing stale)", fleet.REAP_SQL, {"lock": fleet.REAPER_LOCK_KEY, "reaper": "bench", "multiplier": 3.0}),
]


def project_queries(table):
    """The read side as the CLI runs it on this table."""
    workers = fleet.workers_sql(table)
    return [
        ("attune-sensor workers", workers, {"runtime": None, "stale_only": False, "multiplier": 3.0, "name": None}),
        ("attune-sensor workers --stale", workers, {"runtime": None, "stale_only": True, "multiplier": 3.0, "name": None}),
        ("attune-sensor check (one name)", workers, {"runtime": None, "stale_only": False, "multiplier": 3.0, "name": "w500"}),
        ("attune-sensor metrics, computing the gauges (at most once per 10 s fleet-wide)",
         fleet.GAUGES_SQL, {"multiplier": 3.0}),
        ("attune-sensor metrics, reading the stored gauges (every other scrape)",
         fleet.READ_GAUGES_SQL, {"multiplier": 3.0}),
    ]


def access_paths(plan):
    found = []

    def walk(node):
        kind = node["Node Type"]
        if "Scan" in kind:
            found.append(f"{kind}" + (f" using {node['Index Name']}" if node.get("Index Name") else ""))
        for child in node.get("Plans", []):
            walk(child)

    walk(plan)
    return ", ".join(dict.fromkeys(found))


def main():
    with database() as (cluster, url):
        insert_workers(url, ROWS)
        conn = psycopg2.connect(url)
        conn.autocommit = True
        cursor = conn.cursor()
        cursor.execute("VACUUM ANALYZE worker")
        db = Database(url)
        worker_table = schema.attach(db)
        db.close()
        rows = []
        floor = None
        for label, sql, params in [BASELINE] + QUERIES + project_queries(worker_table):
            times, plan, returned = [], None, 0
            for _ in range(REPEAT):
                cursor.execute("BEGIN")  # the reaper changes nothing here, but keep runs identical
                cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params)
                result = cursor.fetchone()[0][0]
                cursor.execute("ROLLBACK")
                times.append(result["Execution Time"])
                plan, returned = result["Plan"], result["Plan"]["Actual Rows"]
            if floor is None:
                floor = max(median(times), 0.001)  # ms: EXPLAIN's resolution
            rows.append((label, f"{returned:,}", f"{median(times):.2f} ms", f"{median(times) / floor:.1f}",
                         access_paths(plan)))
        conn.close()
    table(f"Queries at {ROWS:,} workers (median of {REPEAT}, server execution time)",
          ("query", "rows", "median", "x bare scan", "access path"), rows)


if __name__ == "__main__":
    main()
