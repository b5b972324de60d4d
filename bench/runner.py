"""Running placed sensors, measured with real daemons and real sensor processes:

1. placed -> running: from `place` until the sensor's own first line, at once (SIGHUP, the
   reload an operator sends) and at the worker's own read cadence, against the baseline of
   starting the same script directly;
2. failover: a worker killed with SIGKILL; from the kill until every one of its sensors runs
   on the survivor, against the target stale threshold + 10 s + 2 s;
3. footprint: the daemon's RSS, CPU and threads while supervising 0, 10 and 100 idle sensors.

Sizes (BENCH_QUICK=1: 2, 2, "0,2", 2 s): BENCH_SENSORS (latency samples, default 10),
BENCH_FAILOVER (default 20), BENCH_IDLE ("0,10,100"), BENCH_WINDOW (seconds of CPU measured,
default 20); BENCH_PARTS ("latency,failover,footprint") picks parts. Exits non-zero
when a daemon dies or anything it waits for never comes.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ATTUNE_SENSOR, ROOT, database, fail, knob, median, percentile, table

SENSORS = knob("BENCH_SENSORS", 10, 2)
FAILOVER = knob("BENCH_FAILOVER", 20, 2)
IDLE = [int(n) for n in knob("BENCH_IDLE", "0,10,100", "0,2", str).split(",")]
WINDOW = knob("BENCH_WINDOW", 20.0, 2.0, float)
PARTS = os.environ.get("BENCH_PARTS", "latency,failover,footprint").split(",")
INTERVAL = 0.5
MULTIPLIER = 3

STARTS = """import os, time
with open(os.path.join(os.environ["OUT"], os.environ["ATTUNE_SENSOR_REF"]), "a") as f:
    f.write(f"{time.time():.6f} {os.getpid()} {os.getppid()}\\n")
while True:
    time.sleep(3600)
"""
IDLE_SENSOR = "while true; do sleep 3600; done\n"


def wait_for(predicate, timeout, what, daemons=()):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for daemon in daemons:
            if daemon.poll() is not None:
                fail(f"a daemon exited ({daemon.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def setup(workdir, url, name, **sensor):
    packs = Path(workdir) / "packs" / "bench" / "sensors"
    packs.mkdir(parents=True, exist_ok=True)
    (packs / "starts.py").write_text(STARTS)
    (packs / "idle.sh").write_text(IDLE_SENSOR)
    sensor = dict({"worker_name": name, "heartbeat_interval": INTERVAL, "stale_multiplier": MULTIPLIER,
                   "sensor_timeout": 2, "max_concurrent_sensors": 200}, **sensor)
    config = Path(workdir) / f"{name}.yaml"
    config.write_text(json.dumps({"database": {"url": url}, "packs_base_dir": str(Path(workdir) / "packs"),
                                  "api": {"token_file": "none"}, "log": {"level": "warning"}, "sensor": sensor}))
    return str(config)


def start_daemon(config, log):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTUNE") and k != "DATABASE_URL"}
    env["ATTUNE_SENSOR_RUNTIMES"] = "python,shell"
    # the log goes to a file: a pipe nobody reads would block the daemon (docs/performance.md)
    return subprocess.Popen([ATTUNE_SENSOR, "--config", config, "run"], env=env, stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT)


def registered(url, name):
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cursor:
            cursor.execute("SET search_path TO public, attune; SELECT id FROM worker WHERE name = %s "
                           "AND status = 'active'", (name,))
            row = cursor.fetchone()
            return row[0] if row else None
    finally:
        conn.close()


def place(url, ref, entrypoint, runtime, out):
    result = subprocess.run([ATTUNE_SENSOR, "place", ref, "--runtime", runtime, "--entrypoint", entrypoint,
                             "--env", f"OUT={out}"], env={"DATABASE_URL": url, "PATH": os.environ["PATH"]},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30)
    if result.returncode not in (0, 1):
        fail(f"place {ref} exited {result.returncode}: {result.stderr.strip()}")


def first_line(path):
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return text.split() if text.endswith("\n") else None


def direct_start_baseline(workdir, out):
    """The floor: starting the same script directly, until its first line."""
    times = []
    script = Path(workdir) / "packs" / "bench" / "sensors" / "starts.py"
    for n in range(SENSORS):
        ref = f"direct.{n}"
        began = time.time()
        proc = subprocess.Popen([sys.executable, str(script)], env={"OUT": str(out), "ATTUNE_SENSOR_REF": ref})
        line = wait_for(lambda: first_line(out / ref), 30, "a directly started script")
        times.append(float(line[0]) - began)
        proc.kill()
        proc.wait()
    return times


def latency(flavour, url, workdir):
    out = Path(workdir) / f"out-{flavour}"
    out.mkdir()
    config = setup(workdir, url, f"lat-{flavour}")
    with open(Path(workdir) / f"lat-{flavour}.log", "w") as log:
        daemon = start_daemon(config, log)
        try:
            wait_for(lambda: registered(url, f"lat-{flavour}"), 60, "the worker to register", [daemon])
            at_once, cadence = [], []
            for n in range(SENSORS):
                ref = f"now.{n}"
                began = time.time()
                place(url, ref, "bench/sensors/starts.py", "python", out)
                daemon.send_signal(signal.SIGHUP)
                line = wait_for(lambda: first_line(out / ref), 30, f"{ref} to run", [daemon])
                at_once.append(float(line[0]) - began)
            placed = []
            for n in range(SENSORS):  # spread over one read period, no signal
                ref = f"later.{n}"
                placed.append((ref, time.time()))
                place(url, ref, "bench/sensors/starts.py", "python", out)
                time.sleep(10.0 / SENSORS)
            for ref, began in placed:
                line = wait_for(lambda: first_line(out / ref), 40, f"{ref} to run at the read cadence", [daemon])
                cadence.append(float(line[0]) - began)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
    if daemon.returncode != 0:
        fail(f"the {flavour} daemon exited {daemon.returncode}")
    return at_once, cadence


def failover(url, workdir):
    out = Path(workdir) / "out-failover"
    out.mkdir()
    logs = [open(Path(workdir) / f"fo-{n}.log", "w") for n in "ab"]
    a = start_daemon(setup(workdir, url, "fo-a"), logs[0])
    b = None
    try:
        a_id = wait_for(lambda: registered(url, "fo-a"), 60, "worker a to register", [a])
        for n in range(FAILOVER):
            place(url, f"fo.{n}", "bench/sensors/starts.py", "python", out)
        a.send_signal(signal.SIGHUP)
        wait_for(lambda: all(first_line(out / f"fo.{n}") for n in range(FAILOVER)), 60, "a's sensors to run", [a])
        b = start_daemon(setup(workdir, url, "fo-b"), logs[1])
        wait_for(lambda: registered(url, "fo-b"), 60, "worker b to register", [b])
        killed = time.time()
        a.kill()
        a.wait()

        def moved():
            lines = [(out / f"fo.{n}").read_text().splitlines() for n in range(FAILOVER)]
            return all(len(found) >= 2 for found in lines) and lines

        lines = wait_for(moved, 120, "every sensor to run on the survivor", [b])
        last = max(float(found[1].split()[0]) for found in lines)
        return last - killed, a_id
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
        for log in logs:
            log.close()


def clear_assignments(url):
    import psycopg2

    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cursor:
        cursor.execute("DELETE FROM attune_sensor.assignment")
    conn.close()


def footprint(url, workdir):
    rows = []
    clear_assignments(url)  # what the earlier parts left pending would run here too
    for count in IDLE:
        name = f"fp-{count}"
        config = setup(workdir, url, name)
        for n in range(count):
            place(url, f"idle.{count}.{n}", "bench/sensors/idle.sh", "shell", workdir)
        with open(Path(workdir) / f"{name}.log", "w") as log:
            daemon = start_daemon(config, log)
            try:
                wait_for(lambda: registered(url, name), 60, f"{name} to register", [daemon])
                # placed on a worker that registered after them; give the reads time to start all
                daemon.send_signal(signal.SIGHUP)
                wait_for(lambda: len(children(daemon.pid)) >= count, 60, f"{count} sensors to run", [daemon])
                time.sleep(2)
                before = cpu_seconds(daemon.pid)
                time.sleep(WINDOW)
                if daemon.poll() is not None:
                    fail(f"{name} exited {daemon.returncode}")
                cpu = cpu_seconds(daemon.pid) - before
                status = proc_status(daemon.pid)
                rows.append((count, len(children(daemon.pid)), status["VmRSS"], status["Threads"],
                             f"{100 * cpu / WINDOW:.2f} %"))
            finally:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(60)
        clear_assignments(url)
    return rows


def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    if int(handle.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError):
                continue
    return found


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid):
    status = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    return status


def main():
    sys.path.insert(0, str(ROOT / "tests"))
    with tempfile.TemporaryDirectory(prefix="bench-runner-") as workdir:
        os.chmod(workdir, 0o755)
        with database("bench_runner") as (cluster, url):
            setup(workdir, url, "lat-spec")  # the packs
            if "latency" in PARTS:
                measure_latency(cluster, url, workdir)
            if "failover" in PARTS:
                took, _ = failover(url, workdir)
                threshold = MULTIPLIER * INTERVAL
                table("failover of a killed worker's running sensors (seconds)",
                      ("sensors", "kill -> all running on the survivor", "target: threshold + 10 + 2"),
                      [(FAILOVER, f"{took:.2f}", f"{threshold + 12:.1f}")])
            if "footprint" in PARTS:
                fp = footprint(url, workdir)
                table(f"the daemon supervising idle sensors (CPU over {WINDOW:g} s; baseline: 0 sensors)",
                      ("sensors", "child processes", "RSS", "threads", "CPU"), fp)


def measure_latency(cluster, url, workdir):
    import platform_db  # the suite's builder of Attune-flavour databases (tests/)
    from attune_sensor.db import migrations

    baseline = direct_start_baseline(workdir, Path(workdir))
    spec_now, spec_cadence = latency("spec", url, workdir)
    cluster.psql("CREATE DATABASE bench_attune")
    attune_url = cluster.url("bench_attune")
    platform_db.build(attune_url, "fixture")
    migrations.run(attune_url, log=lambda *_: None, warn=lambda *_: None)
    attune_now, attune_cadence = latency("attune", attune_url, workdir)
    rows = [("direct start of the same script (baseline)", len(baseline), f"{median(baseline):.3f}",
             f"{percentile(baseline, 99):.3f}")]
    for flavour, now, cadence in (("spec", spec_now, spec_cadence), ("attune", attune_now, attune_cadence)):
        rows.append((f"{flavour}: place + SIGHUP", len(now), f"{median(now):.3f}", f"{percentile(now, 99):.3f}"))
        rows.append((f"{flavour}: place, read cadence", len(cadence), f"{median(cadence):.3f}",
                     f"{percentile(cadence, 99):.3f}"))
    table("placed -> running (seconds, target at the read cadence: max(interval, 10 s) + 2 s = 12 s)",
          ("path", "samples", "median", "p99"), rows)

if __name__ == "__main__":
    main()
