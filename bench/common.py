"""Shared bench helpers: a throwaway PostgreSQL (or BENCH_DATABASE_URL), medians, tables."""

import os
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "packaging"))  # pgcluster.py
sys.path.insert(0, str(ROOT))

from pgcluster import Cluster  # noqa: E402

ATTUNE_SENSOR = str(Path(sys.executable).with_name("attune-sensor"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))


@contextmanager
def database(name="bench", settings=()):
    """Yields (cluster, admin url of a fresh migrated database)."""
    cluster = Cluster(settings=settings).init().start()
    try:
        cluster.psql(f"CREATE DATABASE {name}")
        cluster.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements", dbname=name)
        url = cluster.url(name)
        from attune_sensor import migrations

        migrations.run(url, log=lambda *_: None)
        yield cluster, url
    finally:
        cluster.destroy()


def median(values):
    return statistics.median(values)


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def table(title, header, rows):
    print(f"\n## {title}\n")
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")
    sys.stdout.flush()


def insert_workers(url, count, start=0, interval=30):
    """Bulk rows w{start+1}..w{start+count} for scale benchmarks (set-up only; heartbeats go through
    the project's code). On a fresh table row g gets id g and instance_id bench-g."""
    import psycopg2

    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cursor:
        cursor.execute(
            "INSERT INTO worker (id, name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat) "
            "SELECT g, 'w' || g, 'local', 'sensor', 'host-' || g, 'active', "
            "jsonb_build_object('runtimes', CASE WHEN g %% 3 = 0 THEN '[\"python\", \"shell\"]'::jsonb "
            "  WHEN g %% 3 = 1 THEN '[\"node\", \"shell\"]'::jsonb ELSE '[\"shell\", \"native\"]'::jsonb END, "
            "  'max_concurrent_sensors', 10, 'heartbeat_interval', %s, 'sensor_version', '0.1.0'), "
            "jsonb_build_object('instance_id', 'bench-' || g, 'machine_id', 'm-' || g, 'hostname', 'host-' || g), "
            "now() - (g %% 30) * interval '1 second' "
            "FROM generate_series(%s, %s) AS g", (interval, start + 1, start + count))
        cursor.execute("SELECT setval('worker_id_seq', (SELECT max(id) FROM worker))")
    conn.close()


def gate_scans(cursor):
    """How many times the fleet's reaper gate has opened (attune_sensor.reaper_gate's updates),
    by the server's statistics: other sessions' counts arrive when they flush theirs (about
    once a second), so callers wait a moment before the final reading."""
    cursor.execute("SELECT n_tup_upd FROM pg_stat_user_tables WHERE schemaname = 'attune_sensor' "
                   "AND relname = 'reaper_gate'")
    return cursor.fetchone()[0]


def pgbench(cluster, url, script_text, *options):
    """Runs the server's own pgbench with a custom script against `url`; returns its output."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
        script.write(script_text)
    os.chmod(script.name, 0o644)
    user, password = url.split("//")[1].split("@")[0].split(":")
    try:
        return subprocess.run(
            [os.path.join(cluster.bindir, "pgbench"), "-n", "-M", "extended", *options, "-f", script.name,
             "-h", "127.0.0.1", "-p", str(cluster.port), "-U", user, url.rsplit("/", 1)[1]],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=True,
            env=dict(os.environ, PGPASSWORD=password)).stdout
    finally:
        os.unlink(script.name)
