"""The daemon on Debian bookworm's own interpreter and libraries (python3-psycopg2 2.9.5,
python3-yaml, python3-sdnotify 0.3.1, python3-pythonjsonlogger 2.0.1, whose import path differs
from PyPI's), as the .deb runs it; the virtualenv tests cover the PyPI versions."""

import json
import signal
import subprocess
from pathlib import Path

from support import base_env, worker_row, write_config

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_PYTHON = "/usr/bin/python3"


def test_json_logs_and_lifecycle_on_bookworm_libraries(spec_db_url, tmp_path):
    versions = subprocess.run([DEBIAN_PYTHON, "-c", "import psycopg2, pythonjsonlogger, yaml, sdnotify;"
                               "print(psycopg2.__file__, pythonjsonlogger.__file__)"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert versions.returncode == 0, f"Debian's python3 libraries missing (packaging/install-deps.sh): {versions.stdout}"
    assert versions.stdout.startswith("/usr/lib/python3/dist-packages/")
    path = write_config(tmp_path, {"database": {"url": spec_db_url}, "log": {"format": "json"},
                                  "sensor": {"worker_name": "sensor-bookworm", "heartbeat_interval": 0.3}})
    proc = subprocess.Popen([DEBIAN_PYTHON, "-m", "attune_sensor.cli", "--config", path, "run"], cwd=ROOT,
                            env=base_env({"PYTHONPATH": str(ROOT)}), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if sum("heartbeat: worker" in x for x in lines) >= 2:
                break
        assert worker_row(spec_db_url, "sensor-bookworm")["status"] == "active"
        proc.send_signal(signal.SIGTERM)
        lines += proc.stdout.readlines()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    records = [json.loads(line) for line in lines]
    assert records[0]["message"].startswith("Registering sensor worker sensor-bookworm")
    assert records[-1]["message"].startswith("Deregistered sensor worker sensor-bookworm")
    assert worker_row(spec_db_url, "sensor-bookworm")["status"] == "inactive"
