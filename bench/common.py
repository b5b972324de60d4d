"""Shared bench helpers: a throwaway PostgreSQL per measurement, size knobs (BENCH_QUICK), the
real daemon and client processes under bounded waits, medians, tables.

Every wait here is bounded and every child is checked: a bench whose daemon or client exits
early, or whose awaited event never comes, ends with a one-line reason and exit code 1
(`fail`), never with a hang or with figures made up from what it asked for."""

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "packaging"))  # pgcluster.py
sys.path.insert(0, str(ROOT))

from pgcluster import Cluster  # noqa: E402

ATTUNE_SENSOR = str(Path(sys.executable).with_name("attune-sensor"))
# BENCH_QUICK=1: every bench at toy size (seconds, not minutes), as tests/test_bench.py runs
# them so that none can rot. The figures then show only that the bench works.
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


# A bench stopped with SIGTERM (the suite's teardown, an operator's kill) unwinds like one that
# fails: its clusters are destroyed and its daemons stopped by their context managers, and
# nothing it started is left running.
signal.signal(signal.SIGTERM, _terminated)


def knob(name, full, quick, kind=int):
    """A size: the environment variable `name` when set, else the full or the BENCH_QUICK default."""
    raw = os.environ.get(name)
    return kind(raw) if raw else (quick if QUICK else full)


RUNS = knob("BENCH_RUNS", 3, 1)


def fail(message):
    """Ends the bench: exit code 1 and `<script>: message` on stderr (cleanup still runs)."""
    raise SystemExit(f"{Path(sys.argv[0]).name}: {message}")


@contextmanager
def database(name="bench", settings=()):
    """Yields (cluster, admin url of a fresh migrated database) on a throwaway cluster of its own
    (packaging/pgcluster.py, as the tests use), destroyed at the end."""
    cluster = Cluster(settings=settings).init().start()
    try:
        cluster.psql(f"CREATE DATABASE {name}")
        cluster.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements", dbname=name)
        url = cluster.url(name)
        from attune_sensor.db import migrations

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
    if not rows:
        fail(f"no rows measured for the table {title!r}")
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


def pgbench(cluster, url, script_text, *options, timeout=900):
    """Runs the server's own pgbench with a custom script against `url`; returns its output."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
        script.write(script_text)
    os.chmod(script.name, 0o644)
    user, password = url.split("//")[1].split("@")[0].split(":")
    try:
        result = subprocess.run(
            [os.path.join(cluster.bindir, "pgbench"), "-n", "-M", "extended", *options, "-f", script.name,
             "-h", "127.0.0.1", "-p", str(cluster.port), "-U", user, url.rsplit("/", 1)[1]],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
            env=dict(os.environ, PGPASSWORD=password))
    except subprocess.TimeoutExpired:
        fail(f"pgbench did not finish within {timeout} s")
    finally:
        os.unlink(script.name)
    if result.returncode != 0:
        fail(f"pgbench exited with code {result.returncode}: {result.stdout.strip()[-500:]}")
    return result.stdout


# --- the real daemon -----------------------------------------------------------------------

def daemon_env(**extra):
    """The environment for a daemon: this one without systemd's variables (a bench run from a
    unit must not hand its own notify socket or watchdog to the daemons it starts)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "INVOCATION_ID")}
    env.update(extra)
    return env


def write_config(directory, url, worker_name, database=None, **sensor):
    """A daemon's config file in `directory`; returns its path."""
    import yaml

    path = os.path.join(directory, f"{worker_name}.yaml")
    with open(path, "w") as handle:
        yaml.safe_dump({"database": {"url": url, **(database or {})},
                        "sensor": {"worker_name": worker_name, **sensor}}, handle)
    return path


class Daemon:
    """`attune-sensor --config PATH run` as a subprocess; a context manager that stops it.

    Its log goes to a file read as it grows: a pipe read only at the end fills up (a mass reap
    logs a line per worker) and blocks the daemon's logging, and so the daemon. Every wait is
    bounded, and ends the bench (`fail`) when the daemon exits first."""

    def __init__(self, config_path, env=None, name="daemon"):
        self.name = name
        self._log = tempfile.NamedTemporaryFile("w+", prefix="bench-daemon-", suffix=".log")
        self.proc = subprocess.Popen([ATTUNE_SENSOR, "--config", config_path, "run"], stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env or daemon_env())
        self._reader = open(self._log.name)
        self._partial = ""
        self.lines = []
        self._counts = {}  # text -> (lines scanned, lines containing it)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        self._reader.close()
        self._log.close()

    @property
    def pid(self):
        return self.proc.pid

    def poll(self):
        """Reads what the daemon logged since the last call."""
        text = self._partial + self._reader.read()
        *complete, self._partial = text.split("\n")
        self.lines.extend(complete)

    def count(self, text):
        """How many lines logged so far contain `text` (call poll() first for the newest)."""
        scanned, found = self._counts.get(text, (0, 0))
        found += sum(text in line for line in self.lines[scanned:])
        self._counts[text] = (len(self.lines), found)
        return found

    def tail(self, lines=15):
        self.poll()
        return "\n".join("  " + line for line in self.lines[-lines:])

    def check_running(self, waiting_for):
        if self.proc.poll() is not None:
            fail(f"{self.name} (pid {self.proc.pid}) exited with code {self.proc.returncode} while the bench "
                 f"waited for {waiting_for}; its last lines:\n{self.tail()}")

    def wait_for(self, text, count=1, timeout=60.0):
        """Waits until `count` lines contain `text`; returns the count seen (at least `count`)."""
        deadline = time.monotonic() + timeout
        what = f"{count} log line(s) containing {text!r}"
        while True:
            self.poll()
            seen = self.count(text)
            if seen >= count:
                return seen
            self.check_running(what)
            if time.monotonic() > deadline:
                fail(f"{self.name}: timed out after {timeout:g} s waiting for {what} (saw {seen}); "
                     f"its last lines:\n{self.tail()}")
            time.sleep(0.01)

    def stop(self, timeout=30.0):
        """SIGTERM, then the exit code (a daemon that ignores it for `timeout` is killed: fail)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                fail(f"{self.name} did not stop within {timeout:g} s of SIGTERM; killed")
        self.poll()
        return self.proc.returncode

    def stop_cleanly(self, timeout=30.0):
        """stop(), and fail unless the daemon exited 0 (it deregisters on SIGTERM)."""
        if self.stop(timeout) != 0:
            fail(f"{self.name} exited with code {self.proc.returncode} on SIGTERM; its last lines:\n{self.tail()}")


# --- client processes ----------------------------------------------------------------------

def run_processes(argvs, timeout, what="client"):
    """Runs the commands in parallel, each a Python process running a bench's own code; returns
    their standard outputs. Fails (killing the rest) when one exits non-zero or when they are
    not all done within `timeout` seconds."""
    procs = [subprocess.Popen([sys.executable, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
             for argv in argvs]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for n, proc in enumerate(procs):
            try:
                out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                fail(f"{what} {n + 1} of {len(procs)} not done within {timeout:g} s")
            if proc.returncode != 0:
                fail(f"{what} {n + 1} of {len(procs)} exited with code {proc.returncode} (its error is above)")
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


def heartbeat_client(url, first, last, rate, seconds, count):
    """One client process: workers first..last (rows made by insert_workers) heartbeat in turn,
    in a fixed random order (as hosts started at random moments do: each once per round, each
    with its own phase, not in the order of their ids), through the project's own code (SensorWorkerRegistration.heartbeat() over the bounded
    Database: its statement, its fence), `rate` per second (0: as fast as possible), until
    `seconds` have passed or `count` heartbeats were sent (0: no count). Prints JSON."""
    from attune_sensor import config as config_module
    from attune_sensor.db import Database
    from attune_sensor.worker.registration import SensorWorkerRegistration

    cfg = config_module.load(None, environ={"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"})
    db = Database.from_config(cfg)
    rows = {row[0]: row[1:] for row in db.execute(
        "SELECT id, xmin::text, host, worker_role::text, capabilities, meta, last_heartbeat FROM worker "
        "WHERE id BETWEEN %s AND %s", (first, last))}
    workers = []
    for n in range(first, last + 1):
        registration = SensorWorkerRegistration(db, cfg.with_sensor(worker_name=f"w{n}"), ["shell"])
        registration.worker_id, registration.instance_id = n, f"bench-{n}"  # rows made by insert_workers
        registration._remember(rows[n])  # the fence: as if this process had written the row last
        workers.append(registration)
    random.Random(first).shuffle(workers)
    latencies = []
    started = time.perf_counter()
    deadline = started + seconds
    next_at = started
    i = 0
    while not count or i < count:
        now = time.perf_counter()
        if now >= deadline:
            break
        if rate:
            if now < next_at:
                time.sleep(next_at - now)
            next_at += 1 / rate
        worker = workers[i % len(workers)]
        t0 = time.perf_counter()
        if not worker.heartbeat():
            fail(f"heartbeat of w{worker.worker_id} matched no row: its fence missed")
        latencies.append(time.perf_counter() - t0)
        i += 1
    elapsed = time.perf_counter() - started
    db.close()
    json.dump({"count": len(latencies), "elapsed": elapsed, "latencies": latencies}, sys.stdout)


def heartbeat_clients(url, first, last, processes, rate=0.0, seconds=3600.0, count=0):
    """Workers first..last heartbeat from `processes` client processes (heartbeat_client), each
    with its own share of the rows, the rate and the count. Returns (heartbeats observed,
    their rate per second, every latency in seconds)."""
    ids = range(first, last + 1)
    per = len(ids) // processes
    if per < 1:
        fail(f"{len(ids)} workers cannot be shared by {processes} client processes")
    shares = [(ids[p * per], ids[(p + 1) * per - 1] if p < processes - 1 else ids[-1]) for p in range(processes)]
    outputs = run_processes([[__file__, "heartbeats", url, str(a), str(b), str(rate / processes), str(seconds),
                              str(count // processes + (p < count % processes))]
                             for p, (a, b) in enumerate(shares)], timeout=seconds + 600 if count else seconds + 60)
    results = [json.loads(out) for out in outputs]
    observed = sum(r["count"] for r in results)
    if not observed:
        fail("the client processes sent no heartbeat")
    return observed, sum(r["count"] / r["elapsed"] for r in results), [x for r in results for x in r["latencies"]]


if __name__ == "__main__":
    if sys.argv[1:2] == ["heartbeats"]:
        url, first, last, rate, seconds, count = sys.argv[2:]
        heartbeat_client(url, int(first), int(last), float(rate), float(seconds), int(count))
    else:
        sys.exit(f"usage: {sys.argv[0]} heartbeats URL FIRST LAST RATE SECONDS COUNT")
