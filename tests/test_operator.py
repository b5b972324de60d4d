"""What an operator's trial found: the fleet listing's placement view, template instances, a
configuration file that exposes a secret, and messages that must say what is true."""

import configparser
import json
import os
import re
import shlex
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from support import (ATTUNE_SENSOR, Daemon, add_pending_sensors, attune_database, base_env, config_for, query,
                     run_cli, unique_name, worker_row, write_config)

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "systemd" / "attune-sensor@.service"


def cli(url, *args, env=None):
    return run_cli(*args, env={"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null", **(env or {})})


# --- workers: labels, taints, and the sensors waiting for a worker ------------------------------

PLACEMENT_FLEET = """
INSERT INTO worker (name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat) VALUES
 ('s-gpu', 'local', 'sensor', 'h1', 'active',
  '{"runtimes": ["python"], "max_concurrent_sensors": 10, "heartbeat_interval": 30,
    "labels": {"zone": "eu-west", "tier": "gold", "junk": 5},
    "taints": [{"key": "gpu", "value": "nvidia", "effect": "no_schedule"}, "maint:prefer_no_schedule", 7]}',
  '{}', now()),
 ('s-plain', 'local', 'sensor', 'h2', 'active',
  '{"runtimes": ["python"], "max_concurrent_sensors": 10, "heartbeat_interval": 30, "labels": "not a map"}',
  '{}', now())
"""


def test_workers_show_labels_taints_and_the_sensors_pending(db_url):
    query(db_url, PLACEMENT_FLEET)
    add_pending_sensors(db_url, 3, "ruby")  # no worker offers ruby: they stay pending
    result = cli(db_url, "workers")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "HOST", "STATUS", "RUNTIMES", "SENSORS", "HEARTBEAT", "LABELS", "TAINTS"]
    gpu = next(line for line in lines if line.startswith("s-gpu"))
    assert "tier=gold,zone=eu-west" in gpu and "junk" not in gpu
    assert "gpu=nvidia:no_schedule,maint:prefer_no_schedule" in gpu
    plain = next(line for line in lines if line.startswith("s-plain"))
    assert plain.split()[-2:] == ["-", "-"]
    assert "pending: 3 sensor(s) waiting for an eligible worker" in result.stdout

    data = json.loads(cli(db_url, "workers", "--json").stdout)
    by_name = {w["name"]: w for w in data["workers"]}
    assert by_name["s-gpu"]["labels"] == {"tier": "gold", "zone": "eu-west"}
    assert by_name["s-gpu"]["taints"] == ["gpu=nvidia:no_schedule", "maint:prefer_no_schedule"]
    assert by_name["s-plain"]["labels"] == {} and by_name["s-plain"]["taints"] == []
    assert data["summary"]["pending"] == 3


def test_a_daemons_own_labels_and_taints_show_as_configured(spec_db_url, tmp_path, daemons):
    name = unique_name("lt-")
    daemon = daemons(config_for(tmp_path, spec_db_url, name, labels={"zone": "eu"},
                                taints=["gpu=nvidia:no_schedule"]))
    daemon.wait_for_line("heartbeat: worker")
    worker = next(w for w in json.loads(cli(spec_db_url, "workers", "--json").stdout)["workers"] if w["name"] == name)
    assert worker["labels"] == {"zone": "eu"} and worker["taints"] == ["gpu=nvidia:no_schedule"]


# --- template instances ---------------------------------------------------------------------


def template_service():
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(TEMPLATE)
    return parser["Service"]


def unit_command(key, instance):
    """The template unit's ExecStart/ExecCondition for `instance`, with this venv's program."""
    words = shlex.split(template_service()[key].replace("%i", instance))
    assert words[0] == "/usr/bin/attune-sensor"
    return [ATTUNE_SENSOR, *words[1:]]


@pytest.fixture
def instance_config():
    """Writes /etc/attune/sensor-NAME.yaml (what the template unit reads) for a unique NAME;
    removed afterwards."""
    written = []

    def write(url, **sensor):
        name = unique_name("i")
        path = Path(f"/etc/attune/sensor-{name}.yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"database": {"url": url}, "sensor": {"heartbeat_interval": 0.5, **sensor}}
        path.write_text(json.dumps(body))
        path.chmod(0o600)
        written.append(path)
        return name

    yield write
    for path in written:
        path.unlink(missing_ok=True)


class UnitDaemon(Daemon):
    """The template unit's ExecStart for one instance, as a real process."""

    def __init__(self, instance):
        self.proc = subprocess.Popen(unit_command("ExecStart", instance), env=base_env(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()


def test_two_instances_on_one_host_register_two_workers_and_check_finds_each(spec_db_url, instance_config):
    first, second = instance_config(spec_db_url), instance_config(spec_db_url)
    host = socket.gethostname()
    assert subprocess.run(unit_command("ExecCondition", first), env=base_env()).returncode == 0
    running = [UnitDaemon(first), UnitDaemon(second)]
    try:
        for daemon, instance in zip(running, (first, second)):
            daemon.wait_for_line(f"heartbeat: worker sensor-{host}-{instance} ")
        for instance in (first, second):
            assert worker_row(spec_db_url, f"sensor-{host}-{instance}")["status"] == "active"
            check = run_cli("check", "--instance", instance)
            assert check.returncode == 0, check.stdout + check.stderr
            assert f"OK: worker sensor-{host}-{instance} " in check.stdout
            shown = run_cli("--instance", instance, "config")
            assert f"worker_name: sensor-{host}-{instance}\n" in shown.stdout
        assert all(daemon.proc.poll() is None for daemon in running)
        mine = run_cli("assignments", "--mine", "--instance", first, "--json")
        assert mine.returncode == 0 and json.loads(mine.stdout) == []
    finally:
        for daemon in running:
            daemon.stop()


def test_an_instance_name_is_checked_before_it_names_a_file(tmp_path):
    for bad in ("../../tmp/x", "a/b", "-x", "a b"):
        result = run_cli("check", "--instance", bad)
        assert result.returncode == 2 and "--instance" in result.stderr, (bad, result.stderr)


def test_the_docs_name_the_template_units_directories():
    service = template_service()
    operations = " ".join((ROOT / "docs" / "operations.md").read_text().split())
    for setting, root in (("RuntimeDirectory", "/run/"), ("StateDirectory", "/var/lib/")):
        path = root + service[setting].replace("%i", "NAME")
        assert f"`{path}`" in operations, (setting, path)


# --- a configuration file every user may read ----------------------------------------------


SECRETS = [
    ({"database": {"url": "postgresql://attune:s3cret-pw@db.example.net/attune"}}, "database.url"),
    ({"database": {"url": "host=db.example.net dbname=attune password=s3cret-pw"}}, "database.url"),
    ({"database": {"url": "postgresql://attune@db.example.net/attune"},
      "security": {"jwt_secret": "s3cret-pw"}}, "security.jwt_secret"),
]


@pytest.mark.parametrize("data,key", SECRETS)
def test_a_secret_in_a_file_every_user_may_read_is_warned_about_not_refused(tmp_path, data, key):
    path = write_config(tmp_path, data)
    os.chmod(path, 0o644)
    result = run_cli("--config", path, "config")
    assert result.returncode == 0, result.stderr
    warning = result.stderr.strip().splitlines()
    assert len(warning) == 1 and "readable by every user" in warning[0] and key in warning[0], result.stderr
    assert f"chmod o-r {path}" in warning[0] and "s3cret-pw" not in result.stderr + result.stdout
    os.chmod(path, 0o640)
    assert run_cli("--config", path, "config").stderr == ""


def test_a_file_without_a_secret_is_not_warned_about(tmp_path):
    path = write_config(tmp_path, {"database": {"url": "postgresql://attune@db.example.net/attune"}})
    os.chmod(path, 0o644)
    assert run_cli("--config", path, "config").stderr == ""


def test_the_daemon_warns_once_at_start(spec_db_url, tmp_path, daemons):
    # the platform's secret key: the warning, and a database URL that still connects
    path = write_config(tmp_path, {"database": {"url": spec_db_url}, "security": {"jwt_secret": "s3cret-pw"},
                                   "sensor": {"worker_name": unique_name("rw-"), "heartbeat_interval": 0.5}})
    os.chmod(path, 0o644)
    daemon = daemons(path)
    daemon.wait_for_line("readable by every user", timeout=10)
    daemon.stop()
    assert sum("readable by every user" in line for line in daemon.lines) == 1


# --- messages that must say what is true ----------------------------------------------------


def migration_quotes():
    """The README's troubleshooting quotes for a database not migrated: each a list of the
    literal pieces between its "..."."""
    section = (ROOT / "README.md").read_text().split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    sentence = " ".join(section.split()).split("means migrations are missing")[0].rsplit("(the daemon keeps trying).", 1)[1]
    return [[p.strip(" '") for p in quote.split("...") if p.strip(" '")] for quote in re.findall(r"`([^`]+)`", sentence)]


def matches_a_quote(text):
    return any(all(piece in text for piece in quote) for quote in migration_quotes())


def test_an_unmigrated_database_says_what_the_readme_quotes(cluster, empty_db_url, attune_template, tmp_path):
    attune = attune_database(cluster, attune_template, migrate=False)
    for url in (empty_db_url, attune):
        path = config_for(tmp_path, url, unique_name("um-"))
        result = run_cli("--config", path, "run", timeout=60)
        assert result.returncode == 78, result.stderr
        assert matches_a_quote(result.stderr), (result.stderr, migration_quotes())


def test_the_cordon_advice_is_given_only_where_cordons_exist(db_url, tmp_path, daemons):
    name = unique_name("co-")
    daemon = daemons(config_for(tmp_path, db_url, name))
    daemon.wait_for_line("heartbeat: worker")
    query(db_url, "UPDATE worker SET status = 'inactive' WHERE name = %s", (name,))
    daemon.wait_for_line("it is active again since this daemon is alive")
    line = next(line for line in daemon.lines if "it is active again" in line)
    platform = bool(query(db_url, "SELECT 1 FROM information_schema.columns WHERE table_name = 'worker' "
                                  "AND column_name = 'cordoned'"))
    assert ("cordon it" in line) == platform, line


def test_metrics_name_only_roles_the_worker_table_has(db_url):
    result = cli(db_url, "metrics")
    assert result.returncode == 0, result.stderr
    roles = query(db_url, "SELECT e.enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid "
                          "JOIN pg_attribute a ON a.atttypid = t.oid JOIN pg_class c ON c.oid = a.attrelid "
                          "WHERE c.relname = 'worker' AND a.attname = 'worker_role'")
    roles = {r[0] for r in roles}
    shown = set(re.findall(r'^attune_sensor_workers_active\{role="([^"]+)"\}', result.stdout, re.M))
    assert shown and shown <= roles, (shown, roles)
