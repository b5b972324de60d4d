"""The Attune platform's placement rules as its `sensor` rows declare them, read as the platform
reads them (crates/common/src/scheduling.rs, runtime_detection.rs and version_matching.rs of
AndroxxTraxxon/attune at 9206d41; docs/design.md, "The platform's sensors"). Pure functions.

- `worker_selector`: an object of non-blank string labels; JSON null is no selector.
- `worker_tolerations`: a list of {key, operator equal|exists (default equal), value?, effect?};
  every toleration names a key (the platform never tolerates every taint at once).
- `worker_affinity`: {required, preferred: [{weight 1-100 (default 1), preference}],
  anti_affinity}, each term {match_labels, match_expressions: [{key, operator in|not_in|exists|
  does_not_exist, values}]}.

A value the platform cannot parse counts, as there, as its default: no selector, no toleration,
no affinity (`Sensor::worker_selector_labels` and its siblings fall back with
`unwrap_or_default`). The callers say so in a warning, since that default may run a sensor more
widely than its author meant.

`runtime_version_constraint` is the platform's lenient semver: "3.12" means ~3.12, ">=3.12,<4.0"
is an AND, a leading v is dropped, missing parts are zero. A sensor with a constraint may run
only where a registered, available version of its runtime matches it and the worker has that
version (same major.minor as one it advertises), or advertises none for the runtime.
"""

import re

# runtime_detection::normalize_runtime_name
_RUNTIME_NAMES = {"node": "node", "nodejs": "node", "node.js": "node", "python": "python", "python3": "python",
                  "shell": "shell", "bash": "shell", "sh": "shell", "native": "native", "builtin": "native",
                  "standalone": "native", "ruby": "ruby", "rb": "ruby", "go": "go", "golang": "go", "java": "java",
                  "jdk": "java", "openjdk": "java", "perl": "perl", "perl5": "perl", "r": "r", "rscript": "r"}
# The kinds a worker runs sensors of, first: the one a runtime row is placed by when its name and
# aliases name more than one.
_KINDS_FIRST = ("python", "node", "shell", "native")
EXPRESSION_OPERATORS = ("in", "not_in", "exists", "does_not_exist")
EFFECTS = ("no_schedule", "prefer_no_schedule")


# What Rust's str::trim takes away (char::is_whitespace: Unicode's White_Space), not Python's
# str.strip, which also drops the separators U+001C-U+001F.
WHITE_SPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
               "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


def trim(text):
    return text.strip(WHITE_SPACE)


class RuleError(ValueError):
    """The platform would refuse this value; str() says which part and why."""


def normalize_runtime_name(name):
    text = trim(name).lower()
    return _RUNTIME_NAMES.get(text, text)


def runtime_names(name, aliases):
    """The normalised names a runtime row answers to (its aliases and its name), in order."""
    names = []
    for item in list(aliases or []) + [name]:
        if isinstance(item, str) and trim(item):
            normal = normalize_runtime_name(item)
            if normal not in names:
                names.append(normal)
    return names


def runtime_kind(names):
    """The one runtime name a sensor of this runtime is placed by: a worker offers it."""
    for kind in _KINDS_FIRST:
        if kind in names:
            return kind
    return names[-1] if names else None  # the name's own normal form


# --- placement values -----------------------------------------------------------------------


def _string(value, what):
    if not isinstance(value, str):
        raise RuleError(f"{what} must be a string")
    return value


def _key(value, what):
    if not trim(_string(value, what)):
        raise RuleError(f"{what} must be non-empty")
    return value


def _label_map(value, what):
    if not isinstance(value, dict):
        raise RuleError(f"{what} must be an object of string labels")
    for key, item in value.items():
        _key(key, f"{what} key")
        if not trim(_string(item, f"{what}[{key!r}]")):
            raise RuleError(f"{what}[{key!r}] must be a non-empty string")
    return dict(value)


def _list(value, what):
    if not isinstance(value, list):
        raise RuleError(f"{what} must be a list")
    return value


def _object(value, what):
    if not isinstance(value, dict):
        raise RuleError(f"{what} must be an object")
    return value


def parse_selector(value):
    """worker_selector -> {label: value} (scheduling::parse_worker_selector)."""
    return {} if value is None else _label_map(value, "worker_selector")


def parse_tolerations(value):
    """worker_tolerations -> [{key, operator, value?, effect?}] (parse_worker_tolerations)."""
    if value is None:
        return []
    clean = []
    for item in _list(value, "worker_tolerations"):
        item = _object(item, "each of worker_tolerations")
        if "key" not in item:
            raise RuleError("worker_tolerations: a toleration needs a key")
        key = _key(item["key"], "worker_tolerations key")
        operator = item.get("operator", "equal")
        if operator not in ("equal", "exists"):
            raise RuleError(f"worker_tolerations {key!r}: operator must be equal or exists")
        toleration = {"key": key, "operator": operator}
        if item.get("value") is not None:
            toleration["value"] = _string(item["value"], f"worker_tolerations {key!r} value")
            if operator == "equal" and not trim(toleration["value"]):
                raise RuleError(f"worker_tolerations {key!r} value must be non-empty when provided")
        if item.get("effect") is not None:
            if item["effect"] not in EFFECTS:
                raise RuleError(f"worker_tolerations {key!r}: effect must be no_schedule or prefer_no_schedule")
            toleration["effect"] = item["effect"]
        clean.append(toleration)
    return clean


def _term(value, what):
    value = _object(value, what)
    term = {"match_labels": _label_map(value.get("match_labels", {}), f"{what} match_labels"),
            "match_expressions": []}
    for expression in _list(value.get("match_expressions", []), f"{what} match_expressions"):
        expression = _object(expression, f"{what} match_expressions entry")
        if "key" not in expression or "operator" not in expression:
            raise RuleError(f"{what}: an expression needs a key and an operator")
        key = _key(expression["key"], f"{what} match_expressions key")
        operator = expression["operator"]
        if operator not in EXPRESSION_OPERATORS:
            raise RuleError(f"{what} expression {key!r}: operator must be one of {', '.join(EXPRESSION_OPERATORS)}")
        values = _list(expression.get("values", []), f"{what} expression {key!r} values")
        for item in values:
            _string(item, f"{what} expression {key!r} value")
        if operator in ("in", "not_in"):
            if not values:
                raise RuleError(f"{what} expression {key!r} requires at least one value")
            if any(not trim(item) for item in values):
                raise RuleError(f"{what} expression {key!r} values must be non-empty")
        elif values:
            raise RuleError(f"{what} expression {key!r} must not set values with {operator}")
        term["match_expressions"].append({"key": key, "operator": operator, "values": list(values)})
    return term


def parse_affinity(value):
    """worker_affinity -> {required, preferred, anti_affinity} with every list present, or {}
    when all three are empty (parse_worker_affinity)."""
    if value is None:
        return {}
    value = _object(value, "worker_affinity")
    affinity = {"required": [_term(t, "worker_affinity required term")
                             for t in _list(value.get("required", []), "worker_affinity required")],
                "anti_affinity": [_term(t, "worker_affinity anti_affinity term")
                                  for t in _list(value.get("anti_affinity", []), "worker_affinity anti_affinity")],
                "preferred": []}
    for item in _list(value.get("preferred", []), "worker_affinity preferred"):
        item = _object(item, "worker_affinity preferred entry")
        weight = item.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or not -2**31 <= weight < 2**31:
            raise RuleError("worker_affinity preferred weight must be a whole number")
        if "preference" not in item:
            raise RuleError("worker_affinity preferred entry needs a preference")
        affinity["preferred"].append({"weight": weight,
                                      "preference": _term(item["preference"], "worker_affinity preference")})
    if any(not 1 <= p["weight"] <= 100 for p in affinity["preferred"]):
        raise RuleError("worker_affinity preferred weights must be between 1 and 100")
    return affinity if any(affinity.values()) else {}


# --- the platform's lenient semver --------------------------------------------------------------

_SEMVER_RE = re.compile(r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
                        r"(?:-((?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
                        r"(?:\.(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*))*))?"
                        r"(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$")
# semver's comparator version: major, then minor and patch each a number or a wildcard (*, x, X:
# missing), a pre-release only after a numeric patch
_PARTIAL_RE = re.compile(r"^(0|[1-9][0-9]*)(?:\.(0|[1-9][0-9]*|[*xX])(?:\.(0|[1-9][0-9]*|[*xX])"
                         r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?)?)?$")
_OPERATORS = ("=", ">", ">=", "<", "<=", "~", "^")


class Version(tuple):
    """(major, minor, patch, pre) ordered as semver orders them: a pre-release sorts before its
    release, its identifiers numeric before alphanumeric."""

    def __new__(cls, major, minor, patch, pre=()):
        return super().__new__(cls, (major, minor, patch, tuple(pre)))

    @property
    def release(self):
        return self[:3]

    def _key(self):
        pre = self[3]
        ids = tuple((0, int(p), "") if p.isascii() and p.isdigit() else (1, 0, p) for p in pre)
        return self.release + ((1,) if not pre else (0,) + ids)

    def __lt__(self, other):
        return self._key() < other._key()

    def __le__(self, other):
        return self._key() <= other._key()

    def __gt__(self, other):
        return self._key() > other._key()

    def __ge__(self, other):
        return self._key() >= other._key()


def _strict(text):
    match = _SEMVER_RE.match(text)
    if not match:
        return None
    major, minor, patch, pre = match.groups()
    return Version(int(major), int(minor), int(patch), pre.split(".") if pre else ())


def parse_version(text):
    """version_matching::parse_version: "3.12" is 3.12.0, "v3" is 3.0.0. None when it is no version."""
    trimmed = trim(text)
    stripped = trimmed[1:] if trimmed[:1] in ("v", "V") else trimmed
    version = _strict(stripped)
    if version is not None:
        return version
    parts = stripped.split(".")
    padded = {1: f"{stripped}.0.0", 2: f"{stripped}.0"}.get(len(parts), ".".join(parts[:3]))
    return _strict(padded)


def version_key(text):
    """What the platform compares a worker's version with a registered one by: major.minor."""
    version = parse_version(text) if isinstance(text, str) else None
    return None if version is None else f"{version[0]}.{version[1]}"


def _comparators(part):
    """One comma-separated part of a constraint, preprocessed as parse_constraint does, ->
    [(op, major, minor|None, patch|None, pre)]."""
    p = trim(part)
    digits = "0123456789"
    if p[:1] and p[0] in digits + "vV":
        stripped = p[1:] if p[:1] in ("v", "V") else p
        op, ver = "~", (stripped if "." in stripped else f"{stripped}.0")
    else:
        start = next((i for i, c in enumerate(p) if c in digits), len(p))
        op, ver = p[:start].strip(), p[start:]
        ver = ver[1:] if ver[:1] in ("v", "V") else ver
        dots = ver.count(".")
        ver = f"{ver}.0.0" if dots == 0 and ver else f"{ver}.0" if dots == 1 else ver
    if op in ("*", "x", "X") and not ver:
        return []
    op = op or "^"
    match = _PARTIAL_RE.match(ver)
    if op not in _OPERATORS or not match:
        raise RuleError(f"invalid runtime_version_constraint part {trim(part)!r}")
    major, minor, patch, pre = match.groups()
    minor = None if minor is None or minor in "*xX" else int(minor)
    patch = None if minor is None or patch is None or patch in "*xX" else int(patch)
    if pre and patch is None:
        raise RuleError(f"invalid runtime_version_constraint part {trim(part)!r}")
    return [(op, int(major), minor, patch, tuple(pre.split(".")) if pre else ())]


def parse_constraint(text):
    """[comparator] for a constraint; [] matches every release."""
    comparators = []
    for part in text.split(","):
        if part.strip():
            comparators += _comparators(part)
    return comparators


def _matches_one(op, major, minor, patch, pre, v):
    """One comparator, as semver::Comparator::matches (a missing minor or patch: any)."""
    low = Version(major, minor or 0, patch or 0, pre)
    if minor is not None and patch is not None and op in ("=", ">", ">=", "<", "<="):
        return {"=": v == low, ">": v > low, ">=": v >= low, "<": v < low, "<=": v <= low}[op]
    # the first version past the partial one: 3 -> 4.0.0, 3.12 -> 3.13.0
    past = Version(major + 1, 0, 0) if minor is None else Version(major, minor + 1, 0)
    if op == "=":
        return low <= v < past
    if op == ">":
        return v >= past
    if op == ">=":
        return v >= low
    if op == "<":
        return v < low
    if op == "<=":
        return v < past
    if op == "~":
        high = (major + 1, 0, 0) if minor is None else (major, minor + 1, 0)
    elif major > 0 or minor is None:  # "^"
        high = (major + 1, 0, 0)
    elif minor > 0 or patch is None:
        high = (0, minor + 1, 0)
    else:
        high = (0, 0, patch + 1)
    return low <= v < Version(*high)


def matches(version, comparators):
    """semver::VersionReq::matches: every comparator holds, and a pre-release version only where
    a comparator names a pre-release of the same major.minor.patch."""
    if not all(_matches_one(*c, version) for c in comparators):
        return False
    return not version[3] or any(c[4] and (c[1], c[2] or 0, c[3] or 0) == version.release for c in comparators)


def versions_for(constraint, registered):
    """The major.minor keys of the registered, available versions that satisfy `constraint`
    (a runtime_version_constraint), sorted; None when there is no constraint (any version).
    Raises RuleError when no version could ever satisfy it here (the platform refuses to start
    such a sensor anywhere)."""
    if constraint is None:
        return None
    if not registered:
        raise RuleError(f"declares runtime_version_constraint {constraint!r} but its runtime has no registered "
                        "versions")
    # blank is still a constraint to the platform (it tests is_some()): any registered version
    comparators = parse_constraint(constraint) if trim(constraint) else []
    keys = set()
    for text in registered:
        version = parse_version(text)
        if version is not None and matches(version, comparators):
            keys.add(f"{version[0]}.{version[1]}")
    if not keys:
        raise RuleError(f"no available version of its runtime matches runtime_version_constraint {constraint!r}")
    return sorted(keys, key=lambda k: tuple(int(x) for x in k.split(".")))
