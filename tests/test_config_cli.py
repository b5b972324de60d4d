"""Configuration errors as an operator meets them: the real command, one line, exit 78."""

import os

import pytest
import yaml

from conftest import run_cli, write_config
from test_config import BAD, URL


@pytest.mark.parametrize("data,names,problem", BAD)
def test_bad_config_exits_78_with_one_line_naming_the_key(workdir, data, names, problem):
    path = write_config(workdir, data)
    result = run_cli("--config", path, "config")
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert names in lines[0] and problem in lines[0]
    assert "Traceback" not in result.stderr and "s3cret-pw" not in result.stderr


@pytest.mark.parametrize("env,names", [
    ({"ATTUNE__SENSOR__HEARTBEAT_INTERVAL": "soon"}, "ATTUNE__SENSOR__HEARTBEAT_INTERVAL"),
    ({"ATTUNE__SENSOR__HEARTBEAT_INTERVAL": "[1, 2"}, "ATTUNE__SENSOR__HEARTBEAT_INTERVAL"),
    ({"ATTUNE__SENSOR__NOPE": "1"}, "ATTUNE__SENSOR__NOPE"),
    ({"ATTUNE__NOPE": "1"}, "ATTUNE__NOPE"),
    ({"DATABASE_URL": "postgresql://u:pw@h:notaport/db"}, "DATABASE_URL"),
])
def test_bad_environment_exits_78_naming_the_variable(workdir, env, names):
    path = write_config(workdir, {"database": {"url": URL}})
    result = run_cli("--config", path, "config", env=env)
    assert result.returncode == 78, result.stdout
    assert names in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bad_runtimes_variable_stops_run_with_78(workdir):
    path = write_config(workdir, {"database": {"url": URL}})
    result = run_cli("--config", path, "run", env={"ATTUNE_SENSOR_RUNTIMES": "python,no way"})
    assert result.returncode == 78
    assert "ATTUNE_SENSOR_RUNTIMES" in result.stderr and "Traceback" not in result.stderr


def test_missing_and_unreadable_files(workdir):
    result = run_cli("--config", os.path.join(workdir, "absent.yaml"), "config")
    assert result.returncode == 78 and "not found" in result.stderr
    result = run_cli("config", env={"ATTUNE_CONFIG": workdir})
    assert result.returncode == 78 and "is a directory" in result.stderr


def test_config_command_masks_the_password(workdir):
    for url in (URL, "host=db.example.net user=attune password=s3cret-pw dbname=attune",
                "postgresql://attune@db.example.net/attune?password=s3cret-pw"):
        result = run_cli("--config", write_config(workdir, {"database": {"url": url}}), "config")
        assert result.returncode == 0, result.stderr
        assert "s3cret-pw" not in result.stdout and "***" in result.stdout
        shown = yaml.safe_load(result.stdout)
        assert shown["sensor"]["heartbeat_interval"] == 30
