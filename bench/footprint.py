"""Footprint on the host: resident memory of a running daemon after a first and a last count of
heartbeats, CPU time per heartbeat between them, and time from exec to READY=1, against a
baseline process that imports the same four libraries, holds one connection and sends the same
heartbeat statement (registration.HEARTBEAT_SQL, with its real fence) the same number of times:
the physical floor for this daemon.

The daemon runs at the product's floor interval (config.MIN_HEARTBEAT_INTERVAL, 0.1 s), so its
heartbeats take real time: 1,000 then 3,000 take 5 minutes (the BENCH_RUNS daemons run side by
side). Knobs: BENCH_FOOTPRINT_BEATS ("1000,3000": the two samples), BENCH_FOOTPRINT_INTERVAL
(the floor), BENCH_RUNS (3); BENCH_QUICK=1: 5 and 15 heartbeats, one run.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time

from common import ROOT, RUNS, Daemon, daemon_env, database, fail, insert_workers, knob, median, table, write_config
from attune_sensor.config import MIN_HEARTBEAT_INTERVAL
from attune_sensor.worker.registration import HEARTBEAT_SQL

FIRST, LAST = (int(n) for n in knob("BENCH_FOOTPRINT_BEATS", "1000,3000", "5,15", str).split(","))
INTERVAL = knob("BENCH_FOOTPRINT_INTERVAL", MIN_HEARTBEAT_INTERVAL, MIN_HEARTBEAT_INTERVAL, float)
READY_TIMEOUT = 60.0
HEARTBEAT = "heartbeat: worker"

# argv: url, worker id, updates, statement. Prints "ready" once connected, "done" after the
# updates, then waits for a line on stdin (so that its memory can be read while it lives).
BASELINE = """
import sys, psycopg2, sdnotify, yaml, pythonjsonlogger
url, worker_id, updates, statement = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
conn = psycopg2.connect(url); conn.autocommit = True
cur = conn.cursor()
print("ready", flush=True)
cur.execute("SELECT xmin::text FROM worker WHERE id = %s", (worker_id,))
fence = {"id": worker_id, "xmin": cur.fetchone()[0]}
for _ in range(updates):
    cur.execute(statement, fence)
    rows = cur.fetchall()
    if not rows:
        sys.exit("baseline: the heartbeat's fence missed")
    fence["xmin"] = rows[0][0]
print("done", flush=True)
sys.stdin.readline()
"""
CLK = os.sysconf("SC_CLK_TCK")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    fail(f"no VmRSS for pid {pid}")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def read_line(proc, expected, timeout):
    """The baseline's next line, which must be `expected`, within `timeout` seconds."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            fail(f"the baseline process did not say {expected!r} within {timeout:g} s")
    line = proc.stdout.readline().decode().strip()  # unbuffered: what select() saw is all there is
    if line != expected:
        proc.wait(10)
        fail(f"the baseline process said {line!r} instead of {expected!r} (exit code {proc.returncode})")


def baseline(url, worker_id, updates):
    """(seconds from exec to connected, RSS in KiB after `updates` heartbeat statements)."""
    started = time.perf_counter()
    # bufsize=0: a buffered reader could swallow "ready" and "done" in one read, and select()
    # would then wait for a line already read (a bench that hung under load)
    proc = subprocess.Popen([sys.executable, "-c", BASELINE, url, str(worker_id), str(updates), HEARTBEAT_SQL],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=daemon_env())
    try:
        read_line(proc, "ready", READY_TIMEOUT)
        ready = time.perf_counter() - started
        read_line(proc, "done", 600)
        rss = rss_kib(proc.pid)
        proc.stdin.write(b"\n")
        proc.stdin.close()
        if proc.wait(30) != 0:
            fail(f"the baseline process exited with code {proc.returncode}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return ready, rss


def start_daemon(url, workdir, name):
    """A daemon started with its own notify socket; returns (Daemon, seconds from exec to READY=1)."""
    path = write_config(workdir, url, name, heartbeat_interval=INTERVAL, reaper=False,
                        capabilities={"runtimes": ["python", "shell"]})
    sock_path = os.path.join(workdir, f"{name}.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(sock_path)
        sock.settimeout(0.05)
        started = time.perf_counter()
        daemon = Daemon(path, env=daemon_env(NOTIFY_SOCKET=sock_path), name=f"daemon {name}")
        while True:
            try:
                if b"READY=1" in sock.recv(4096):
                    return daemon, time.perf_counter() - started
            except socket.timeout:
                pass
            if daemon.proc.poll() is not None or time.perf_counter() - started > READY_TIMEOUT:
                with daemon:  # stops it, if it still runs
                    daemon.check_running("READY=1 on its notify socket")
                    fail(f"{daemon.name} sent no READY=1 within {READY_TIMEOUT:g} s; its last lines:\n{daemon.tail()}")


def sample(daemon, beats):
    """(heartbeats logged, RSS KiB, CPU seconds) once the daemon has logged `beats` heartbeats."""
    seen = daemon.wait_for(HEARTBEAT, beats, timeout=beats * INTERVAL * 3 + 60)
    return seen, rss_kib(daemon.pid), cpu_seconds(daemon.pid)


def main():
    if not 0 < FIRST < LAST:
        fail(f"BENCH_FOOTPRINT_BEATS must be two counts, the first smaller: got {FIRST},{LAST}")
    # Installed packages run from byte-code compiled at install time (py3compile in the .deb);
    # compile the working tree the same way so PYTHONDONTWRITEBYTECODE cannot skew start-up.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "attune_sensor")], check=True, timeout=120)
    with database() as (_, url), tempfile.TemporaryDirectory() as workdir:
        insert_workers(url, 1)  # the baseline's row (id 1)
        base_ready, base_rss, d_ready = [], [], []
        # start-up, interleaved so that drift on a shared machine hits both sides
        for run in range(RUNS):
            ready, rss = baseline(url, 1, FIRST)
            base_ready.append(ready)
            base_rss.append(rss)
            daemon, ready = start_daemon(url, workdir, f"ready-{run}")
            with daemon:
                d_ready.append(ready)
                daemon.stop_cleanly()
        # memory and CPU: the daemons side by side, each sampled at its own counts
        daemons = []
        try:
            for run in range(RUNS):
                daemons.append(start_daemon(url, workdir, f"bench-{run}")[0])
            firsts = [sample(d, FIRST) for d in daemons]
            lasts = [sample(d, LAST) for d in daemons]
            for daemon in daemons:
                daemon.stop_cleanly()
        finally:
            for daemon in daemons:
                daemon.__exit__(None, None, None)
    rss_first = median([s[1] for s in firsts])
    rss_last = median([s[1] for s in lasts])
    cpu = median([(b[2] - a[2]) / (b[0] - a[0]) for a, b in zip(firsts, lasts)])
    counted = f"{min(s[0] for s in firsts):,}-{max(s[0] for s in firsts):,}"
    counted_last = f"{min(s[0] for s in lasts):,}-{max(s[0] for s in lasts):,}"
    growth = (rss_last - rss_first) / rss_first * 100
    ready_ratio = median(d_ready) / median(base_ready)
    table(f"Footprint (median of {RUNS} runs; daemon heartbeat every {INTERVAL:g} s, reaper off)",
          ("measure", "daemon", "baseline", "ratio / value", "target"), [
              (f"RSS after {FIRST:,} heartbeats (logged: {counted})", f"{rss_first / 1024:.1f} MiB",
               f"{median(base_rss) / 1024:.1f} MiB", f"{rss_first / median(base_rss):.3f}", "<= 1.15"),
              (f"RSS growth {FIRST:,} -> {LAST:,} heartbeats (logged: {counted_last})", f"{rss_last / 1024:.1f} MiB",
               "-", f"{growth:+.2f} %", "< 1 %"),
              ("CPU time per heartbeat (between the two samples)", f"{cpu * 1e6:.0f} us", "-", "-", "-"),
              ("exec -> READY=1 / import + connect", f"{median(d_ready) * 1000:.0f} ms",
               f"{median(base_ready) * 1000:.0f} ms", f"{ready_ratio:.2f}", "<= 1.5"),
          ])


if __name__ == "__main__":
    main()
