"""The platform's placement vocabulary as workers declare it (pure functions)."""

import pytest

from attune_sensor import placement


def test_short_and_long_taint_forms_mean_the_same():
    assert placement.taints(["gpu=nvidia:prefer_no_schedule", "spot", {"key": "zone", "value": "eu"}]) == [
        {"key": "gpu", "value": "nvidia", "effect": "prefer_no_schedule"},
        {"key": "spot", "effect": "no_schedule"},
        {"key": "zone", "value": "eu", "effect": "no_schedule"},
    ]


def test_labels_are_sorted_strings():
    assert placement.labels({"zone": "eu-west", "rack": 7}) == {"rack": "7", "zone": "eu-west"}


@pytest.mark.parametrize("value, message", [
    ({"zone": "eu\n"}, "invalid value"),
    ({"bad key": "x"}, "invalid key"),
    ({"zone": ""}, "invalid value"),
    ({f"k{n}": "v" for n in range(65)}, "at most 64"),
    ("zone=eu", "must be a mapping"),
])
def test_bad_labels_are_named(value, message):
    with pytest.raises(ValueError, match=message):
        placement.labels(value)


@pytest.mark.parametrize("value, message", [
    (["gpu:never"], "expected one of"),
    (["gpu", "gpu:no_schedule"], "twice"),
    ([{"key": "gpu", "colour": "red"}], "unknown field"),
    ([{"value": "x"}], "needs a key"),
    ("gpu", "must be a list"),
])
def test_bad_taints_are_named(value, message):
    with pytest.raises(ValueError, match=message):
        placement.taints(value)


def test_config_takes_labels_and_taints_from_file_and_environment(tmp_path):
    from attune_sensor import config
    from attune_sensor.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("database: {url: 'postgresql://a@b/c'}\nsensor: {labels: {zone: eu-west}}\n")
    cfg = config.load(str(path), {"ATTUNE__SENSOR__TAINTS": "gpu=nvidia:no_schedule, spot:prefer_no_schedule"})
    assert cfg.sensor.labels == {"zone": "eu-west"}
    assert [t["key"] for t in cfg.sensor.taints] == ["gpu", "spot"]
    path.write_text("database: {url: 'postgresql://a@b/c'}\nsensor: {capabilities: {labels: {zone: x}}}\n")
    with pytest.raises(ConfigError, match="sensor.labels"):
        config.load(str(path), {})
