"""Configuration: the YAML file, the environment, defaults and validation, as one frozen result.

Precedence, highest first:
  1. the variables that name one setting: DATABASE_URL, ATTUNE_API_URL, ATTUNE_MQ_URL,
     ATTUNE_PACKS_BASE_DIR (the platform's own names for what its sensors get)
  2. ATTUNE__<SECTION>__<KEY> environment variables, parsed as YAML scalars ("60" -> 60)
  3. the YAML file (--config, else $ATTUNE_CONFIG, else /etc/attune/config.yaml, else the
     platform's /etc/attune/attune.yaml when config.yaml does not exist)
  4. built-in defaults
The file may be the Attune platform's own configuration: its keys for other services are
accepted and ignored (PLATFORM_KEYS, a declared list), its keys that mean something here are
used. A key neither attune-sensor nor the platform knows is an error.
ATTUNE_SENSOR_RUNTIMES overrides runtime detection (runtimes.py); it is validated here too, so
`attune-sensor config` and `run` give the same answer for the same environment.

Every error is a ConfigError whose message names the key (or the variable) and the problem on
one line. Values of database.url are never echoed: they may hold a password.
"""

import math
import os
import re
import socket
import stat
from dataclasses import MISSING, dataclass, field, fields, replace

from .dsn import redact_dsn
from ..errors import ConfigError, DatabaseUrlMissing

DEFAULT_CONFIG_PATH = "/etc/attune/config.yaml"
# The platform's packaged configuration file, read when DEFAULT_CONFIG_PATH does not exist.
PLATFORM_CONFIG_PATH = "/etc/attune/attune.yaml"
ENV_PREFIX = "ATTUNE__"
# The template unit's instance (attune-sensor@NAME, `attune-sensor --instance NAME`): its worker
# is named sensor-{hostname}-NAME unless sensor.worker_name says otherwise.
INSTANCE_VARIABLE = "ATTUNE_SENSOR_INSTANCE"

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
    from ..db.schema import check_schema_name

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


def _choice(choices, aliases=None):
    """One of `choices`; `aliases` maps the platform's spellings to ours (its log level warn)."""
    aliases = aliases or {}

    def check(value):
        if isinstance(value, str) and value.lower() in aliases:
            return aliases[value.lower()]
        if not isinstance(value, str) or value.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices + tuple(aliases))}, got {_describe(value)}")
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
    from ..worker.runtimes import normalise

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
    from .. import placement

    return placement.labels(value)


def _taints(value):
    from .. import placement

    if isinstance(value, str):  # ATTUNE__SENSOR__TAINTS="gpu:no_schedule,zone=eu"
        value = [item.strip() for item in value.split(",") if item.strip()]
    return tuple(placement.taints(value))


def _auto_or(check):
    def checked(value):
        if isinstance(value, str) and value.strip().lower() == "auto":
            return None
        return check(value)

    return checked


def _runtime_list(value):
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list):
        raise ValueError(f"must be a list of runtime names, got {_describe(value)}")
    from ..worker.runtimes import normalise

    return tuple(normalise(value))


# --- the keys: each declared once, as a dataclass field carrying its checker -----------------


def _as_is(value):
    return value


def _mask_url(value):
    """A URL with its password masked, for `attune-sensor config`: amqp://user:***@host. As in
    dsn.py the mask runs from the first : after // to the last @, so a password holding an
    unencoded @ or / is covered too (too much masked is cosmetic, too little a leak)."""
    if not value or "://" not in value:
        return value
    scheme, rest = value.split("://", 1)
    at = rest.rfind("@")
    colon = rest.find(":")
    if at < 0 or colon < 0 or colon > at:
        return value
    return f"{scheme}://{rest[:colon]}:***{rest[at:]}"


def _auto_if_none(value):
    return "auto" if value is None else value


def setting(check, default=MISSING, *, factory=None, show=_as_is, null_is_default=False):
    """One config key: its default, the checker that cleans a raw value from the file or the
    environment (SCHEMA is derived from these), and how `attune-sensor config` shows it
    (describe). A field declared without `setting` is derived, never read from input.
    `null_is_default`: the platform declares the key optional (an Option), so `key: null` in its
    file means the default, as it does there."""
    metadata = {"check": check, "show": show, "null_is_default": null_is_default}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = setting(_database_url, show=redact_dsn)
    connect_timeout: float = setting(_positive_number, 5.0)
    statement_timeout: float = setting(_positive_number, 5.0)
    # None ("auto"): the connection's search_path, then the platform's schema "attune"
    schema: str = setting(_schema_name, None, show=_auto_if_none, null_is_default=True)


@dataclass(frozen=True)
class LogConfig:
    # the platform's spellings too: trace, warn; its format pretty is our text
    level: str = setting(_choice(LOG_LEVELS, {"trace": "debug", "warn": "warning"}), "info")
    format: str = setting(_choice(LOG_FORMATS, {"pretty": "text"}), "text")


@dataclass(frozen=True)
class SensorConfig:
    worker_name: str = setting(_matching(NAME_RE, "1-128 letters, digits or . _ @ : - (starting with a letter or digit)"),
                               null_is_default=True)
    host: str = setting(_matching(HOST_RE, "a hostname or IP address"), null_is_default=True)
    worker_type: str = setting(_choice(WORKER_TYPES), "auto")
    # None ("auto"): 30 s, or 10 s on the Attune platform's schema
    heartbeat_interval: float = setting(_heartbeat_interval, None, show=_auto_if_none)
    poll_interval: float = setting(_positive_number, 30)
    # seconds a sensor gets between SIGTERM and SIGKILL (at stop, when it moves, at the fence):
    # the smaller of sensor_timeout and the platform's shutdown_timeout when both are set
    sensor_timeout: float = setting(_positive_number, 30)
    # the platform's bound on stopping its sensors; None ("auto"): sensor_timeout alone
    shutdown_timeout: float = setting(_auto_or(_positive_number), None, show=_auto_if_none, null_is_default=True)
    max_concurrent_sensors: int = setting(_positive_int, 10, null_is_default=True)
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
    capabilities: dict = setting(_capabilities, factory=dict, show=dict,  # custom keys, without runtimes
                                 null_is_default=True)


@dataclass(frozen=True)
class ApiConfig:
    # What a sensor child gets as ATTUNE_API_URL / ATTUNE_API_TOKEN (the platform's contract).
    url: str = setting(_optional_url(("http", "https")), "", show=_mask_url)
    # auto: $CREDENTIALS_DIRECTORY/attune-api-token (the units' LoadCredential=), else none
    token_file: str = setting(_token_file, "auto")


@dataclass(frozen=True)
class MessageQueueConfig:
    url: str = setting(_optional_url(("amqp", "amqps")), "", show=_mask_url)
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
    # lines to warn about at start and in `attune-sensor config` (a file that exposes a secret)
    warnings: tuple = field(default=(), compare=False)

    def with_sensor(self, **changes):
        return replace(self, sensor=replace(self.sensor, **changes))


SECTIONS = {"database": DatabaseConfig, "log": LogConfig, "sensor": SensorConfig, "api": ApiConfig,
            "message_queue": MessageQueueConfig}
# Keys at the top level of the file, as the platform's own configuration has them.
TOP_LEVEL = {"packs_base_dir": _absolute_dir}
# Variables that name one setting, the platform's own names (its sensor service reads them and
# hands them to its sensors); they rank above ATTUNE__<SECTION>__<KEY> as DATABASE_URL does.
NAMED_ENV = {("", "packs_base_dir"): "ATTUNE_PACKS_BASE_DIR", ("api", "url"): "ATTUNE_API_URL",
             ("message_queue", "url"): "ATTUNE_MQ_URL"}


def _keys(section):
    return [f for f in fields(SECTIONS[section]) if "check" in f.metadata]


# section -> key -> checker. Anything else in the file or the environment is an error unless the
# platform declares it (PLATFORM_KEYS): a typo such as heartbeat_intervall must not silently fall
# back to the default.
SCHEMA = {section: {f.name: f.metadata["check"] for f in _keys(section)} for section in SECTIONS}
NULL_IS_DEFAULT = {(section, f.name) for section in SECTIONS for f in _keys(section) if f.metadata["null_is_default"]}

# --- the Attune platform's keys attune-sensor does not use --------------------------------------
#
# One file may serve the platform and attune-sensor (the platform's services all read one
# config.yaml / attune.yaml). These are the platform's keys that mean nothing here: accepted, never
# read, never shown by `attune-sensor config` (several hold secrets: security.jwt_secret,
# security.encryption_key, security.oidc.client_secret, security.ldap.search_bind_password,
# agent.bootstrap_token). Source: the platform's crates/common/src/config.rs (Config and the structs
# it holds, serde names) and the sample files it ships (config.example.yaml,
# config.development.yaml, config.test.yaml, docker/distributable/config.docker.yaml,
# packaging/config/attune.yaml), at commit 9206d4171faa2efd88c201a8240f7442fb4b9007.
# A name maps to None (any value: a scalar, a list, or a free map such as worker.labels) or to
# the declaration of the mapping it holds, so a typo one level down is still an error.
_ANY = None
_RETENTION_TARGET = {"max_age_seconds": _ANY}
_OIDC = dict.fromkeys(("enabled", "discovery_url", "client_id", "provider_name", "provider_label",
                       "provider_icon_url", "client_secret", "redirect_uri", "post_logout_redirect_uri",
                       "scopes"))
_LDAP = dict.fromkeys(("enabled", "url", "bind_dn_template", "user_search_base", "user_filter",
                       "search_bind_dn", "search_bind_password", "login_attr", "email_attr",
                       "display_name_attr", "group_attr", "starttls", "danger_skip_tls_verify",
                       "provider_name", "provider_label", "provider_icon_url"))
PLATFORM_KEYS = {
    # top-level scalars (Config)
    "service_name": _ANY, "environment": _ANY, "runtime_envs_dir": _ANY, "artifacts_dir": _ANY,
    # sections attune-sensor reads too: the platform's keys in them that it does not
    "database": dict.fromkeys(("max_connections", "min_connections", "idle_timeout", "log_statements")),
    "message_queue": {"enable_dlq": _ANY, "message_ttl": _ANY,
                      # config.development.yaml
                      "rabbitmq": {"worker_queue_ttl_ms": _ANY,
                                   "dead_letter": dict.fromkeys(("enabled", "exchange", "ttl_ms"))}},
    "log": dict.fromkeys(("console", "file")),
    # the platform's SensorConfig keys are all read here; these only its config.development.yaml
    # names (the platform itself reads none of them)
    "sensor": dict.fromkeys(("service_name", "polling_interval", "cleanup_interval")),
    # the platform's other services
    "server": dict.fromkeys(("host", "port", "request_timeout", "enable_cors", "cors_origins", "max_body_size")),
    "security": {**dict.fromkeys(("jwt_secret", "jwt_access_expiration", "jwt_refresh_expiration",
                                  "encryption_key", "enable_auth", "allow_self_registration",
                                  "password_min_length")),  # the last: packaging/config/attune.yaml
                 "login_page": dict.fromkeys(("show_local_login", "show_oidc_login", "show_ldap_login")),
                 "oidc": _OIDC, "ldap": _LDAP},
    "worker": {**dict.fromkeys(("name", "worker_type", "runtime_id", "host", "port", "capabilities", "labels",
                                "taints", "max_concurrent_tasks", "heartbeat_interval", "task_timeout",
                                "max_stdout_bytes", "max_stderr_bytes", "execution_log_retention_policy",
                                "execution_log_retention_limit", "shutdown_timeout", "stream_logs",
                                # config.development.yaml
                                "service_name", "cleanup_interval", "work_dir")),
               "python": dict.fromkeys(("executable", "venv_dir", "requirements_timeout")),
               "nodejs": dict.fromkeys(("executable", "npm_executable", "modules_dir", "install_timeout")),
               "shell": dict.fromkeys(("executable", "allowed_shells"))},
    "notifier": dict.fromkeys(("host", "port", "max_connections",
                               # config.development.yaml
                               "service_name", "websocket_host", "websocket_port", "heartbeat_interval",
                               "connection_timeout", "message_buffer_size")),
    "executor": dict.fromkeys(("scheduled_timeout", "timeout_check_interval", "enable_timeout_monitor")),
    "agent": dict.fromkeys(("binary_dir", "bootstrap_token")),
    "artifacts": dict.fromkeys(("transport", "max_upload_size", "flush_interval_ms", "sensor_log_max_bytes",
                                "sensor_log_max_files")),
    "pack_registry": dict.fromkeys(("enabled", "indices", "cache_ttl", "cache_enabled", "timeout",
                                    "verify_checksums", "allowed_source_hosts", "allow_http",
                                    "default_registry")),  # the last: config.test.yaml
    "pack_upload": dict.fromkeys(("max_extracted_size_bytes", "max_file_count", "max_per_entry_size_bytes",
                                  "allow_symlinks")),
    "retention": {**dict.fromkeys(("enabled", "check_interval_seconds", "batch_size", "dry_run",
                                   "advisory_lock_key")),
                  "targets": dict.fromkeys(("events", "enforcements", "executions", "execution_history",
                                            "worker_history", "sensor_process_history", "audit_events",
                                            "continuous_aggregates", "notifications", "webhook_event_logs",
                                            "inquiries", "work_queue_items", "work_queue_dispatches",
                                            "pack_test_executions", "execution_admission", "workers",
                                            "sensor_processes"), _RETENTION_TARGET)},
    "maintenance": dict.fromkeys(("enabled", "artifact_cleanup_enabled", "artifact_cleanup_batch_size",
                                  "monitoring_enabled", "corrective_actions_enabled", "stuck_execution_seconds",
                                  "execution_remediation_seconds", "stuck_queue_seconds",
                                  "queue_remediation_seconds", "admission_remediation_seconds",
                                  "retention_lag_alert_seconds", "alert_limit_per_cycle",
                                  "alert_cooldown_seconds")),
    "rabbitmq": dict.fromkeys(("url",)),  # packaging/config/attune.yaml
}
# Neither the platform nor attune-sensor builds a database URL from parts (the platform's
# DatabaseConfig has url only): named so the error says where the parts belong.
DATABASE_PARTS = ("host", "hostname", "port", "user", "username", "password", "dbname", "database", "name",
                  "sslmode")


def _platform_check(declared, body, where, label):
    """A platform-only value against its declaration: names it does not declare are errors,
    values are never read (and never echoed: some are secrets)."""
    if declared is None or body is None:
        return
    if not isinstance(body, dict):
        raise ConfigError(f"{label(where)}: must be a mapping (the Attune platform's setting)")
    for key, value in body.items():
        if key not in declared:
            raise ConfigError(f"{label(f'{where}.{key}' if isinstance(key, str) else where)}: unknown setting "
                              f"(the Attune platform's {where} has: {', '.join(declared)})")
        _platform_check(declared[key], value, f"{where}.{key}", label)


def _database_part(key, label):
    return ConfigError(f"{label}: neither attune-sensor nor the Attune platform builds the database URL from "
                       "parts; set database.url (postgresql://user:password@host:port/dbname)")


def default_config_path(environ=None):
    """$ATTUNE_CONFIG, else /etc/attune/config.yaml, else the platform's /etc/attune/attune.yaml
    when config.yaml does not exist (and attune.yaml does)."""
    environ = os.environ if environ is None else environ
    if environ.get("ATTUNE_CONFIG"):
        return environ["ATTUNE_CONFIG"]
    if not os.path.lexists(DEFAULT_CONFIG_PATH) and os.path.lexists(PLATFORM_CONFIG_PATH):
        return PLATFORM_CONFIG_PATH
    return DEFAULT_CONFIG_PATH


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
    """ATTUNE__SECTION__KEY=value -> {(section, key): (value, variable name)}, and
    ATTUNE__SECTION__KEY__ENTRY=value for one entry of a mapping setting (sensor.labels), as the
    platform's configuration library reads them -> {(section, key): {entry: (value, name)}}.
    The platform's keys that mean nothing here are accepted and ignored, values unread."""
    from . import boundedyaml

    found, entries = {}, {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX):].lower().split("__")
        if len(parts) == 1 and parts[0] in TOP_LEVEL:
            if len(raw) > boundedyaml.MAX_VALUE_BYTES:
                raise ConfigError(f"{name}: is longer than {boundedyaml.MAX_VALUE_BYTES} bytes")
            found[("", parts[0])] = (raw, name)
            continue
        if len(parts) >= 2 and parts[0] == "database" and parts[1] in DATABASE_PARTS:
            raise _database_part(parts[1], name)
        if parts[0] in SCHEMA and len(parts) >= 2 and parts[1] in SCHEMA[parts[0]]:
            if len(parts) > 2 and not _is_mapping_setting(parts[0], parts[1]):
                raise ConfigError(f"{name}: {parts[0]}.{parts[1]} is not a mapping; set {ENV_PREFIX}"
                                  f"{parts[0].upper()}__{parts[1].upper()}")
            if len(parts) > 3:
                raise ConfigError(f"{name}: unknown setting (one entry of {parts[0]}.{parts[1]} is "
                                  f"{ENV_PREFIX}{parts[0].upper()}__{parts[1].upper()}__<NAME>)")
        elif _platform_declares(parts):
            continue  # the platform's, for its other services
        else:
            raise ConfigError(f"{name}: unknown setting (expected ATTUNE__<SECTION>__<KEY>, e.g. "
                              "ATTUNE__SENSOR__HEARTBEAT_INTERVAL)")
        if parts == ["database", "url"]:
            if len(raw) > boundedyaml.MAX_VALUE_BYTES:
                raise ConfigError(f"{name}: is longer than {boundedyaml.MAX_VALUE_BYTES} bytes")
            value = raw  # a URL is a string; YAML could mangle it
        else:
            try:
                value = boundedyaml.loads(raw) if raw.strip() else ""
            except boundedyaml.BoundError as exc:
                raise ConfigError(f"{name}: cannot be read: {exc}") from None
        if len(parts) == 3:
            entries.setdefault((parts[0], parts[1]), {})[parts[2]] = (value, name)
        else:
            found[tuple(parts)] = (value, name)
    return found, entries


def _is_mapping_setting(section, key):
    return next(f for f in _keys(section) if f.name == key).default_factory is dict


def _platform_declares(parts):
    """Whether the platform declares this key path (a free map such as worker.labels takes any
    entry below it)."""
    declared = PLATFORM_KEYS
    for part in parts:
        if declared is None:
            return True
        if part not in declared:
            return False
        declared = declared[part]
    return True


def load(path=None, environ=None):
    """Reads, merges and validates. `path` None means $ATTUNE_CONFIG, else the default path
    (the platform's attune.yaml when config.yaml does not exist)."""
    environ = os.environ if environ is None else environ
    explicit = path is not None or bool(environ.get("ATTUNE_CONFIG"))
    path = path or default_config_path(environ)
    has_env_url = bool(environ.get("DATABASE_URL") or environ.get("ATTUNE__DATABASE__URL"))
    # The default file may be absent when the environment carries the URL (containers).
    data = _read_file(path, required=explicit or not has_env_url)
    warnings = _exposed_secrets(path, data)

    values = {}  # (section, key) -> (value, label naming where it came from); section "" is the top level

    def label(where):
        return f"{where} (in {path})"

    for section, body in data.items():
        if section in TOP_LEVEL:
            values[("", section)] = (body, label(section))
            continue
        if section not in SCHEMA:
            if isinstance(section, str) and section in PLATFORM_KEYS:
                _platform_check(PLATFORM_KEYS[section], body, section, label)
                continue
            raise ConfigError(f"config file {path}: unknown section {_describe(section)} (known: "
                              f"{', '.join(SCHEMA)}, and the Attune platform's {', '.join(PLATFORM_KEYS)})")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{section} (in {path}): must be a mapping of settings")
        platform = PLATFORM_KEYS.get(section, {})
        for key, value in body.items():
            if section == "database" and key in DATABASE_PARTS:
                raise _database_part(key, label(f"database.{key}"))
            if key in platform:
                _platform_check(platform[key], value, f"{section}.{key}", label)
                continue
            if key not in SCHEMA[section]:
                known = ", ".join(SCHEMA[section]) + (f"; the Attune platform's: {', '.join(platform)}" if platform else "")
                raise ConfigError(f"{section}.{key} (in {path}): unknown setting (known: {known})")
            if value is None and (section, key) in NULL_IS_DEFAULT:
                continue
            values[(section, key)] = (value, label(f"{section}.{key}"))
    overrides, entries = _env_overrides(environ)
    values.update(overrides)
    for (section, key), items in entries.items():
        current = values.get((section, key), ({}, None))[0]
        if not isinstance(current, dict):
            first = next(iter(items.values()))[1]
            raise ConfigError(f"{first}: {section}.{key} is not a mapping where it is set")
        merged = dict(current)
        merged.update({entry: value for entry, (value, _) in items.items()})
        values[(section, key)] = (merged, " and ".join(sorted(name for _, name in items.values())))
    for (section, key), variable in NAMED_ENV.items():
        if environ.get(variable):
            values[(section, key)] = (environ[variable], variable)
    if environ.get("DATABASE_URL"):
        values[("database", "url")] = (environ["DATABASE_URL"], "DATABASE_URL")

    clean = {}
    for (section, key), (value, where) in values.items():
        try:
            clean[(section, key)] = (TOP_LEVEL[key] if section == "" else SCHEMA[section][key])(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    _check_runtimes_variable(environ)
    if ("database", "url") not in clean:
        raise DatabaseUrlMissing(f"database.url is not set: put it in {path} or set DATABASE_URL")
    return replace(_build(clean, path, environ.get(INSTANCE_VARIABLE) or None), warnings=warnings)


# Where a file may hold a secret: the database URL and the message queue URL (a password in
# them), and the platform's secret keys (read by its other services, never by attune-sensor).
_SECRET_URLS = (("database", "url"), ("message_queue", "url"), ("rabbitmq", "url"))
_URL_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#@:]*:[^/?#@]+@")
_SECRET_KEYS = (("security", "jwt_secret"), ("security", "encryption_key"), ("security", "oidc", "client_secret"),
                ("security", "ldap", "search_bind_password"), ("agent", "bootstrap_token"))


def _exposed_secrets(path, data):
    """One warning line when the file holds a password or secret key and every user may read
    it (not refused: the platform's own file may be laid out so; docs/operations.md)."""
    def value_at(keys):
        value = data
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def has_password(url):  # libpq's rules for the database, user:password@ for an AMQP URL
        return isinstance(url, str) and (redact_dsn(url) != url or _URL_PASSWORD.match(url) is not None)

    held = [".".join(keys) for keys in _SECRET_URLS if has_password(value_at(keys))]
    held += [".".join(keys) for keys in _SECRET_KEYS if value_at(keys) not in (None, "")]
    if not held:
        return ()
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ()
    if not mode & stat.S_IROTH:
        return ()
    return (f"config file {path} holds a secret ({', '.join(held)}) and is readable by every user "
            f"(mode {stat.S_IMODE(mode):04o}): chmod o-r {path} (the package's file is 0640 root:attune)",)


def _check_runtimes_variable(environ):
    from ..worker.runtimes import from_environment

    try:
        from_environment(environ)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _build(clean, path, instance=None):
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
        # an instance of the template unit gets its own row: two on one host must not share one
        default_name = f"sensor-{hostname}" + (f"-{instance}" if instance else "")
        if not NAME_RE.fullmatch(default_name):
            raise ConfigError(f"sensor.worker_name: the default {default_name!r} is not a valid name; set it explicitly")
        sensor["worker_name"] = default_name
    sensor.setdefault("host", hostname)
    if sensor.get("shutdown_timeout") is not None:
        # the platform's bound on stopping sensors; here that is the SIGTERM-to-SIGKILL grace
        sensor["sensor_timeout"] = min(sensor.get("sensor_timeout", math.inf), sensor["shutdown_timeout"])
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
