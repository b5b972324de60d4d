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


# The Attune platform's configuration as it ships it: every section and key of its sample files
# (config.example.yaml, config.development.yaml, config.test.yaml, docker/distributable/
# config.docker.yaml, packaging/config/attune.yaml at commit 9206d41), written out here.
PLATFORM_FILE = """
service_name: attune
environment: docker
database:
  url: postgresql://attune:db-pw-1@postgres:5432/attune
  max_connections: 20
  min_connections: 5
  connect_timeout: 30
  idle_timeout: 600
  log_statements: false
  schema: null
message_queue:
  url: amqp://attune:mq-pw-2@rabbitmq:5672
  exchange: attune
  enable_dlq: true
  message_ttl: 3600
  rabbitmq:
    worker_queue_ttl_ms: 300000
    dead_letter: {enabled: true, exchange: attune.dlx, ttl_ms: 86400000}
rabbitmq:
  url: amqp://attune:rabbit-pw-3@localhost:5672/attune
server:
  host: 0.0.0.0
  port: 8080
  request_timeout: 60
  enable_cors: true
  cors_origins: [http://localhost, http://web:3000]
  max_body_size: 10485760
log:
  level: warn
  format: pretty
  console: true
  file: /var/log/attune/attune.log
security:
  jwt_secret: jwt-secret-4
  jwt_access_expiration: 3600
  jwt_refresh_expiration: 604800
  encryption_key: encryption-key-5-at-least-32-characters
  enable_auth: true
  allow_self_registration: false
  password_min_length: 8
  login_page: {show_local_login: true, show_oidc_login: true, show_ldap_login: true}
  oidc:
    enabled: false
    discovery_url: https://auth.example.com/.well-known/openid-configuration
    client_id: client-id
    provider_name: sso
    provider_label: Example SSO
    provider_icon_url: https://auth.example.com/assets/logo.svg
    client_secret: oidc-secret-6
    redirect_uri: http://localhost:3000/auth/callback
    post_logout_redirect_uri: http://localhost:3000/login
    scopes: [groups]
  ldap:
    enabled: false
    url: ldap://ldap.example.com:389
    bind_dn_template: "uid={login},ou=users,dc=example,dc=com"
    user_search_base: "ou=users,dc=example,dc=com"
    user_filter: "(uid={login})"
    search_bind_dn: "cn=readonly,dc=example,dc=com"
    search_bind_password: ldap-pw-7
    login_attr: uid
    email_attr: mail
    display_name_attr: cn
    group_attr: memberOf
    starttls: false
    danger_skip_tls_verify: false
    provider_name: ldap
    provider_label: Company LDAP
packs_base_dir: /opt/attune/packs
runtime_envs_dir: /opt/attune/runtime_envs
artifacts_dir: /opt/attune/artifacts
worker:
  service_name: attune-worker-e2e
  name: attune-worker-1
  worker_type: container
  labels: {zone: us-east-1a}
  taints: [{key: gpu, value: "true", effect: no_schedule}]
  max_concurrent_tasks: 20
  heartbeat_interval: 10
  task_timeout: 300
  max_stdout_bytes: 10485760
  max_stderr_bytes: 10485760
  execution_log_retention_policy: days
  execution_log_retention_limit: 7
  shutdown_timeout: 30
  stream_logs: true
  cleanup_interval: 60
  work_dir: ./tests/artifacts
  python: {executable: python3, venv_dir: ./tests/venvs, requirements_timeout: 120}
  nodejs: {executable: node, npm_executable: npm, modules_dir: ./tests/node_modules, install_timeout: 120}
  shell: {executable: /bin/bash, allowed_shells: [/bin/bash, /bin/sh]}
sensor:
  service_name: attune-sensor-e2e
  worker_name: sensor-platform-01
  labels: {zone: eu-west}
  taints: [{key: gpu, value: nvidia, effect: prefer_no_schedule}, {key: spot}]
  max_concurrent_sensors: 50
  heartbeat_interval: 10
  poll_interval: 10
  polling_interval: 5
  cleanup_interval: 60
  sensor_timeout: 300
  shutdown_timeout: 20
notifier:
  service_name: attune-notifier-e2e
  host: 0.0.0.0
  port: 8081
  max_connections: 1000
  websocket_host: 127.0.0.1
  websocket_port: 8081
  heartbeat_interval: 30
  connection_timeout: 60
  message_buffer_size: 1000
executor: {scheduled_timeout: 300, timeout_check_interval: 60, enable_timeout_monitor: true}
agent: {binary_dir: /opt/attune/agent, bootstrap_token: "agent-token-8"}
pack_registry:
  enabled: true
  default_registry: https://registry.attune.example.com
  cache_ttl: 300
  allowed_source_hosts: [registry.attune.example.com]
retention:
  enabled: true
  check_interval_seconds: 3600
  batch_size: 1000
  dry_run: false
  targets:
    events: {max_age_seconds: 7776000}
    executions: {max_age_seconds: 7776000}
    audit_events: {max_age_seconds: null}
maintenance:
  enabled: true
  artifact_cleanup_enabled: true
  artifact_cleanup_batch_size: 100
  monitoring_enabled: true
  corrective_actions_enabled: true
  stuck_execution_seconds: 3600
  execution_remediation_seconds: 7200
  stuck_queue_seconds: 900
  queue_remediation_seconds: 1800
  admission_remediation_seconds: 1800
  retention_lag_alert_seconds: 86400
  alert_limit_per_cycle: 25
  alert_cooldown_seconds: 3600
"""
PLATFORM_SECRETS = ("db-pw-1", "mq-pw-2", "rabbit-pw-3", "jwt-secret-4", "encryption-key-5", "oidc-secret-6",
                    "ldap-pw-7", "agent-token-8")


def test_the_platforms_own_file_loads_and_means_what_it_says(tmp_path):
    cfg = config.load(write_config(tmp_path, PLATFORM_FILE), environ={})
    assert cfg.database.url == "postgresql://attune:db-pw-1@postgres:5432/attune"
    assert (cfg.database.connect_timeout, cfg.database.schema) == (30, None)  # schema: null is auto
    assert (cfg.log.level, cfg.log.format) == ("warning", "text")  # the platform's warn and pretty
    assert cfg.message_queue.url == "amqp://attune:mq-pw-2@rabbitmq:5672" and cfg.message_queue.exchange == "attune"
    assert cfg.packs_base_dir == "/opt/attune/packs"
    assert cfg.sensor.worker_name == "sensor-platform-01" and cfg.sensor.labels == {"zone": "eu-west"}
    assert cfg.sensor.taints == ({"key": "gpu", "value": "nvidia", "effect": "prefer_no_schedule"},
                                 {"key": "spot", "effect": "no_schedule"})
    assert (cfg.sensor.heartbeat_interval, cfg.sensor.poll_interval, cfg.sensor.max_concurrent_sensors) == (10, 10, 50)
    # shutdown_timeout bounds the stop: the smaller of it and sensor_timeout
    assert (cfg.sensor.sensor_timeout, cfg.sensor.shutdown_timeout) == (20, 20)


def test_shutdown_timeout_alone_or_with_sensor_timeout(tmp_path):
    def timeouts(**sensor):
        cfg = load(tmp_path, {"database": {"url": URL}, "sensor": sensor})
        return cfg.sensor.sensor_timeout, cfg.sensor.shutdown_timeout

    assert timeouts() == (30, None)
    assert timeouts(shutdown_timeout=120) == (120, 120)
    assert timeouts(shutdown_timeout=120, sensor_timeout=45) == (45, 120)
    assert timeouts(shutdown_timeout="auto", sensor_timeout=45) == (45, None)


@pytest.mark.parametrize("text,names", [
    ("security: {jwt_secrte: x}", "security.jwt_secrte"),
    ("security: {ldap: {search_bind_pasword: x}}", "security.ldap.search_bind_pasword"),
    ("retention: {targets: {event: {max_age_seconds: 1}}}", "retention.targets.event"),
    ("sensor: {polling_intervall: 5}", "sensor.polling_intervall"),
    ("servre: {port: 1}", "'servre'"),
    ("log: {consol: true}", "log.consol"),
])
def test_a_key_neither_knows_is_still_an_error_naming_it(tmp_path, text, names):
    with pytest.raises(ConfigError) as err:
        config.load(write_config(tmp_path, f"database: {{url: '{URL}'}}\n{text}\n"), environ={})
    assert names in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("key", ["host", "port", "user", "username", "password", "dbname"])
def test_database_parts_are_refused_saying_to_set_the_url(tmp_path, key):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, {"database": {"url": URL, key: "s3cret-part"}})
    assert f"database.{key}" in str(err.value) and "set database.url" in str(err.value)
    assert "s3cret-part" not in str(err.value)
    with pytest.raises(ConfigError, match=f"ATTUNE__DATABASE__{key.upper()}: .*set database.url"):
        load(tmp_path, {"database": {"url": URL}}, env={f"ATTUNE__DATABASE__{key.upper()}": "s3cret-part"})


def test_the_platforms_variables_are_accepted_and_its_sensor_names_used(tmp_path):
    env = {"ATTUNE__SECURITY__JWT_SECRET": "jwt", "ATTUNE__SECURITY__LDAP__SEARCH_BIND_PASSWORD": "pw",
           "ATTUNE__ENVIRONMENT": "production", "ATTUNE__SERVER__CORS_ORIGINS": "http://a,http://b",
           "ATTUNE__WORKER__LABELS__attune_transport": "api", "ATTUNE__SENSOR__SERVICE_NAME": "s",
           "ATTUNE__SENSOR__LABELS__RACK": "r1",
           "ATTUNE_API_URL": "http://api.example:8080", "ATTUNE_MQ_URL": "amqp://mq.example:5672",
           "ATTUNE_PACKS_BASE_DIR": "/srv/packs"}
    cfg = load(tmp_path, {"database": {"url": URL}, "packs_base_dir": "/opt/file-packs",
                          "sensor": {"labels": {"zone": "eu"}}}, env=env)
    assert cfg.api.url == "http://api.example:8080" and cfg.message_queue.url == "amqp://mq.example:5672"
    assert cfg.packs_base_dir == "/srv/packs"  # the environment beats the file
    assert cfg.sensor.labels == {"rack": "r1", "zone": "eu"}  # one entry merged into the file's map
    # the variable naming one setting beats the generic ATTUNE__ form, as DATABASE_URL does
    both = load(tmp_path, {"database": {"url": URL}}, env={"ATTUNE__API__URL": "http://generic:1",
                                                           "ATTUNE_API_URL": "http://named:2"})
    assert both.api.url == "http://named:2"
    for typo in ("ATTUNE__SECURITY__JWT_SECRT", "ATTUNE__SECURITY__LDAP__PASSWORD", "ATTUNE__JWT__SECRET",
                 "ATTUNE__SENSOR__HEARTBEAT_INTERVAL__X", "ATTUNE__SENSOR__LABELS__A__B"):
        with pytest.raises(ConfigError, match=typo):
            load(tmp_path, {"database": {"url": URL}}, env={typo: "1"})


def test_the_platforms_packaged_file_is_read_when_config_yaml_is_absent(tmp_path, monkeypatch):
    ours, platform = os.path.join(tmp_path, "config.yaml"), os.path.join(tmp_path, "attune.yaml")
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", ours)
    monkeypatch.setattr(config, "PLATFORM_CONFIG_PATH", platform)
    with open(platform, "w") as f:
        f.write(PLATFORM_FILE)
    assert config.load(None, environ={}).source == platform
    with open(ours, "w") as f:
        f.write(f"database: {{url: '{URL}'}}\n")
    assert config.load(None, environ={}).source == ours  # config.yaml, when it exists, wins
    assert config.load(None, environ={"ATTUNE_CONFIG": platform}).source == platform
