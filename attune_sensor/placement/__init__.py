"""The Attune platform's placement vocabulary, as a worker declares it: labels and taints.

Shaped like Kubernetes' and stored in capabilities exactly as the platform's own workers store
them: `labels` is a map of strings, `taints` a list of {key, value?, effect} with effect
`no_schedule` (the default) or `prefer_no_schedule`. A taint may be written in the short form
`key[=value][:effect]`. Pure functions: each returns the clean value or raises ValueError.
"""

import re

EFFECTS = ("no_schedule", "prefer_no_schedule")
DEFAULT_EFFECT = "no_schedule"
MAX_ENTRIES = 64
KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$")
# Values are free text for the platform; here: one line of visible characters, no surrounding
# blanks, so that what an operator types is what a selector matches.
VALUE_RE = re.compile(r"^[^\x00-\x20\x7f]([^\x00-\x1f\x7f]{0,251}[^\x00-\x20\x7f])?$")


def _show(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _scalar(value, what):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # zone: 1 in YAML
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {_show(value)}")
    return value


def label_key(value):
    value = _scalar(value, "a key")
    if not KEY_RE.fullmatch(value):
        raise ValueError(f"has an invalid key {_show(value)} (letters, digits, . _ / -, at most 63, "
                         "starting and ending with a letter or digit)")
    return value


def label_value(value, key):
    value = _scalar(value, f"the value of {key!r}")
    if not VALUE_RE.fullmatch(value):
        raise ValueError(f"has an invalid value {_show(value)} for {key!r} (1-253 visible characters, "
                         "no control characters, no surrounding blanks)")
    return value


def _collection(value, kind, what, expected):
    if not isinstance(value, kind):
        raise ValueError(f"must be {expected}, got {_show(value)}")
    if len(value) > MAX_ENTRIES:
        raise ValueError(f"has {len(value)} {what}; at most {MAX_ENTRIES}")


def labels(value):
    """A mapping of label keys to string values."""
    _collection(value, dict, "labels", "a mapping of label names to values")
    clean = {}
    for key, item in value.items():
        key = label_key(key)
        clean[key] = label_value(item, key)
    return dict(sorted(clean.items()))


def parse_taint(text):
    """`key[=value][:effect]` -> {key, value?, effect}."""
    text = _scalar(text, "a taint")
    head, effect = text, DEFAULT_EFFECT
    if ":" in text:
        head, effect = text.rsplit(":", 1)
    key, _, value = head.partition("=")
    return taint({"key": key, "value": value or None, "effect": effect})


def taint(value):
    if isinstance(value, str):
        return parse_taint(value)
    if not isinstance(value, dict):
        raise ValueError(f"each taint must be key[=value][:effect] or a mapping with key, value, effect; "
                         f"got {_show(value)}")
    unknown = sorted(set(value) - {"key", "value", "effect"})
    if unknown:
        raise ValueError(f"a taint has unknown field(s) {', '.join(map(str, unknown))} (known: key, value, effect)")
    if "key" not in value:
        raise ValueError("a taint needs a key")
    key = label_key(value["key"])
    clean = {"key": key}
    if value.get("value") is not None:
        clean["value"] = label_value(value["value"], key)
    effect = value.get("effect") or DEFAULT_EFFECT
    if effect not in EFFECTS:
        raise ValueError(f"taint {key!r} has effect {_show(effect)}; expected one of {', '.join(EFFECTS)}")
    clean["effect"] = effect
    return clean


def taints(value):
    """A list of taints, each a mapping or the short form."""
    _collection(value, list, "taints", "a list of taints (key[=value][:effect])")
    clean = [taint(item) for item in value]
    keys = [(t["key"], t["effect"]) for t in clean]
    if len(set(keys)) != len(keys):
        raise ValueError("names the same key and effect twice")
    return clean
