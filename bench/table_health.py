"""Table health under heartbeats: one million heartbeats over 100,000 rows, HOT update share
and table + index size after the first pass and at the end; then the same run with an index on
last_heartbeat (as the original schema had) to show why the schema has none."""

import os

import psycopg2

from common import database, insert_workers, pgbench, table
from attune_sensor.registration import HEARTBEAT_SQL

ROWS = int(os.environ.get("BENCH_ROWS", "100000"))
TOTAL = int(os.environ.get("BENCH_HEARTBEATS_TOTAL", "1000000"))
CLIENTS = 4


def heartbeats(cluster, url, count):
    # The project's heartbeat statement, verbatim, driven by pgbench for speed.
    # (the xmin fence compares the row's xmin with itself here: same work, always true)
    statement = " ".join(HEARTBEAT_SQL.split()).replace("%(id)s", ":id").replace("%(xmin)s::xid", "xmin")
    pgbench(cluster, url, f"\\set id random(1, {ROWS})\n{statement};\n",
            "-c", str(CLIENTS), "-j", str(CLIENTS), "-t", str(count // CLIENTS))


def stats(url):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")
        cursor.execute("SELECT n_tup_upd, n_tup_hot_upd, pg_relation_size('worker'), pg_indexes_size('worker'), "
                       "pg_current_wal_lsn() - '0/0'::pg_lsn FROM pg_stat_user_tables WHERE relname = 'worker'")
        row = cursor.fetchone()
    conn.close()
    return row


def one_run(with_index):
    with database() as (cluster, url):
        insert_workers(url, ROWS)
        if with_index:
            conn = psycopg2.connect(url)
            conn.autocommit = True
            conn.cursor().execute("CREATE INDEX idx_worker_last_heartbeat ON worker (last_heartbeat)")
            conn.close()
        heartbeats(cluster, url, ROWS)
        upd1, hot1, table1, index1, wal1 = stats(url)
        heartbeats(cluster, url, TOTAL - ROWS)
        upd2, hot2, table2, index2, wal2 = stats(url)
        return {"wal_per_heartbeat": float(wal2 - wal1) / (upd2 - upd1),"hot_first": hot1 / upd1 * 100, "hot_all": hot2 / upd2 * 100, "updates": upd2,
                "size_first": table1 + index1, "size_end": table2 + index2, "table_end": table2, "index_end": index2}


def main():
    rows = []
    for label, with_index in (("schema as shipped", False), ("+ index on last_heartbeat", True)):
        r = one_run(with_index)
        growth = (r["size_end"] - r["size_first"]) / r["size_first"] * 100
        rows.append((label, f"{r['updates']:,}", f"{r['hot_all']:.1f} %",
                     f"{r['size_first'] / 2**20:.1f} MiB", f"{r['size_end'] / 2**20:.1f} MiB",
                     f"{growth:+.1f} %", f"{r['table_end'] / 2**20:.1f} / {r['index_end'] / 2**20:.1f} MiB",
                     f"{r['wal_per_heartbeat']:.0f} B"))
    table(f"{TOTAL:,} heartbeats over {ROWS:,} rows ({CLIENTS} clients)",
          ("schema", "updates", "HOT", "size after 1st pass", "size at end", "growth", "table / indexes at end",
           "WAL per heartbeat"), rows)
    print("\ntargets (schema as shipped): HOT >= 99 %, growth within 10 %. WAL measured with full_page_writes=off "
          "(the throwaway cluster); production adds full-page images after each checkpoint.")


if __name__ == "__main__":
    main()
