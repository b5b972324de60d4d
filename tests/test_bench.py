"""Every bench in bench/ runs at toy size (BENCH_QUICK=1) as a real subprocess, so that none can
rot: each exits 0 and prints its tables, and one that cannot start its daemon ends with an error
instead of hanging. No speed is asserted (bench/ measures; tests do not).

The benches start their own throwaway clusters (bench/common.py: packaging/pgcluster.py, as the
`cluster` fixture), all at once when the first test here runs, and each test waits for its own:
a toy bench mostly waits for heartbeats, so side by side they take about as long as the longest
(detection: its reaper's 10 s period, twice)."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from support import base_env, wait_for

BENCH = Path(__file__).resolve().parent.parent / "bench"
TIMEOUT = 240  # seconds, each; the longest takes about 25 s on 2 idle cores

# bench -> the titles of the tables it prints, in order (each title's start)
TABLES = {
    "footprint": ["Footprint"],
    "heartbeat_cost": ["Statements of one daemon (pg_stat_statements), reaper off",
                       "Statements of one daemon (pg_stat_statements), reaper on", "Heartbeat latency"],
    "fleet_scale": ["Paced fleet", "Unpaced maximum rate"],
    "table_health": ["1,000 heartbeats over 200 rows"],
    "queries": ["Queries at 200 workers"],
    "detection": ["Dead-worker detection"],
    "scheduling": ["Placing 60 sensors over 20 workers", "A tenth of the workers die at once"],
    "runner": ["placed -> running", "failover of a killed worker's running sensors",
               "the daemon supervising idle sensors"],
    "platform_sync": ["A sync pass at", "Peak memory of a process", "A platform sensor with one daemon"],
}
# runs that must fail, quickly and clearly: (bench, extra environment, what stderr says)
FAILING = {
    # below the product's heartbeat floor: the daemon refuses its config (exit 78)
    "footprint-refused": ("footprint", {"BENCH_FOOTPRINT_INTERVAL": "0.001"}, "exited with code 78"),
}


def bench_env(extra=None):
    env = {k: v for k, v in base_env().items() if not k.startswith("BENCH_")}
    env.update(BENCH_QUICK="1", **(extra or {}))
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts every run at once; yields name -> (Popen, output file)."""
    directory = tmp_path_factory.mktemp("bench")
    started = {name: launch(directory, name, name, {}) for name in TABLES}
    yield started
    for proc, _ in started.values():
        stop(proc)


def stop(proc):
    """SIGTERM (a bench then destroys its clusters and stops its daemons), SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def launch(directory, name, bench, extra):
    """bench/BENCH.py as a subprocess, its output to a file. -X faulthandler: a run that hangs
    is sent SIGABRT at the time limit and prints where each of its threads was."""
    output = directory / f"{name}.txt"
    with open(output, "w") as handle:
        proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-u", str(BENCH / f"{bench}.py")], cwd=BENCH,
                                env=bench_env(extra), stdin=subprocess.DEVNULL, stdout=handle,
                                stderr=subprocess.STDOUT)
    return proc, output


def finished(runs, name):
    proc, output = runs[name]
    try:
        code = proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler: where it hung
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            stop(proc)
        pytest.fail(f"bench/{name}.py did not finish within {TIMEOUT} s:\n{output.read_text()}")
    return code, output.read_text()


def tables(text):
    """{title: data rows} of the Markdown tables common.table() printed."""
    found = {}
    for match in re.finditer(r"^## (.+)\n\n\|.*\|\n\|[-|]+\|\n((?:\|.*\|\n)*)", text, re.M):
        found[match.group(1)] = match.group(2).splitlines()
    return found


def test_every_bench_is_run_here_and_by_run_all():
    scripts = {p.stem for p in BENCH.glob("*.py")} - {"common"}
    assert scripts == set(TABLES)
    listed = re.search(r"^ALL=\(([^)]*)\)", (BENCH / "run-all.sh").read_text(), re.M).group(1).split()
    assert sorted(listed) == sorted(scripts)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_bench_runs_at_toy_size(runs, name):
    code, text = finished(runs, name)
    assert code == 0, f"bench/{name}.py exited with {code}:\n{text}"
    printed = tables(text)
    titles = list(printed)
    for expected in TABLES[name]:
        title = next((t for t in titles if t.startswith(expected)), None)
        assert title, f"bench/{name}.py printed no table {expected!r}:\n{text}"
        assert printed[title], f"bench/{name}.py printed the table {title!r} without rows:\n{text}"
        titles.remove(title)
    assert "nan" not in text.lower().split(), text


@pytest.mark.parametrize("name", sorted(FAILING))
def test_bench_fails_clearly(tmp_path, name):
    bench, extra, _ = FAILING[name]
    code, text = finished({name: launch(tmp_path, name, bench, extra)}, name)  # on its own, after the others
    assert code != 0, text
    assert FAILING[name][2] in text, text
    assert "Traceback" not in text, text


def test_a_bench_stopped_early_leaves_nothing_running():
    """SIGTERM to a bench in the middle of its run (the suite's teardown does that to a run whose
    test was never reached): its clusters are destroyed and its daemons stopped, none is left."""
    private = Path(tempfile.mkdtemp(prefix="bench-stopped-"))  # its clusters' parent: postgres reads it
    os.chmod(private, 0o755)
    proc = subprocess.Popen([sys.executable, "-u", str(BENCH / "runner.py")], cwd=BENCH,
                            env=bench_env({"TMPDIR": str(private)}), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def started_by_it():
        return [line for line in subprocess.run(["ps", "-ww", "-eo", "args"], stdout=subprocess.PIPE, text=True).stdout.splitlines()
                if str(private) in line]

    try:
        wait_for(lambda: any("attune-sensor" in line for line in started_by_it()), 120,
                 what="the bench's first daemon")
    finally:
        stop(proc)
    try:
        assert proc.returncode == 128 + signal.SIGTERM
        wait_for(lambda: not started_by_it(), 30, what="nothing the bench started left running")
        assert not list(private.glob("attune-pg-*"))
    finally:
        shutil.rmtree(private, ignore_errors=True)
