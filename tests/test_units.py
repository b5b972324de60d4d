"""Static checks of the shipped units (the package test runs them under a real systemd)."""

import configparser
import subprocess
from pathlib import Path

import pytest

from attune_sensor import config, schema

UNITS = sorted((Path(__file__).resolve().parent.parent / "systemd").glob("*.service"))


def read_unit(path):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(path)
    return parser


def test_both_units_exist():
    assert [u.name for u in UNITS] == ["attune-sensor.service", "attune-sensor@.service"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_hardening_scores_2_or_lower(unit):
    # --threshold is the exposure level times ten; the command fails above it
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=20", str(unit)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert result.returncode == 0, result.stdout[-600:]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_the_watchdog_fits_the_default_heartbeat(unit):
    service = read_unit(unit)["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["RestartPreventExitStatus"] == "78" and service["Restart"] == "on-failure"
    watchdog = float(service["WatchdogSec"].rstrip("s"))
    # unset ("auto") means 30 s on the spec's schema and 10 s on the platform's
    assert config.SensorConfig.__dataclass_fields__["heartbeat_interval"].default is None
    assert max(schema.DEFAULT_RECORDED_INTERVAL, schema.PLATFORM_DEFAULT_INTERVAL) <= watchdog / 2  # the daemon's own start-up check (notify.check_watchdog_fits)


def test_the_units_differ_only_in_their_instance_lines():
    # Two units, one hardening: a change made to one of them only fails here (docs/design.md,
    # "Two unit files").
    plain, template = (u.read_text().splitlines() for u in UNITS)
    assert len(plain) == len(template)
    assert [(p, t) for p, t in zip(plain, template) if p != t and "%i" not in t] == []
