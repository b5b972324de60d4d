"""Configuration: the YAML file, the environment, defaults and validation, as one frozen result.

Precedence, highest first:
  1. DATABASE_URL (for database.url only)
  2. ATTUNE__<SECTION>__<KEY> environment variables, parsed as YAML scalars ("60" -> 60)
  3. the YAML file (--config, else $ATTUNE_CONFIG, else /etc/attune/config.yaml)
  4. built-in defaults
ATTUNE_SENSOR_RUNTIMES overrides runtime detection (runtimes.py); it is validated here too, so
`attune-sensor config` and `run` give the same answer for the same environment.

Every error is a ConfigError whose message names the key (or the variable) and the problem on
one line. Values of database.url are never echoed: they may hold a password.
"""

import math
import os
import re
import socket
from dataclasses import MISSING, dataclass, field, fields, replace

from .dsn import redact_dsn
from .errors import ConfigError, DatabaseUrlMissing

DEFAULT_CONFIG_PATH = "/etc/attune/config.yaml"
ENV_PREFIX = "ATTUNE__"

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
WORKER_TYPES = ("auto", "local", "remote", "container")  # auto: container when inside one, else local

# Worker names land in SQL parameters (never in SQL text), the journal and dashboards: keep them
# to characters that need no quoting anywhere. 128 is well past any hostname-based name.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")
HOST_RE = re.compile(r"^[A-Za-z0-9._:%\[\]-]{1,255}$")
# JSON-serialisable capability values, kept small: they are rewritten on every registration.
MAX_CAPABILITIES_BYTES = 16 * 1024
MIN_HEARTBEAT_INTERVAL = 0.1


# --- value checkers: each returns the clean value or raises ValueError(reason) ---------------


def _describe(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _positive_number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a positive number of seconds, got {_describe(value)}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be greater than 0, got {_describe(value)}")
    if value > 86400:
        raise ValueError(f"must be at most 86400 seconds, got {_describe(value)}")
    return value


def _heartbeat_interval(value):
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    value = _positive_number(value)
    # Below this a daemon turns into a load generator (one heartbeat is one write).
    if value < MIN_HEARTBEAT_INTERVAL:
        raise ValueError(f"must be at least {MIN_HEARTBEAT_INTERVAL:g} seconds (or auto), got {_describe(value)}")
    return value


def _schema_name(value):
    from .schema import check_schema_name

    if isinstance(value, str) and value.strip().lower() == "auto":
        return None  # find it: the connection's search_path, then schema "attune"
    return check_schema_name(value)


def _positive_int(value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be a whole number, got {_describe(value)}")
    if value < 1 or value > 1_000_000:
        raise ValueError(f"must be between 1 and 1000000, got {_describe(value)}")
    return value


def _multiplier(value):
    value = _positive_number(value)
    if value < 1.5:
        raise ValueError(f"must be at least 1.5 so one late heartbeat is not fatal, got {value}")
    return value


def _boolean(value):
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {_describe(value)}")
    return value


def _choice(choices):
    def check(value):
        if not isinstance(value, str) or value.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {_describe(value)}")
        return value.lower()

    return check


def _matching(regex, what):
    def check(value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # a bare number in YAML, e.g. worker_name: 42
        if not isinstance(value, str) or not regex.fullmatch(value):
            raise ValueError(f"must be {what}, got {_describe(value)}")
        return value

    return check


def _database_url(value):
    # Never echo the value: it may contain a password.
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a PostgreSQL URL (postgresql://user@host/db) or key=value DSN")
    value = value.strip()
    if len(value) > 4096:
        raise ValueError("is longer than 4096 characters")
    if any(ord(c) < 32 for c in value):
        raise ValueError("contains control characters")
    if "://" in value:
        scheme = value.split("://", 1)[0]
        if scheme not in ("postgresql", "postgres"):
            raise ValueError(f"has scheme {scheme!r}; expected postgresql:// or postgres://")
    elif "=" not in value:
        raise ValueError("is neither a postgresql:// URL nor a key=value DSN")
    from .dsn import parse_dsn  # libpq's own parser: pure, no network

    try:
        parts = parse_dsn(value)
    except ValueError as exc:
        raise ValueError(f"is malformed ({exc})") from None
    for port in filter(None, parts.get("port", "").split(",")):
        if not port.isdigit() or not 0 < int(port) < 65536:
            # never echoed: an unencoded / in a password makes libpq read part of it as the port
            raise ValueError("has an invalid port (a password with / @ : must be percent-encoded)")
    return value


def _capabilities(value):
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping of capability names to values, got {_describe(value)}")
    import json

    for key in value:
        if not isinstance(key, str) or not NAME_RE.fullmatch(key):
            raise ValueError(f"has an invalid key {_describe(key)}")
        if key in RESERVED_CAPABILITIES:
            raise ValueError(f"may not set {key!r}: it comes from {RESERVED_CAPABILITIES[key]}")
    try:
        encoded = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"must hold only JSON values (strings, numbers, lists, maps): {exc}") from None
    if len(encoded) > MAX_CAPABILITIES_BYTES:
        raise ValueError(f"is {len(encoded)} bytes as JSON; at most {MAX_CAPABILITIES_BYTES}")
    return value


# Capabilities attune-sensor writes itself from other settings or from detection.
RESERVED_CAPABILITIES = {"labels": "sensor.labels", "taints": "sensor.taints",
                         "runtime_versions": "detection", "detected_interpreters": "detection"}


def _assignments_file(value):
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be an absolute path, auto or none, got {_describe(value)}")
    if value.strip().lower() in ("auto", "none"):
        return value.strip().lower()
    if not value.startswith("/") or len(value) > 4096 or any(ord(c) < 32 for c in value):
        raise ValueError(f"must be an absolute path without control characters, got {_describe(value)}")
    return value


def _absolute_dir(value):
    if not isinstance(value, str) or not value.startswith("/") or len(value) > 4096 \
            or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"must be an absolute directory path without control characters, got {_describe(value)}")
    return os.path.normpath(value)


def _optional_url(schemes):
    def check(value):
        if value is None or (isinstance(value, str) and not value.strip()):
            return ""
        if not isinstance(value, str) or len(value) > 4096 or any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("must be a URL on one line, at most 4096 characters")
        if value.split("://", 1)[0].lower() not in schemes or "://" not in value:
            raise ValueError(f"must start with {' or '.join(s + '://' for s in schemes)}")
        return value.strip()

    return check


def _token_file(value):
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be an absolute path, auto or none, got {_describe(value)}")
    if value.strip().lower() in ("auto", "none"):
        return value.strip().lower()
    return _absolute_dir(value)


def _exchange(value):
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9._:-]{1,255}", value):
        raise ValueError(f"must be an exchange name (letters, digits, . _ : -), got {_describe(value)}")
    return value


def _runtimes_exec(value):
    """{runtime: absolute path of the interpreter}, e.g. {python: /opt/venv/bin/python3}."""
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping of runtime names to interpreter paths, got {_describe(value)}")
    if len(value) > 32:
        raise ValueError(f"has {len(value)} entries; at most 32")
    from .runtimes import normalise

    clean = {}
    for runtime, path in value.items():
        names = normalise([runtime]) if isinstance(runtime, str) else None
        if not names:
            raise ValueError(f"has an invalid runtime name {_describe(runtime)}")
        try:
            clean[names[0]] = _absolute_dir(path)
        except ValueError:
            raise ValueError(f"{names[0]}: must be the absolute path of an interpreter, got {_describe(path)}") from None
    return clean


def _labels(value):
    from . import placement

    return placement.labels(value)


def _taints(value):
    from . import placement

    if isinstance(value, str):  # ATTUNE__SENSOR__TAINTS="gpu:no_schedule,zone=eu"
        value = [item.strip() for item in value.split(",") if item.strip()]
    return tuple(placement.taints(value))


def _runtime_list(value):
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list):
        raise ValueError(f"must be a list of runtime names, got {_describe(value)}")
    from .runtimes import normalise

    return tuple(normalise(value))


# --- the keys: each declared once, as a dataclass field carrying its checker -----------------


def _as_is(value):
    return value


def _auto_if_none(value):
    return "auto" if value is None else value


def setting(check, default=MISSING, *, factory=None, show=_as_is):
    """One config key: its default, the checker that cleans a raw value from the file or the
    environment (SCHEMA is derived from these), and how `attune-sensor config` shows it
    (describe). A field declared without `setting` is derived, never read from input."""
    metadata = {"check": check, "show": show}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = setting(_database_url, show=redact_dsn)
    connect_timeout: float = setting(_positive_number, 5.0)
    statement_timeout: float = setting(_positive_number, 5.0)
    # None ("auto"): the connection's search_path, then the platform's schema "attune"
    schema: str = setting(_schema_name, None, show=_auto_if_none)


@dataclass(frozen=True)
class LogConfig:
    level: str = setting(_choice(LOG_LEVELS), "info")
    format: str = setting(_choice(LOG_FORMATS), "text")


@dataclass(frozen=True)
class SensorConfig:
    worker_name: str = setting(_matching(NAME_RE, "1-128 letters, digits or . _ @ : - (starting with a letter or digit)"))
    host: str = setting(_matching(HOST_RE, "a hostname or IP address"))
    worker_type: str = setting(_choice(WORKER_TYPES), "auto")
    # None ("auto"): 30 s, or 10 s on the Attune platform's schema
    heartbeat_interval: float = setting(_heartbeat_interval, None, show=_auto_if_none)
    poll_interval: float = setting(_positive_number, 30)
    sensor_timeout: float = setting(_positive_number, 30)
    max_concurrent_sensors: int = setting(_positive_int, 10)
    stale_multiplier: float = setting(_multiplier, 3.0)
    reaper: bool = setting(_boolean, True)
    # where the daemon writes the sensors placed on it, for a local sensor runtime to watch:
    # "auto" = $RUNTIME_DIRECTORY/assignments-<worker_name>.json under systemd, else none
    assignments_file: str = setting(_assignments_file, "auto")
    # the platform's placement labels and taints ({key, value?, effect}), placement.py
    labels: dict = setting(_labels, factory=dict, show=dict)
    taints: tuple = setting(_taints, (), show=lambda taints: [dict(t) for t in taints])
    # the interpreter per runtime for running sensors, over the detected ones (runner/launch.py)
    runtimes_exec: dict = setting(_runtimes_exec, factory=dict, show=dict)
    runtimes: tuple = ()  # from sensor.capabilities.runtimes; empty means detect
    capabilities: dict = setting(_capabilities, factory=dict, show=dict)  # custom keys, without runtimes


@dataclass(frozen=True)
class ApiConfig:
    # What a sensor child gets as ATTUNE_API_URL / ATTUNE_API_TOKEN (the platform's contract).
    url: str = setting(_optional_url(("http", "https")), "")
    # auto: $CREDENTIALS_DIRECTORY/attune-api-token (the units' LoadCredential=), else none
    token_file: str = setting(_token_file, "auto")


@dataclass(frozen=True)
class MessageQueueConfig:
    url: str = setting(_optional_url(("amqp", "amqps")), "", show=redact_dsn)
    exchange: str = setting(_exchange, "attune.events")


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig
    log: LogConfig
    sensor: SensorConfig
    api: ApiConfig = field(default_factory=ApiConfig)
    message_queue: MessageQueueConfig = field(default_factory=MessageQueueConfig)
    # the platform's top-level key: where pack scripts live; a placement's entrypoint must
    # resolve inside it (runner/launch.py)
    packs_base_dir: str = "/opt/attune/packs"
    source: str = ""  # the file it came from, for messages

    def with_sensor(self, **changes):
        return replace(self, sensor=replace(self.sensor, **changes))


SECTIONS = {"database": DatabaseConfig, "log": LogConfig, "sensor": SensorConfig, "api": ApiConfig,
            "message_queue": MessageQueueConfig}
# Keys at the top level of the file, as the platform's own configuration has them.
TOP_LEVEL = {"packs_base_dir": _absolute_dir}
# The platform's own environment names for them (its sensor service reads these).
TOP_LEVEL_ENV = {"packs_base_dir": "ATTUNE_PACKS_BASE_DIR"}


def _keys(section):
    return [f for f in fields(SECTIONS[section]) if "check" in f.metadata]


# section -> key -> checker. Anything else in the file or the environment is an error:
# a typo such as heartbeat_intervall must not silently fall back to the default.
SCHEMA = {section: {f.name: f.metadata["check"] for f in _keys(section)} for section in SECTIONS}


def default_config_path(environ=None):
    environ = os.environ if environ is None else environ
    return environ.get("ATTUNE_CONFIG") or DEFAULT_CONFIG_PATH


def _read_file(path, required):
    from . import boundedyaml

    try:
        text = boundedyaml.read_regular_file(path)
    except boundedyaml.BoundError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path}: not found") from None
        return {}
    except PermissionError:
        raise ConfigError(f"config file {path}: permission denied (it should be readable by this user)") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path}: is a directory") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    try:
        data = boundedyaml.loads(text, limit=boundedyaml.MAX_FILE_BYTES)
    except boundedyaml.BoundError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: must be a mapping of sections (database, log, sensor)")
    return data


def _env_overrides(environ):
    """ATTUNE__SECTION__KEY=value -> {(section, key): (value, variable name)}."""
    from . import boundedyaml

    found = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX):].lower().split("__")
        if len(parts) == 1 and parts[0] in TOP_LEVEL:
            if len(raw) > boundedyaml.MAX_VALUE_BYTES:
                raise ConfigError(f"{name}: is longer than {boundedyaml.MAX_VALUE_BYTES} bytes")
            found[("", parts[0])] = (raw, name)
            continue
        if len(parts) != 2 or parts[0] not in SCHEMA or parts[1] not in SCHEMA[parts[0]]:
            raise ConfigError(f"{name}: unknown setting (expected ATTUNE__<SECTION>__<KEY>, e.g. ATTUNE__SENSOR__HEARTBEAT_INTERVAL)")
        if parts == ["database", "url"]:
            if len(raw) > boundedyaml.MAX_VALUE_BYTES:
                raise ConfigError(f"{name}: is longer than {boundedyaml.MAX_VALUE_BYTES} bytes")
            value = raw  # a URL is a string; YAML could mangle it
        else:
            try:
                value = boundedyaml.loads(raw) if raw.strip() else ""
            except boundedyaml.BoundError as exc:
                raise ConfigError(f"{name}: cannot be read: {exc}") from None
        found[tuple(parts)] = (value, name)
    return found


def load(path=None, environ=None):
    """Reads, merges and validates. `path` None means $ATTUNE_CONFIG or the default path."""
    environ = os.environ if environ is None else environ
    explicit = path is not None or bool(environ.get("ATTUNE_CONFIG"))
    path = path or default_config_path(environ)
    has_env_url = bool(environ.get("DATABASE_URL") or environ.get("ATTUNE__DATABASE__URL"))
    # The default file may be absent when the environment carries the URL (containers).
    data = _read_file(path, required=explicit or not has_env_url)

    values = {}  # (section, key) -> (value, label naming where it came from); section "" is the top level
    for key, variable in TOP_LEVEL_ENV.items():
        if environ.get(variable):
            values[("", key)] = (environ[variable], variable)
    for section, body in data.items():
        if section in TOP_LEVEL:
            values[("", section)] = (body, f"{section} (in {path})")
            continue
        if section not in SCHEMA:
            raise ConfigError(f"config file {path}: unknown section {_describe(section)} (known: {', '.join(SCHEMA)})")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{section} (in {path}): must be a mapping of settings")
        for key, value in body.items():
            if key not in SCHEMA[section]:
                raise ConfigError(f"{section}.{key} (in {path}): unknown setting (known: {', '.join(SCHEMA[section])})")
            values[(section, key)] = (value, f"{section}.{key} (in {path})")
    values.update(_env_overrides(environ))
    if environ.get("DATABASE_URL"):
        values[("database", "url")] = (environ["DATABASE_URL"], "DATABASE_URL")

    clean = {}
    for (section, key), (value, label) in values.items():
        try:
            clean[(section, key)] = (TOP_LEVEL[key] if section == "" else SCHEMA[section][key])(value)
        except ValueError as exc:
            raise ConfigError(f"{label}: {exc}") from None

    _check_runtimes_variable(environ)
    if ("database", "url") not in clean:
        raise DatabaseUrlMissing(f"database.url is not set: put it in {path} or set DATABASE_URL")
    return _build(clean, path)


def _check_runtimes_variable(environ):
    from .runtimes import from_environment

    try:
        from_environment(environ)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _build(clean, path):
    def section(name):
        return {key: value for (sec, key), value in clean.items() if sec == name}

    sensor = section("sensor")
    hostname = socket.gethostname()
    capabilities = dict(sensor.pop("capabilities", {}))
    runtimes = ()
    if "runtimes" in capabilities:
        try:
            runtimes = _runtime_list(capabilities.pop("runtimes"))
        except ValueError as exc:
            raise ConfigError(f"sensor.capabilities.runtimes (in {path}): {exc}") from None
    if "worker_name" not in sensor:
        default_name = f"sensor-{hostname}"
        if not NAME_RE.fullmatch(default_name):
            raise ConfigError(f"sensor.worker_name: the default {default_name!r} is not a valid name; set it explicitly")
        sensor["worker_name"] = default_name
    sensor.setdefault("host", hostname)
    return Config(
        database=DatabaseConfig(**section("database")),
        log=LogConfig(**section("log")),
        sensor=SensorConfig(runtimes=runtimes, capabilities=capabilities, **sensor),
        api=ApiConfig(**section("api")),
        message_queue=MessageQueueConfig(**section("message_queue")),
        **section(""),
        source=path,
    )


# What a running daemon cannot take on reload: its identity in the worker table, and its
# connection (the statement bound in force stays until a restart).
RESTART_ONLY_KEYS = ("worker_name", "host", "worker_type")


def for_reload(running, new):
    """The configuration a reload applies: `new`, but with the running identity and database
    settings. Returns it with the names of the settings that changed and wait for a restart."""
    waiting = [f"sensor.{key}" for key in RESTART_ONLY_KEYS if getattr(new.sensor, key) != getattr(running.sensor, key)]
    if new.database != running.database:
        waiting.append("database settings")
    kept = new.with_sensor(**{key: getattr(running.sensor, key) for key in RESTART_ONLY_KEYS})
    return replace(kept, database=running.database), waiting


def describe(config):
    """The effective configuration as plain data, password masked, for `attune-sensor config`:
    every key with its value, in declaration order, which loads back unchanged."""
    described = {key: getattr(config, key) for key in TOP_LEVEL}
    described.update({section: {f.name: f.metadata["show"](getattr(getattr(config, section), f.name))
                                for f in _keys(section)} for section in SECTIONS})
    if config.sensor.runtimes:
        described["sensor"]["capabilities"]["runtimes"] = list(config.sensor.runtimes)
    return described
