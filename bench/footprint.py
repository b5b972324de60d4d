"""Footprint on the host: resident memory after 1,000 and 10,000 heartbeats, CPU time per
heartbeat, and time from exec to READY=1, each against a baseline process that imports the same
four libraries and holds one connection (the physical floor for this daemon)."""

import os
import socket
import subprocess
import sys
import tempfile
import time

from common import ATTUNE_SENSOR, ROOT, RUNS, database, median, table

BASELINE = """
import sys, psycopg2, sdnotify, yaml, pythonjsonlogger
conn = psycopg2.connect(sys.argv[1]); conn.autocommit = True
cur = conn.cursor()
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    cur.execute("UPDATE worker SET last_heartbeat = now(), status = 'active' WHERE id = 1 AND meta ->> 'instance_id' = 'x'")
print("done", flush=True)
sys.stdin.readline()
"""
CLK = os.sysconf("SC_CLK_TCK")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def env_without_systemd():
    return {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}


def baseline(url, updates):
    proc = subprocess.Popen([sys.executable, "-c", BASELINE, url, str(updates)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env_without_systemd())
    started = time.perf_counter()
    assert proc.stdout.readline().strip() == "ready"
    ready = time.perf_counter() - started
    assert proc.stdout.readline().strip() == "done"
    rss = rss_kib(proc.pid)
    proc.stdin.write("\n")
    proc.stdin.close()
    proc.wait()
    return ready, rss


def daemon_run(url, workdir, name, heartbeats=(1000, 10000)):
    path = os.path.join(workdir, f"{name}.yaml")
    with open(path, "w") as handle:
        handle.write(f"database: {{url: '{url}'}}\nsensor:\n  worker_name: {name}\n  heartbeat_interval: 0.001\n"
                     "  reaper: false\n  capabilities: {runtimes: [python, shell]}\n")
    sock_path = os.path.join(workdir, f"{name}.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    env = env_without_systemd()
    env["NOTIFY_SOCKET"] = sock_path
    started = time.perf_counter()
    proc = subprocess.Popen([ATTUNE_SENSOR, "--config", path, "run"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    ready = None
    while ready is None:
        if b"READY=1" in sock.recv(4096):
            ready = time.perf_counter() - started
    samples = {}
    count = 0
    for line in proc.stderr:
        if "heartbeat: worker" in line:
            count += 1
            if count in heartbeats:
                samples[count] = (rss_kib(proc.pid), cpu_seconds(proc.pid))
                if count == heartbeats[-1]:
                    break
    proc.terminate()
    proc.wait()
    sock.close()
    return ready, samples


def main():
    # Installed packages run from byte-code compiled at install time (py3compile in the .deb);
    # compile the working tree the same way so PYTHONDONTWRITEBYTECODE cannot skew start-up.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "attune_sensor")], check=True)
    with database() as (cluster, url), tempfile.TemporaryDirectory() as workdir:
        base_ready, base_rss, d_ready, d_rss1k, d_rss10k, d_cpu = [], [], [], [], [], []
        for run in range(RUNS):
            ready, rss = baseline(url, 1000)
            base_ready.append(ready)
            base_rss.append(rss)
            ready, samples = daemon_run(url, workdir, f"bench-{run}")
            d_ready.append(ready)
            d_rss1k.append(samples[1000][0])
            d_rss10k.append(samples[10000][0])
            d_cpu.append((samples[10000][1] - samples[1000][1]) / 9000)
        rss_ratio = median(d_rss1k) / median(base_rss)
        growth = (median(d_rss10k) - median(d_rss1k)) / median(d_rss1k) * 100
        ready_ratio = median(d_ready) / median(base_ready)
        table("Footprint (median of %d runs)" % RUNS, ("measure", "daemon", "baseline", "ratio / value", "target"), [
            ("RSS after 1,000 heartbeats", f"{median(d_rss1k) / 1024:.1f} MiB", f"{median(base_rss) / 1024:.1f} MiB",
             f"{rss_ratio:.3f}", "<= 1.15"),
            ("RSS growth 1,000 -> 10,000", f"{median(d_rss10k) / 1024:.1f} MiB", "-", f"{growth:+.2f} %", "< 1 %"),
            ("CPU time per heartbeat", f"{median(d_cpu) * 1e6:.0f} us", "-", "-", "-"),
            ("exec -> READY=1 / import+connect", f"{median(d_ready) * 1000:.0f} ms",
             f"{median(base_ready) * 1000:.0f} ms", f"{ready_ratio:.2f}", "<= 1.5"),
        ])


if __name__ == "__main__":
    main()
