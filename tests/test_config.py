"""Configuration: precedence, typing, and a one-line error with exit 78 for every bad input."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attune_sensor import config
from attune_sensor.errors import ConfigError
from support import URL, write_config


def load(tmp_path, data, env=None):
    return config.load(write_config(tmp_path, data), environ=env or {})


def test_defaults_follow_the_spec(tmp_path):
    cfg = load(tmp_path, {"database": {"url": URL}})
    import socket

    assert cfg.sensor.worker_name == f"sensor-{socket.gethostname()}"
    assert cfg.sensor.host == socket.gethostname()
    # heartbeat_interval None is "auto": 30 s on the spec's schema, 10 s on the platform's (test_attune.py)
    assert (cfg.sensor.heartbeat_interval, cfg.sensor.poll_interval, cfg.sensor.sensor_timeout) == (None, 30, 30)
    assert cfg.sensor.max_concurrent_sensors == 10
    assert cfg.sensor.runtimes == ()
    assert (cfg.log.level, cfg.log.format) == ("info", "text")


def test_the_spec_example_file_loads(tmp_path):
    cfg = load(tmp_path, {"database": {"url": URL}, "sensor": {
        "worker_name": "sensor-production-01", "host": "10.0.1.42", "heartbeat_interval": 30,
        "poll_interval": 30, "sensor_timeout": 30, "max_concurrent_sensors": 10,
        "capabilities": {"runtimes": ["python", "shell", "node"], "custom_feature": True}}})
    assert cfg.sensor.worker_name == "sensor-production-01"
    assert cfg.sensor.runtimes == ("python", "shell", "node")
    assert cfg.sensor.capabilities == {"custom_feature": True}


def test_environment_overrides_are_typed_like_the_file(tmp_path):
    cfg = load(tmp_path, {"database": {"url": URL}, "sensor": {"heartbeat_interval": 10}},
               env={"ATTUNE__SENSOR__HEARTBEAT_INTERVAL": "60", "ATTUNE__SENSOR__WORKER_NAME": "sensor-custom",
                    "ATTUNE__LOG__FORMAT": "json", "ATTUNE__SENSOR__REAPER": "false"})
    assert cfg.sensor.heartbeat_interval == 60 and isinstance(cfg.sensor.heartbeat_interval, int)
    assert cfg.sensor.worker_name == "sensor-custom"
    assert cfg.log.format == "json"
    assert cfg.sensor.reaper is False


def test_database_url_precedence(tmp_path):
    file_only = load(tmp_path, {"database": {"url": URL}})
    assert file_only.database.url == URL
    nested = load(tmp_path, {"database": {"url": URL}}, env={"ATTUNE__DATABASE__URL": "postgresql://a@b/c"})
    assert nested.database.url == "postgresql://a@b/c"
    top = load(tmp_path, {"database": {"url": URL}},
               env={"ATTUNE__DATABASE__URL": "postgresql://a@b/c", "DATABASE_URL": "host=x dbname=y"})
    assert top.database.url == "host=x dbname=y"


def test_default_file_may_be_absent_when_the_environment_has_the_url(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", os.path.join(tmp_path, "absent.yaml"))
    assert config.load(None, environ={"DATABASE_URL": URL}).database.url == URL
    with pytest.raises(ConfigError, match="absent.yaml: not found"):
        config.load(None, environ={})
    # a file named explicitly must exist, whatever the environment holds
    with pytest.raises(ConfigError, match="not found"):
        config.load(os.path.join(tmp_path, "named.yaml"), environ={"DATABASE_URL": URL})


@settings(max_examples=60, deadline=None)
@given(value=st.one_of(st.text(max_size=50), st.integers(), st.floats(allow_nan=True), st.booleans(),
                       st.lists(st.integers(), max_size=3), st.none()),
       key=st.sampled_from(["heartbeat_interval", "poll_interval", "sensor_timeout", "max_concurrent_sensors",
                            "worker_name", "host", "worker_type", "stale_multiplier", "reaper"]))
def test_any_value_either_loads_or_gives_a_config_error(tmp_path_factory, key, value):
    tmp_path = tmp_path_factory.mktemp("prop")
    path = write_config(tmp_path, {"database": {"url": URL}, "sensor": {key: value}})
    try:
        cfg = config.load(path, environ={})
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and f"sensor.{key}" in message
        return
    # What `attune-sensor config` prints of an accepted value loads back to the same settings.
    shown = config.describe(cfg)
    shown["database"]["url"] = URL  # describe() masks the password
    again = config.load(write_config(tmp_path, shown), environ={})
    assert again.sensor == cfg.sensor and again.log == cfg.log and again.database == cfg.database


@settings(max_examples=80, deadline=None)
@given(raw=st.text(st.characters(blacklist_characters="\x00"), max_size=40),  # the kernel forbids NUL in env
       key=st.sampled_from(["HEARTBEAT_INTERVAL", "MAX_CONCURRENT_SENSORS", "WORKER_NAME", "REAPER", "HOST"]))
def test_any_environment_value_either_loads_or_names_the_variable(raw, key):
    name = f"ATTUNE__SENSOR__{key}"
    try:
        config.load(None, environ={"DATABASE_URL": URL, "ATTUNE_CONFIG": "/dev/null", name: raw})
    except ConfigError as exc:
        assert name in str(exc) and "\n" not in str(exc)
