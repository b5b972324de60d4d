"""Running what is placed, with real processes: real daemons start, supervise and stop real
python and shell sensors that write what they see (environment, working directory, pid) and a
timestamped line per tick to files; real signals; a real partition through tcpproxy."""

import json
import os
import signal
import time

import pytest

from support import Daemon, attune_database, query, run_cli, wait_for, worker_row, write_config
from tcpproxy import TcpProxy

PY_SENSOR = """\
import json, os, sys, time
out = os.environ["OUT"]
with open(out + ".seen.json", "w") as f:
    json.dump({"env": dict(os.environ), "cwd": os.getcwd(), "pid": os.getpid()}, f)
while True:
    with open(out, "a") as f:
        f.write(f"{time.time():.6f} {os.getpid()}\\n")
    print("tick", flush=True)
    time.sleep(0.05)
"""
SH_SENSOR = """\
echo "$$ $(pwd) $ATTUNE_SENSOR_REF" > "$OUT"
while true; do echo shell-tick; sleep 0.2; done
"""
IGNORES_TERM = """\
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(os.environ["OUT"], "w").write(str(os.getpid()))
while True:
    time.sleep(0.1)
"""
CRASHES = "import sys; print('about to fail', file=sys.stderr); sys.exit(3)\n"
FLOODS = "import sys\nwhile True:\n    sys.stdout.write('x' * 100000 + '\\n')\n"


def packs(tmp_path, **scripts):
    base = tmp_path / "packs"
    (base / "demo" / "sensors").mkdir(parents=True, exist_ok=True)
    for name, text in scripts.items():
        (base / "demo" / "sensors" / name).write_text(text)
    return str(base)


def daemon_config(tmp_path, url, name, base, **sensor):
    # 1 s, not the suite's usual 0.5 s: the fence stops sensors when a beat is late by a quarter
    # of the window, and at 0.5 s a loaded CI machine would stop them for nothing
    sensor.setdefault("heartbeat_interval", 1)
    sensor.setdefault("sensor_timeout", 2)
    token = tmp_path / f"token-{name}"
    token.write_text("tok-3nq\n")
    token.chmod(0o600)
    return write_config(tmp_path, {"database": {"url": url}, "packs_base_dir": base,
                                   "api": {"url": "http://api.example:8080", "token_file": str(token)},
                                   "message_queue": {"url": "amqp://mq.example:5672"},
                                   "sensor": {"worker_name": name, **sensor}})


def place(url, ref, entrypoint, runtime="python", *env):
    args = ["place", ref, "--runtime", runtime, "--entrypoint", entrypoint]
    for item in env:
        args += ["--env", item]
    return run_cli(*args, env={"DATABASE_URL": url})


def _group(pgid):
    """Pids of the processes in process group `pgid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    if int(handle.read().rsplit(")", 1)[1].split()[2]) == pgid:
                        found.append(int(entry))
            except (OSError, ValueError):
                continue
    return found


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not running; it only waits for its parent
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] != "Z"


def start(tmp_path, url, name, base, env=None, **sensor):
    env = dict({"ATTUNE_SENSOR_RUNTIMES": "python,shell"}, **(env or {}))
    return Daemon(daemon_config(tmp_path, url, name, base, **sensor), env)


def test_placed_sensors_run_with_the_platform_contract_and_stop_with_the_daemon(db_url, tmp_path):
    base = packs(tmp_path, **{"py.py": PY_SENSOR, "sh.sh": SH_SENSOR})
    out_py, out_sh = tmp_path / "py.out", tmp_path / "sh.out"
    # placed before any worker exists: pending, then placed when the worker registers
    assert place(db_url, "demo.py", "demo/sensors/py.py", "python", f"OUT={out_py}", "ZONE=eu").returncode == 1
    assert place(db_url, "demo.sh", f"{base}/demo/sensors/sh.sh", "shell", f"OUT={out_sh}").returncode == 1
    daemon = start(tmp_path, db_url, "sensor-run1", base, env={"DATABASE_URL": db_url})
    try:
        daemon.wait_for_line("sensor demo.py: tick")
        daemon.wait_for_line("sensor demo.sh: shell-tick")
        seen = json.loads(wait_for(lambda: (tmp_path / "py.out.seen.json").exists()
                                   and (tmp_path / "py.out.seen.json").read_text()))
        env = seen["env"]
        assert env["ATTUNE_SENSOR_REF"] == "demo.py"
        assert env["ATTUNE_SENSOR_TRIGGERS"] == "[]"
        assert env["ATTUNE_API_URL"] == "http://api.example:8080"
        assert env["ATTUNE_API_TOKEN"] == "tok-3nq"
        assert env["ATTUNE_MQ_URL"] == "amqp://mq.example:5672"
        assert env["ATTUNE_MQ_EXCHANGE"] == "attune.events"
        assert env["ATTUNE_LOG_LEVEL"] == "info"
        assert env["ATTUNE_SENSOR_POLL_INTERVAL"] == "30"
        assert env["ZONE"] == "eu"
        for secret in ("DATABASE_URL", "NOTIFY_SOCKET", "ATTUNE_SENSOR_RUNTIMES", "CREDENTIALS_DIRECTORY"):
            assert secret not in env
        assert seen["cwd"] == os.path.join(base, "demo", "sensors")
        shell_pid, shell_cwd, shell_ref = wait_for(lambda: out_sh.exists() and out_sh.read_text().split()).copy()
        assert (shell_cwd, shell_ref) == (os.path.join(base, "demo", "sensors"), "demo.sh")
        # the token never reaches the daemon's own output
        assert "tok-3nq" not in daemon.output
        # what an operator sees: each sensor running, with its pid
        listing = wait_for(lambda: (r := run_cli("assignments", "--json", env={"DATABASE_URL": db_url}))
                           and all(row["state"] == "running" for row in json.loads(r.stdout)) and r)
        rows = {row["sensor_ref"]: row for row in json.loads(listing.stdout)}
        assert rows["demo.py"]["pid"] == seen["pid"] and rows["demo.sh"]["pid"] == int(shell_pid)
        capabilities = wait_for(lambda: (c := worker_row(db_url, "sensor-run1")["capabilities"])
                                .get("sensor_processes_running") == 2 and c)
        assert capabilities["sensor_processes_monitored"] == 2
        config = daemon_config(tmp_path, db_url, "sensor-run1", base)
        check = run_cli("--config", config, "check")
        assert check.returncode == 0 and "2 of 10 sensors placed (2 running)" in check.stdout, check.stdout
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    finally:
        daemon.stop()
    assert not alive(seen["pid"]) and not alive(int(shell_pid))
    assert worker_row(db_url, "sensor-run1")["status"] == "inactive"
    assert "sensor demo.py stopped" in daemon.output


def test_a_daemon_killed_with_sigkill_leaves_no_sensor_running(spec_db_url, tmp_path):
    base = packs(tmp_path, **{"py.py": PY_SENSOR, "sh.sh": SH_SENSOR,
                              "sleeps.sh": 'echo $$ > "$OUT"\nwhile true; do sleep 30; done\n'})
    place(spec_db_url, "k.py", "demo/sensors/py.py", "python", f"OUT={tmp_path / 'k.out'}")
    place(spec_db_url, "k.sh", "demo/sensors/sh.sh", "shell", f"OUT={tmp_path / 'k.sh.out'}")
    place(spec_db_url, "k.sleeps", "demo/sensors/sleeps.sh", "shell", f"OUT={tmp_path / 'k.sleeps.out'}")
    daemon = start(tmp_path, spec_db_url, "sensor-kill9", base, env={"DATABASE_URL": spec_db_url})
    try:
        daemon.wait_for_line("sensor k.py: tick")
        daemon.wait_for_line("sensor k.sh: shell-tick")
        pid = json.loads((tmp_path / "k.out.seen.json").read_text())["pid"]
        shell_pid = int((tmp_path / "k.sh.out").read_text().split()[0])
        sleeps_pid = int(wait_for(lambda: (tmp_path / "k.sleeps.out").exists()
                                  and (tmp_path / "k.sleeps.out").read_text().strip()))
        sleeper = wait_for(lambda: [p for p in _group(sleeps_pid) if p != sleeps_pid], timeout=5,
                           what="the shell sensor's sleep")[0]
        daemon.proc.kill()
        daemon.wait(10)
        wait_for(lambda: not alive(pid) and not alive(shell_pid), timeout=5, what="the sensors to die with the daemon")
        size = (tmp_path / "k.out").stat().st_size
        time.sleep(0.5)
        assert (tmp_path / "k.out").stat().st_size == size  # nothing writes any more
    finally:
        daemon.stop()
    # what the shell sensor started outlives it (PR_SET_PDEATHSIG reaches its own process only)
    # until this worker's next daemon starts: it kills the group before it registers
    assert alive(sleeper)
    again = start(tmp_path, spec_db_url, "sensor-kill9", base, env={"DATABASE_URL": spec_db_url})
    try:
        again.wait_for_line("left behind")
        wait_for(lambda: not alive(sleeper), timeout=10, what="the leftover sleep killed")  # SIGKILL is sent, then delivered
    finally:
        again.stop()


def test_sigterm_kills_a_sensor_that_ignores_it_after_sensor_timeout_then_deregisters(spec_db_url, tmp_path):
    base = packs(tmp_path, **{"stubborn.py": IGNORES_TERM})
    out = tmp_path / "stubborn.pid"
    place(spec_db_url, "stubborn", "demo/sensors/stubborn.py", "python", f"OUT={out}")
    daemon = start(tmp_path, spec_db_url, "sensor-stubborn", base, env={"DATABASE_URL": spec_db_url},
                   sensor_timeout=1.5)
    try:
        daemon.wait_for_line("sensor stubborn started")
        pid = int(wait_for(lambda: out.exists() and out.read_text()))
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
        waited = time.monotonic() - started
    finally:
        daemon.stop()
    assert not alive(pid)
    assert "sensor stubborn stopped (signal SIGKILL)" in daemon.output
    assert waited >= 1.5  # it was given its sensor_timeout, then killed
    assert worker_row(spec_db_url, "sensor-stubborn")["status"] == "inactive"


def test_a_crashing_sensor_is_restarted_with_doubling_backoff_and_its_stderr_kept(spec_db_url, tmp_path):
    base = packs(tmp_path, **{"crash.py": CRASHES})
    place(spec_db_url, "crashy", "demo/sensors/crash.py")
    daemon = start(tmp_path, spec_db_url, "sensor-crashy", base, env={"DATABASE_URL": spec_db_url})
    try:
        daemon.wait_for_line("restarting in 4s (failure 3 in a row)", timeout=30)
        for delay, failure in ((1, 1), (2, 2)):
            assert f"sensor crashy exited with code 3 after" in daemon.output
            assert f"restarting in {delay}s (failure {failure} in a row)" in daemon.output
        assert "sensor crashy (stderr): about to fail" in daemon.output
        daemon.signal(signal.SIGHUP)  # an immediate read and report
        row = wait_for(lambda: (r := query(spec_db_url, "SELECT status, consecutive_failures, last_exit_code, detail "
                                                         "FROM attune_sensor.sensor_run WHERE sensor_ref = 'crashy'"))
                       and r[0][1] >= 3 and r[0])
        assert row[0] in ("backoff", "running") and row[2] == 3 and "about to fail" in row[3]
    finally:
        daemon.stop()


def test_a_flooding_sensor_never_blocks_the_heartbeat_and_long_lines_are_cut(spec_db_url, tmp_path):
    base = packs(tmp_path, **{"flood.py": FLOODS})
    place(spec_db_url, "flood", "demo/sensors/flood.py")
    daemon = start(tmp_path, spec_db_url, "sensor-flood", base, env={"DATABASE_URL": spec_db_url})
    try:
        daemon.wait_for_line("[line cut at 8 KiB]")
        beats = sum("heartbeat: worker" in line for line in daemon.lines)
        daemon.wait_for_line("heartbeat: worker", count=beats + 4, timeout=10)
        cut = next(line for line in daemon.lines if "[line cut at 8 KiB]" in line)
        assert cut.count("x") == 8192
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0


def test_unplace_stops_the_sensor_and_a_reload_starts_a_new_placement_at_once(spec_db_url, tmp_path):
    base = packs(tmp_path, **{"py.py": PY_SENSOR})
    daemon = start(tmp_path, spec_db_url, "sensor-unplace", base, env={"DATABASE_URL": spec_db_url})
    try:
        daemon.wait_for_line("heartbeat: worker")
        assert place(spec_db_url, "late.py", "demo/sensors/py.py", "python",
                     f"OUT={tmp_path / 'late.out'}").stdout.strip() == "sensor-unplace"
        daemon.signal(signal.SIGHUP)  # at once, rather than at the next read
        daemon.wait_for_line("sensor late.py: tick", timeout=5)
        pid = json.loads((tmp_path / "late.out.seen.json").read_text())["pid"]
        assert run_cli("unplace", "late.py", env={"DATABASE_URL": spec_db_url}).returncode == 0
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_line("sensor late.py stopped", timeout=10)
        assert not alive(pid)
    finally:
        daemon.stop()


@pytest.mark.parametrize("case", ["missing", "outside", "symlink-out", "writable-dir", "dotdot"])
def test_an_entrypoint_that_cannot_run_is_failed_and_said_never_a_crash(spec_db_url, tmp_path, case):
    base = packs(tmp_path, **{"ok.py": PY_SENSOR})
    elsewhere = tmp_path / "elsewhere.py"
    elsewhere.write_text(PY_SENSOR)
    entrypoint = {"missing": "demo/sensors/nope.py", "outside": str(elsewhere), "symlink-out": "demo/sensors/link.py",
                  "writable-dir": "demo/open/ok.py", "dotdot": "demo/sensors/ok.py"}[case]
    if case == "symlink-out":
        os.symlink(elsewhere, os.path.join(base, "demo", "sensors", "link.py"))
    if case == "writable-dir":
        os.makedirs(os.path.join(base, "demo", "open"))
        (tmp_path / "packs" / "demo" / "open" / "ok.py").write_text(PY_SENSOR)
        os.chmod(os.path.join(base, "demo", "open"), 0o777)
    if case == "dotdot":
        # what `place` refuses can still be written to the table by anyone who may: the worker checks again
        query(spec_db_url, "INSERT INTO attune_sensor.assignment (sensor_ref, runtime, entrypoint) "
                           "VALUES ('bad', 'python', 'demo/../demo/sensors/ok.py')")
        refused = place(spec_db_url, "bad2", "demo/../demo/sensors/ok.py")
        assert refused.returncode == 2 and "'..'" in refused.stderr
    else:
        assert place(spec_db_url, "bad", entrypoint).returncode == 1  # pending: no worker yet
    config = daemon_config(tmp_path, spec_db_url, "sensor-bad", base)
    daemon = Daemon(config, {"ATTUNE_SENSOR_RUNTIMES": "python", "DATABASE_URL": spec_db_url})
    try:
        daemon.wait_for_line("sensor bad failed:")
        daemon.wait_for_line("heartbeat: worker", count=2)
        assert daemon.proc.poll() is None
        wait_for(lambda: query(spec_db_url, "SELECT status FROM attune_sensor.sensor_run WHERE sensor_ref = 'bad'")
                 == [("failed",)])
        check = run_cli("--config", config, "check")
        assert check.returncode == 2 and "failed" in check.stdout and "bad" in check.stdout
    finally:
        daemon.stop()
    assert not (tmp_path / "elsewhere.py.seen.json").exists()


def test_place_refuses_an_env_that_changes_what_code_runs(spec_db_url):
    for item in ("PATH=/tmp", "LD_PRELOAD=/tmp/x.so", "PYTHONPATH=/tmp", "NODE_OPTIONS=--require=/tmp/x",
                 "ATTUNE_API_TOKEN=forged"):
        result = place(spec_db_url, "envy", "demo/sensors/ok.py", "python", item)
        assert result.returncode == 2, (item, result.stderr)
        assert "may not be set by a placement" in result.stderr
    assert query(spec_db_url, "SELECT count(*) FROM attune_sensor.assignment") == [(0,)]


def test_a_token_file_readable_by_others_is_refused(spec_db_url, tmp_path):
    base = packs(tmp_path)
    path = daemon_config(tmp_path, spec_db_url, "sensor-token", base)
    token = tmp_path / "token-sensor-token"
    token.chmod(0o644)
    daemon = Daemon(path, {"ATTUNE_SENSOR_RUNTIMES": "python"})
    assert daemon.wait(20) == 78
    assert "api.token_file" in daemon.output and "readable by every user" in daemon.output
    assert "tok-3nq" not in daemon.output
    assert worker_row(spec_db_url, "sensor-token") is None


def test_lowering_max_concurrent_sensors_stops_the_extra_sensor(spec_db_url, tmp_path):
    base = packs(tmp_path, **{"py.py": PY_SENSOR})
    for n in (1, 2):
        place(spec_db_url, f"cap{n}", "demo/sensors/py.py", "python", f"OUT={tmp_path / f'cap{n}.out'}")
    config = daemon_config(tmp_path, spec_db_url, "sensor-cap", base, max_concurrent_sensors=2)
    daemon = Daemon(config, {"ATTUNE_SENSOR_RUNTIMES": "python"})
    try:
        daemon.wait_for_line("sensor cap1: tick")
        daemon.wait_for_line("sensor cap2: tick")
        second = json.loads((tmp_path / "cap2.out.seen.json").read_text())["pid"]
        text = open(config).read().replace("max_concurrent_sensors: 2", "max_concurrent_sensors: 1")
        open(config, "w").write(text)
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_line("sensor cap2 stops: more than max_concurrent_sensors (1)")
        wait_for(lambda: not alive(second), timeout=10)
        first = json.loads((tmp_path / "cap1.out.seen.json").read_text())["pid"]
        assert alive(first)
    finally:
        daemon.stop()


def _runs(path):
    """{pid: (first, last)} timestamps of the lines each sensor process wrote."""
    runs = {}
    for line in path.read_text().splitlines():
        stamp, pid = line.split()
        first, _ = runs.get(pid, (float(stamp), None))
        runs[pid] = (first, float(stamp))
    return runs


def test_a_partitioned_worker_stops_its_sensor_before_a_peer_starts_it(cluster, db_url, tmp_path):
    base = packs(tmp_path, **{"py.py": PY_SENSOR})
    out = tmp_path / "part.out"
    proxy = TcpProxy(cluster.port)
    cut_off = db_url.replace(f":{cluster.port}/", f":{proxy.port}/")
    place(db_url, "part.py", "demo/sensors/py.py", "python", f"OUT={out}")
    slow = {"heartbeat_interval": 1}
    a_config = write_config(tmp_path, {"database": {"url": cut_off, "statement_timeout": 0.5, "connect_timeout": 0.5},
                                       "packs_base_dir": base, "api": {"token_file": "none"},
                                       "sensor": {"worker_name": "sensor-part-a", "sensor_timeout": 2, **slow}})
    a = Daemon(a_config, {"ATTUNE_SENSOR_RUNTIMES": "python"})
    b = None
    try:
        a.wait_for_line("sensor part.py: tick")
        b = start(tmp_path, db_url, "sensor-part-b", base, env={"DATABASE_URL": db_url}, **slow)
        b.wait_for_line("heartbeat: worker", count=2)
        proxy.pause()
        a.wait_for_line("stopping 1 sensor(s) before peers may call this worker dead", timeout=15)
        b.wait_for_line("sensor part.py: tick", timeout=30)
        proxy.resume()
        a.wait_for_line("heartbeat succeeded again", timeout=30)
        time.sleep(2)  # A is alive again; the sensor stays with B
    finally:
        proxy.resume()
        a.stop()
        if b:
            b.stop()
        proxy.close()
    runs = sorted(_runs(out).values())
    assert len(runs) >= 2, runs
    for (first_a, last_a), (first_b, _) in zip(runs, runs[1:]):
        assert last_a < first_b, f"two copies ran at once: {runs}"
    # back, A runs it again only if B lost it in turn (a loaded machine can make B miss its own
    # window at a 0.5 s interval; then B's fence stopped it first, as the overlap check shows)
    back = next(i for i, line in enumerate(a.lines) if "heartbeat succeeded again" in line)
    if any("sensor part.py started" in line for line in a.lines[back:]):
        assert "before peers may call this worker dead" in (b.output if b else ""), \
            "A took the sensor back from a live B:\nA:\n" + "\n".join(a.lines[back:]) + "\nB:\n" + b.output


@pytest.fixture(params=["fixture", "platform"])
def platform_url(request, cluster, attune_templates):
    """An Attune database built from the project's fixture and from the platform's migrations."""
    return attune_database(cluster, attune_templates(request.param))


def test_a_platform_sensor_runs_with_its_id_and_its_sensor_process_row(platform_url, tmp_path):
    """On an Attune database the platform's runnable sensor is placed by the daemon itself (the
    sync pass, as the least-privilege daemon role) and runs with its id, its state in the
    platform's own sensor_process."""
    db_url = platform_url
    out = tmp_path / "ticker.out"
    pack = ("INSERT INTO pack (ref, label, version) VALUES ('demo', 'demo', '1.0.0'); "
            if query(db_url, "SELECT to_regclass('attune.pack') IS NOT NULL")[0][0] else "")
    sensor_id = query(db_url, "SET search_path TO attune, public; " + pack +
                              "INSERT INTO runtime (ref, name, aliases, distributions) "
                              "VALUES ('core.python', 'Python', '{python,python3}', '{}'); "
                              "INSERT INTO sensor (ref, pack_ref, label, entrypoint, runtime, runtime_ref, enabled) "
                              "SELECT 'demo.ticker', 'demo', 'Ticker', 'ticker.py', id, ref, true FROM runtime "
                              "RETURNING id")[0][0]
    query(db_url, "SET search_path TO attune, public; "
                  "INSERT INTO trigger (ref, pack_ref, label, sensor, sensor_ref) "
                  "VALUES ('demo.tick', 'demo', 'tick', %s, 'demo.ticker'); "
                  f"INSERT INTO rule (ref, pack_ref, label, action_ref, trigger, trigger_ref, enabled"
                  f"{', pack' if pack else ''}) SELECT 'demo.on_tick', 'demo', 'on tick', 'core.echo', t.id, t.ref, "
                  f"true{', (SELECT id FROM pack)' if pack else ''} FROM trigger AS t", (sensor_id,))
    dbname = db_url.rsplit("/", 1)[1]
    role = f"runner_{dbname}"
    query(db_url, f"CREATE ROLE {role} LOGIN PASSWORD 'runner-pw' IN ROLE attune_sensor_daemon")
    daemon_url = db_url.replace("attune_admin:throwaway-admin-secret", f"{role}:runner-pw")
    base = packs(tmp_path, **{"ticker.py": PY_SENSOR.replace('os.environ["OUT"]', repr(str(out)))})
    daemon = start(tmp_path, daemon_url, "sensor-platform", base)
    try:
        daemon.wait_for_line("sensor demo.ticker: tick", timeout=40)
        seen = json.loads(wait_for(lambda: (tmp_path / "ticker.out.seen.json").exists()
                                   and (tmp_path / "ticker.out.seen.json").read_text()))
        assert seen["env"]["ATTUNE_SENSOR_ID"] == str(sensor_id)
        row = wait_for(lambda: query(db_url, "SELECT status::text, pid, worker_name, sensor_ref "
                                             "FROM attune.sensor_process"), what="a sensor_process row")
        assert row == [("running", seen["pid"], "sensor-platform", "demo.ticker")]
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    finally:
        daemon.stop()
    assert query(db_url, "SELECT status::text, pid FROM attune.sensor_process") == [("stopped", None)]


SLOW_TO_STOP = """\
import os, signal, sys, time
out = os.environ["OUT"]
def stop(*_):
    time.sleep(1.0)  # a sensor that takes its time to stop: a copy elsewhere must still wait
    with open(out, "a") as f:
        f.write(f"{time.time():.6f} {os.getpid()}\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    with open(out, "a") as f:
        f.write(f"{time.time():.6f} {os.getpid()}\\n")
    time.sleep(0.05)
"""


def test_a_rebalanced_sensor_starts_on_its_new_worker_only_after_the_old_one_stopped_it(db_url, tmp_path):
    base = packs(tmp_path, **{"slow.py": SLOW_TO_STOP})
    for n in (1, 2):
        place(db_url, f"mv{n}", "demo/sensors/slow.py", "python", f"OUT={tmp_path / f'mv{n}.out'}")
    a = start(tmp_path, db_url, "sensor-move-a", base, env={"DATABASE_URL": db_url}, max_concurrent_sensors=2)
    b = None
    try:
        a.wait_for_line("sensor mv2 started")
        b = start(tmp_path, db_url, "sensor-move-b", base, env={"DATABASE_URL": db_url}, max_concurrent_sensors=2)
        b.wait_for_line("heartbeat: worker", count=2)
        moved = run_cli("rebalance", env={"DATABASE_URL": db_url})
        assert moved.returncode == 0 and "1 sensor(s) moved" in moved.stdout, moved.stdout
        ref = moved.stdout.split()[1].rstrip(":")
        b.signal(signal.SIGHUP)  # B reads at once: the sensor is its, but A still runs it
        b.wait_for_line(f"assigned sensor {ref}")
        a.signal(signal.SIGHUP)  # A learns it moved, stops it (slowly), says so
        b.wait_for_line(f"sensor {ref} started", timeout=30)
    finally:
        a.stop()
        if b:
            b.stop()
    runs = sorted(_runs(tmp_path / f"{ref}.out").values())
    assert len(runs) == 2, runs
    assert runs[0][1] < runs[1][0], f"two copies ran at once: {runs}"


def test_no_reaper_calls_a_worker_stale_inside_the_window_it_recorded_for_itself(db_url, tmp_path):
    """A worker that promised to stop its sensors within 10 x its interval is not stale for a
    peer configured with stale_multiplier 1.5 before then, and is after."""
    query(db_url, "SET search_path TO public, attune; "
                  "INSERT INTO worker (name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat) "
                  "VALUES ('wide', 'local', 'sensor', 'h', 'active', "
                  "'{\"heartbeat_interval\": 1, \"stale_multiplier\": 10}', '{}', now() - interval '5 seconds'), "
                  "('narrow', 'local', 'sensor', 'h', 'active', '{\"heartbeat_interval\": 1}', '{}', "
                  "now() - interval '5 seconds')")
    config = write_config(tmp_path, {"database": {"url": db_url}, "sensor": {"stale_multiplier": 1.5}})
    stale = json.loads(run_cli("--config", config, "workers", "--stale", "--json").stdout)
    assert [w["name"] for w in stale["workers"]] == ["narrow"]
    query(db_url, "SET search_path TO public, attune; "
                  "UPDATE worker SET last_heartbeat = now() - interval '11 seconds' WHERE name = 'wide'")
    stale = json.loads(run_cli("--config", config, "workers", "--stale", "--json").stdout)
    assert sorted(w["name"] for w in stale["workers"]) == ["narrow", "wide"]


def test_a_second_daemon_under_the_same_name_starts_the_sensors_only_after_the_first_stopped(spec_db_url, tmp_path):
    """A second `run` of the same worker on the same machine (a mistaken manual start, two
    template instances on the default name) takes the row over; the first notices at its next
    heartbeat and stops. The second waits out the first's window: never two copies."""
    base = packs(tmp_path, **{"py.py": PY_SENSOR})
    out = tmp_path / "twin.out"
    place(spec_db_url, "twin", "demo/sensors/py.py", "python", f"OUT={out}")
    first = start(tmp_path, spec_db_url, "sensor-twin", base, env={"DATABASE_URL": spec_db_url},
                  heartbeat_interval=2)
    second = None
    try:
        first.wait_for_line("sensor twin: tick")
        second = start(tmp_path, spec_db_url, "sensor-twin", base, env={"DATABASE_URL": spec_db_url},
                       heartbeat_interval=2)
        second.wait_for_line("was held by another live instance on this machine")
        assert first.wait(30) == 78  # taken over: it stopped its sensor and left
        second.wait_for_line("sensor twin: tick", timeout=30)
    finally:
        first.stop()
        if second:
            second.stop()
    runs = sorted(_runs(out).values())
    assert len(runs) == 2, runs
    assert runs[0][1] < runs[1][0], f"two copies ran at once: {runs}"


def test_what_a_sensor_starts_in_a_group_of_its_own_stops_with_it(spec_db_url, tmp_path):
    """coreutils' timeout puts its command in a process group of its own: stopping the sensor
    must still reach it (the environment marks find it), or a move would leave it running."""
    base = packs(tmp_path, **{"escapes.sh": 'timeout 300 sh -c \'while true; do date +%s.%N >> "$OUT"; '
                                            'sleep 0.1; done\'\n'})
    out = tmp_path / "escapes.out"
    daemon = start(tmp_path, spec_db_url, "sensor-escape", base, env={"DATABASE_URL": spec_db_url})
    try:
        daemon.wait_for_line("heartbeat: worker")
        place(spec_db_url, "escapes", "demo/sensors/escapes.sh", "shell", f"OUT={out}")
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: out.exists() and len(out.read_text().split()) >= 3, what="ticks")
        assert run_cli("unplace", "escapes", env={"DATABASE_URL": spec_db_url}).returncode == 0
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_line("sensor escapes stopped")
        time.sleep(0.5)
        size = out.stat().st_size
        time.sleep(1.0)
        assert out.stat().st_size == size, "the command timeout started still runs"
    finally:
        daemon.stop()


def test_the_assignments_file_is_never_written_through_a_planted_name_and_a_failed_write_is_retried(
        spec_db_url, tmp_path):
    base = packs(tmp_path, **{"sh.sh": SH_SENSOR})
    place(spec_db_url, "af.sh", "demo/sensors/sh.sh", "shell", f"OUT={tmp_path / 'af.out'}")
    blocked = tmp_path / "run"
    blocked.write_text("a file where the directory should be")  # writes fail: ENOTDIR
    target = tmp_path / "victim"
    target.write_text("keep me")
    config = daemon_config(tmp_path, spec_db_url, "sensor-afile", base,
                           assignments_file=str(blocked / "assignments.json"))
    daemon = Daemon(config, {"ATTUNE_SENSOR_RUNTIMES": "shell", "DATABASE_URL": spec_db_url})
    try:
        daemon.wait_for_line("could not write the assignments file")
        blocked.unlink()
        blocked.mkdir()
        pid = daemon.proc.pid
        # what an attacker could plant at the name earlier versions used: never followed, never opened
        os.symlink(target, blocked / f"assignments.json.{pid}.tmp")
        os.mkfifo(blocked / f"assignments.json.{pid}.tmp2")
        daemon.signal(signal.SIGHUP)  # the next read writes it again, though nothing changed
        written = wait_for(lambda: (blocked / "assignments.json").exists()
                           and json.loads((blocked / "assignments.json").read_text()))
        assert [s["sensor_ref"] for s in written["sensors"]] == ["af.sh"]
        assert written["sensors"][0]["state"] in ("running", "starting")
        beats = sum("heartbeat: worker" in line for line in daemon.lines)
        daemon.wait_for_line("heartbeat: worker", count=beats + 2)  # not hung on the FIFO
    finally:
        daemon.stop()
    assert target.read_text() == "keep me"
    assert daemon.output.count("could not write the assignments file") == 1  # said once
