"""Static checks of the shipped units (the package test runs them under a real systemd)."""

import configparser
import subprocess
from pathlib import Path

import pytest

from attune_sensor import __version__, config
from attune_sensor.worker import notify
from attune_sensor.db import schema
from attune_sensor.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
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
    assert max(schema.DEFAULT_RECORDED_INTERVAL, schema.PLATFORM_DEFAULT_INTERVAL) <= watchdog / 2
    # a longer interval moves the watchdog (WATCHDOG_USEC=), which systemd takes from the main process only
    assert notify.WATCHDOG_MULTIPLE * schema.DEFAULT_RECORDED_INTERVAL <= watchdog


def test_the_units_differ_only_in_their_instance_lines():
    # Two units, one hardening: a change made to one of them only fails here (docs/design.md,
    # "Two unit files").
    plain, template = (u.read_text().splitlines() for u in UNITS)
    assert len(plain) == len(template)
    assert [(p, t) for p, t in zip(plain, template) if p != t and "%i" not in t] == []


ARMED = {"WATCHDOG_USEC": "90000000", "NOTIFY_SOCKET": "/run/systemd/notify"}


def test_the_watchdog_follows_the_interval_and_never_goes_below_the_units():
    assert notify.watchdog_for(60, ARMED) == 180_000_000  # 3 x 60 s
    assert notify.watchdog_for(10, ARMED) == 90_000_000  # the unit's WatchdogSec is the floor
    assert notify.watchdog_for(0.5, dict(ARMED, WATCHDOG_USEC="8000000")) == 8_000_000
    assert notify.watchdog_for(60, {"NOTIFY_SOCKET": "/x"}) is None  # WatchdogSec=0: not ours to arm
    assert notify.watchdog_for(60, dict(ARMED, WATCHDOG_PID="1")) is None  # armed for another process


def test_an_interval_over_half_the_watchdog_is_refused_only_when_the_watchdog_cannot_move():
    notify.check_watchdog_fits(60, ARMED)  # under systemd: the daemon moves it instead
    with pytest.raises(ConfigError, match="at most 45s"):
        notify.check_watchdog_fits(60, {"WATCHDOG_USEC": "90000000"})


class Table:
    def __init__(self, platform):
        self.is_platform = platform


def test_on_the_platform_only_the_executors_90s_rule_refuses_and_healthy_workers_warns(caplog):
    platform = Table(True)
    assert schema.choose_interval(None, platform, 5) == 10
    with caplog.at_level("WARNING"):
        assert schema.choose_interval(10, platform, 5) == 10
        assert not caplog.records
        assert schema.choose_interval(60, platform, 5) == 60  # the seed's ATTUNE__SENSOR__HEARTBEAT_INTERVAL
        assert schema.choose_interval(30, platform, 5) == 30  # the spec's own value
    assert len(caplog.records) == 2 and all("healthy_workers" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="90s stale rule.*at most 84s"):
        schema.choose_interval(85, platform, 5)
    assert schema.choose_interval(600, Table(False), 5) == 600  # the spec's table has no such rule


def test_the_reported_version_is_the_packages():
    # the package's build writes debian/changelog's version into the installed copy (debian/rules)
    top = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    assert top.split("(", 1)[1].split(")", 1)[0] == __version__
    assert """sed -i 's/^__version__ = .*/__version__ = "$(DEB_VERSION)"/'""" in (ROOT / "debian" / "rules").read_text()


def test_the_package_conflicts_with_the_platforms_all_in_one_package_and_ships_the_operator_docs():
    control = (ROOT / "debian" / "control").read_text()
    assert "\nConflicts: attune\n" in control and "\nReplaces:" not in control
    docs = (ROOT / "debian" / "attune-sensor.docs").read_text().split()
    assert {"README.md", "docs/operations.md", "docs/scheduling.md", "docs/performance.md"} <= set(docs)
