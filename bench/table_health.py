"""Table health under heartbeats: one million heartbeats over 100,000 rows, HOT update share,
table + index size after the first pass and at the end, and WAL per heartbeat; then the same run
with an index on last_heartbeat (as the original schema had), the baseline that shows why the
schema has none. The heartbeats are the daemon's own: SensorWorkerRegistration.heartbeat(),
its statement (registration.HEARTBEAT_SQL) with each row's real xmin fence, from 4 processes.

Knobs: BENCH_ROWS (default 100000), BENCH_HEARTBEATS_TOTAL (1000000), BENCH_CLIENTS (4);
BENCH_QUICK=1: 200 rows, 1,000 heartbeats.
"""

import time

import psycopg2

from common import database, fail, heartbeat_clients, insert_workers, knob, table

CLIENTS = knob("BENCH_CLIENTS", 4, 4)
ROWS = knob("BENCH_ROWS", 100000, 200)
TOTAL = knob("BENCH_HEARTBEATS_TOTAL", 1000000, 1000)


def stats(url, expected_updates):
    """(updates, HOT updates, table bytes, index bytes, WAL position) once the server's statistics
    show the updates the clients saw succeed: each client's counts arrive when its session ends."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    deadline = time.monotonic() + 30
    with conn.cursor() as cursor:
        while True:
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute("SELECT n_tup_upd, n_tup_hot_upd, pg_relation_size('worker'), pg_indexes_size('worker'), "
                           "pg_current_wal_lsn() - '0/0'::pg_lsn FROM pg_stat_user_tables WHERE relname = 'worker'")
            row = cursor.fetchone()
            if row[0] >= expected_updates:
                break
            if time.monotonic() > deadline:
                fail(f"the server counted {row[0]:,} updates of worker, the clients {expected_updates:,}")
            time.sleep(0.1)
    conn.close()
    return row


def one_run(with_index):
    with database() as (_, url):
        insert_workers(url, ROWS)
        if with_index:
            conn = psycopg2.connect(url)
            conn.autocommit = True
            conn.cursor().execute("CREATE INDEX idx_worker_last_heartbeat ON worker (last_heartbeat)")
            conn.close()
        first, _, _ = heartbeat_clients(url, 1, ROWS, CLIENTS, count=ROWS)
        upd1, hot1, table1, index1, wal1 = stats(url, first)
        rest, _, _ = heartbeat_clients(url, 1, ROWS, CLIENTS, count=TOTAL - ROWS)
        upd2, hot2, table2, index2, wal2 = stats(url, first + rest)
        return {"heartbeats": first + rest, "updates": upd2, "hot_all": hot2 / upd2 * 100,
                "wal_per_heartbeat": float(wal2 - wal1) / (upd2 - upd1),
                "size_first": table1 + index1, "size_end": table2 + index2, "table_end": table2, "index_end": index2}


def main():
    if TOTAL <= ROWS:
        fail(f"BENCH_HEARTBEATS_TOTAL ({TOTAL:,}) must exceed BENCH_ROWS ({ROWS:,}): a first pass, then more")
    rows = []
    for label, with_index in (("schema as shipped", False), ("baseline: + index on last_heartbeat", True)):
        r = one_run(with_index)
        growth = (r["size_end"] - r["size_first"]) / r["size_first"] * 100
        rows.append((label, f"{r['heartbeats']:,}", f"{r['updates']:,}", f"{r['hot_all']:.1f} %",
                     f"{r['size_first'] / 2**20:.1f} MiB", f"{r['size_end'] / 2**20:.1f} MiB",
                     f"{growth:+.1f} %", f"{r['table_end'] / 2**20:.1f} / {r['index_end'] / 2**20:.1f} MiB",
                     f"{r['wal_per_heartbeat']:.0f} B"))
    table(f"{TOTAL:,} heartbeats over {ROWS:,} rows ({CLIENTS} client processes, registration.heartbeat())",
          ("schema", "heartbeats", "updates (server)", "HOT", f"size after {ROWS:,}", "size at end", "growth",
           "table / indexes at end", "WAL per heartbeat"), rows)
    print("\ntargets (schema as shipped): HOT >= 99 %, growth within 10 %. WAL per heartbeat after the first "
          f"{ROWS:,}, measured with full_page_writes=off (the throwaway cluster); production adds full-page "
          "images after each checkpoint.")


if __name__ == "__main__":
    main()
