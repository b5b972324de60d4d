"""Configuration errors as an operator meets them: the real command, one line, exit 78."""

import os
import subprocess

import pytest
import yaml

from support import ATTUNE_SENSOR, BAD, URL, base_env, run_cli, write_config


@pytest.mark.parametrize("data,names,problem", BAD)
def test_bad_config_exits_78_with_one_line_naming_the_key(tmp_path, data, names, problem):
    path = write_config(tmp_path, data)
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
def test_bad_environment_exits_78_naming_the_variable(tmp_path, env, names):
    path = write_config(tmp_path, {"database": {"url": URL}})
    result = run_cli("--config", path, "config", env=env)
    assert result.returncode == 78, result.stdout
    assert names in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bad_runtimes_variable_stops_run_with_78(tmp_path):
    path = write_config(tmp_path, {"database": {"url": URL}})
    result = run_cli("--config", path, "run", env={"ATTUNE_SENSOR_RUNTIMES": "python,no way"})
    assert result.returncode == 78
    assert "ATTUNE_SENSOR_RUNTIMES" in result.stderr and "Traceback" not in result.stderr


def test_missing_and_unreadable_files(tmp_path):
    result = run_cli("--config", os.path.join(tmp_path, "absent.yaml"), "config")
    assert result.returncode == 78 and "not found" in result.stderr
    result = run_cli("config", env={"ATTUNE_CONFIG": tmp_path})
    assert result.returncode == 78 and "is a directory" in result.stderr


def test_config_command_masks_the_password(tmp_path):
    for url in (URL, "host=db.example.net user=attune password=s3cret-pw dbname=attune",
                "postgresql://attune@db.example.net/attune?password=s3cret-pw"):
        result = run_cli("--config", write_config(tmp_path, {"database": {"url": url}}), "config")
        assert result.returncode == 0, result.stderr
        assert "s3cret-pw" not in result.stdout and "***" in result.stdout
        shown = yaml.safe_load(result.stdout)
        assert shown["sensor"]["heartbeat_interval"] == "auto"


HOSTILE_SENSOR_VALUES = [
    {"worker_name": "x'); DELETE FROM worker; --"},
    {"worker_name": "robert\"; DROP TABLE worker"},
    {"worker_name": "tab\tand\x07bell"},
    {"worker_name": "n" * 10240},
    {"host": "h" * 10240},
    {"host": "a b"},
    {"capabilities": {"blob": "x" * 20000}},
    {"capabilities": {"nested": {"deep": [1, 2, {"k": "v" * 17000}]}}},
    {"capabilities": {"bad key!": 1}},
    {"heartbeat_interval": float("inf")},
    {"heartbeat_interval": 1e300},
    {"max_concurrent_sensors": -1},
    {"worker_type": "vm"},
    {"stale_multiplier": 1},
]


@pytest.mark.parametrize("sensor", HOSTILE_SENSOR_VALUES, ids=lambda s: next(iter(s)))
def test_hostile_values_are_refused_and_leave_the_table_alone(db_url, tmp_path, sensor):
    from support import query

    query(db_url, "INSERT INTO worker (name, worker_type, worker_role, host, status, capabilities, meta) "
                  "VALUES ('existing', 'local', 'sensor', 'h', 'active', '{\"runtimes\": [\"shell\"]}', '{}')")
    before = query(db_url, "SELECT * FROM worker ORDER BY id")
    path = write_config(tmp_path, {"database": {"url": db_url}, "sensor": {"worker_name": "existing", **sensor}})
    result = run_cli("--config", path, "run")
    assert result.returncode == 78, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attune-sensor: sensor.") and len(lines[0]) < 400
    assert "Traceback" not in result.stderr
    assert query(db_url, "SELECT * FROM worker ORDER BY id") == before


def test_capabilities_that_are_not_json_are_refused(tmp_path):
    path = write_config(tmp_path, "database: {url: 'postgresql://a@b/c'}\n"
                                 "sensor:\n  capabilities:\n    when: 2026-01-31 10:00:00\n")
    result = run_cli("--config", path, "config")
    assert result.returncode == 78 and "sensor.capabilities" in result.stderr and "JSON" in result.stderr


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
DEEP = "database: {url: 'postgresql://a@b/c'}\nsensor:\n  capabilities:\n    deep: " + "[" * 1000 + "]" * 1000 + "\n"
HOSTILE_FILES = {
    "alias bomb": (ALIAS_BOMB, "aliases"),
    "nested a thousand deep": (DEEP, "nested deeper than"),
    "duplicate key": ("database: {url: 'postgresql://a@b/c'}\nsensor:\n  worker_name: one\n  worker_name: two\n",
                      "appears twice"),
    "duplicate section": ("database: {url: 'postgresql://a@b/c'}\nsensor: {worker_name: one}\nsensor: {worker_name: two}\n",
                          "appears twice"),
    "name ending in a newline": ("database: {url: 'postgresql://a@b/c'}\nsensor: {worker_name: \"good\\n\"}\n",
                                 "sensor.worker_name"),
    "host ending in a newline": ("database: {url: 'postgresql://a@b/c'}\nsensor: {host: \"h1\\n\"}\n", "sensor.host"),
    "interval of a microsecond": ("database: {url: 'postgresql://a@b/c'}\nsensor: {heartbeat_interval: 0.000001}\n",
                                  "at least 0.1"),
    "integer of 100000 digits": ("database: {url: 'postgresql://a@b/c'}\nsensor: {max_concurrent_sensors: "
                                 + "9" * 100000 + "}\n", "cannot be read"),
}


def run_bounded(args, env=None):
    """The real CLI with 512 MB of address space and 20 s: a parser that explodes fails here."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (512 * 1024 * 1024, 512 * 1024 * 1024))

    return subprocess.run([ATTUNE_SENSOR, *args], env=base_env(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=20, preexec_fn=limit)


@pytest.mark.parametrize("case", sorted(HOSTILE_FILES))
def test_hostile_config_files_are_refused_in_bounded_time_and_memory(tmp_path, case):
    text, expected = HOSTILE_FILES[case]
    path = write_config(tmp_path, text)
    for command in (["config"], ["run"]):
        result = run_bounded(["--config", path, *command])
        assert result.returncode == 78, (case, result.stderr[-300:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr, lines


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_a_config_path_that_is_no_regular_file_is_refused_at_once(tmp_path, special):
    path = special
    if special == "fifo":
        path = f"{tmp_path}/config.fifo"
        os.mkfifo(path)  # nobody ever writes: reading it would block forever
    result = run_bounded(["--config", path, "config"])
    assert result.returncode == 78 and "is not a regular file" in result.stderr


def test_an_environment_value_is_bounded_like_the_file():
    result = run_bounded(["config"], env={"DATABASE_URL": "postgresql://a@b/c",
                                         "ATTUNE__SENSOR__CAPABILITIES": ALIAS_BOMB.replace("\n", ", ").join("{}")})
    assert result.returncode == 78 and "ATTUNE__SENSOR__CAPABILITIES" in result.stderr


def test_a_slash_in_an_unencoded_password_is_never_echoed():
    result = run_bounded(["config"], env={"DATABASE_URL": "postgresql://user:p@ss:w/rd@db.example:5432/attune"})
    assert result.returncode == 78 and "invalid port" in result.stderr
    for fragment in ("p@ss", "ss:w", "rd@db", "w/rd"):
        assert fragment not in result.stderr


def hostile_documents():
    """YAML texts shaped to hurt a parser: deep nesting, aliases, repeated keys, huge numbers,
    control characters, long strings, in any section and key, known or not."""
    from hypothesis import strategies as st

    scalar = st.one_of(st.integers(min_value=-10**30, max_value=10**30).map(str), st.text(max_size=30).map(repr),
                       st.sampled_from(["9" * 5000, "1e999", "-.inf", ".nan", "~", "'\\n'", '"\\x1b"', "*a", "&a x"]))
    nested = st.integers(min_value=1, max_value=400).map(lambda n: "[" * n + "]" * n)
    value = st.one_of(scalar, nested)
    section = st.sampled_from(["database", "sensor", "log", "other"])
    key = st.sampled_from(["url", "worker_name", "host", "heartbeat_interval", "capabilities", "labels", "taints",
                           "level", "schema", "x"])
    line = st.tuples(key, value).map(lambda kv: f"  {kv[0]}: {kv[1]}")
    block = st.tuples(section, st.lists(line, min_size=1, max_size=4)).map(lambda s: f"{s[0]}:\n" + "\n".join(s[1]))
    return st.lists(block, min_size=1, max_size=4).map(lambda blocks: "\n".join(blocks) + "\n")


def test_property_any_hostile_file_loads_or_is_refused_in_one_line_within_bounds(tmp_path_factory):
    from hypothesis import given, settings

    @settings(max_examples=40, deadline=None)
    @given(text=hostile_documents())
    def check(text):
        path = write_config(str(tmp_path_factory.mktemp("hostile")), text)
        result = run_bounded(["--config", path, "config"], env={"DATABASE_URL": "postgresql://a@b/c"})
        assert result.returncode in (0, 78), result.stderr[-300:]
        assert "Traceback" not in result.stderr and "internal error" not in result.stderr
        if result.returncode == 78:
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr

    check()


def test_property_any_hostile_environment_value_is_refused_in_one_line_within_bounds():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=30, deadline=None)
    @given(raw=st.one_of(st.text(st.characters(blacklist_characters="\x00"), max_size=60),
                         st.integers(min_value=1, max_value=300).map(lambda n: "{a: " * n + "1" + "}" * n),
                         st.just("[&a x, *a, *a]"), st.just("9" * 100000)),
           key=st.sampled_from(["SENSOR__CAPABILITIES", "SENSOR__LABELS", "SENSOR__TAINTS", "SENSOR__WORKER_NAME",
                                "DATABASE__SCHEMA", "SENSOR__HEARTBEAT_INTERVAL"]))
    def check(raw, key):
        result = run_bounded(["config"], env={"DATABASE_URL": "postgresql://a@b/c", f"ATTUNE__{key}": raw})
        assert result.returncode in (0, 78), result.stderr[-300:]
        assert "Traceback" not in result.stderr and "internal error" not in result.stderr
        if result.returncode == 78:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and f"ATTUNE__{key}" in lines[0], lines

    check()


def test_config_and_run_agree_on_a_bad_runtimes_variable(tmp_path):
    path = write_config(tmp_path, {"database": {"url": "postgresql://a@b/c"}})
    for command in ("config", "run"):
        result = run_bounded(["--config", path, command], env={"ATTUNE_SENSOR_RUNTIMES": "python,py thon"})
        assert result.returncode == 78 and "ATTUNE_SENSOR_RUNTIMES" in result.stderr, (command, result.stderr)


# The Attune platform's keys that hold secrets, as its sample files write them.
PLATFORM_SECRET_FILE = """
environment: production
database: {{url: '{url}', max_connections: 20, schema: null}}
message_queue: {{url: 'amqp://attune:mq-pw-2@rabbitmq:5672', exchange: attune, enable_dlq: true}}
rabbitmq: {{url: 'amqp://attune:rabbit-pw-3@localhost:5672/attune'}}
server: {{host: 0.0.0.0, port: 8080}}
log: {{level: warn, format: json, console: true}}
security:
  jwt_secret: jwt-secret-4
  encryption_key: encryption-key-5-at-least-32-characters
  oidc: {{enabled: false, client_secret: oidc-secret-6}}
  ldap: {{enabled: false, search_bind_password: ldap-pw-7}}
agent: {{binary_dir: /opt/attune/agent, bootstrap_token: agent-token-8}}
sensor:
  worker_name: {name}
  taints: [{{key: gpu, value: nvidia, effect: no_schedule}}]
  heartbeat_interval: 10
  shutdown_timeout: 5
  polling_interval: 5
"""
PLATFORM_SECRETS = ("s3cret-pw", "mq-pw-2", "rabbit-pw-3", "jwt-secret-4", "encryption-key-5", "oidc-secret-6",
                    "ldap-pw-7", "agent-token-8", "env-jwt-9", "env-ldap-10")
PLATFORM_ENV = {"ATTUNE__SECURITY__JWT_SECRET": "env-jwt-9", "ATTUNE__SECURITY__LDAP__SEARCH_BIND_PASSWORD": "env-ldap-10",
                "ATTUNE__ENVIRONMENT": "production"}


def test_the_platforms_file_is_read_and_none_of_its_secrets_printed(tmp_path):
    path = write_config(tmp_path, PLATFORM_SECRET_FILE.format(url=URL, name="sensor-platform"))
    result = run_cli("--config", path, "config", env=PLATFORM_ENV)
    assert result.returncode == 0, result.stderr
    for secret in PLATFORM_SECRETS:
        assert secret not in result.stdout + result.stderr, secret
    shown = yaml.safe_load(result.stdout)
    assert shown["message_queue"]["url"] == "amqp://attune:***@rabbitmq:5672"
    assert shown["sensor"]["taints"] == [{"key": "gpu", "value": "nvidia", "effect": "no_schedule"}]
    assert shown["sensor"]["sensor_timeout"] == 5 and shown["log"]["level"] == "warning"
    assert set(shown) == {"packs_base_dir", "database", "log", "sensor", "api", "message_queue"}


def test_the_platforms_file_runs_the_worker_commands(db_url, tmp_path):
    path = write_config(tmp_path, PLATFORM_SECRET_FILE.format(url=db_url, name="sensor-platform"))
    result = run_cli("--config", path, "workers", "--json", env=PLATFORM_ENV)
    assert result.returncode == 0, result.stderr
    assert run_cli("--config", path, "check", env=PLATFORM_ENV).stdout.startswith("CRITICAL: worker sensor-platform")


def test_an_amqp_password_is_masked():
    result = run_cli("config", env={"DATABASE_URL": URL, "ATTUNE_CONFIG": "/dev/null",
                                    "ATTUNE_MQ_URL": "amqp://u:p@ss/w@mq.example:5672/vhost",
                                    "ATTUNE__API__URL": "http://u:api-pw@api.example:8080"})
    assert result.returncode == 0, result.stderr
    for fragment in ("p@ss", "ss/w", "api-pw"):
        assert fragment not in result.stdout
