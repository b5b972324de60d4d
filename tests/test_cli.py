"""The read-side commands: workers, check, metrics, and the global options."""

import json
import re
import signal

import pytest

from support import config_for, query, run_cli, write_config

FLEET = """
INSERT INTO worker (name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat) VALUES
 ('s-py', 'local', 'sensor', 'h1', 'active', '{"runtimes": ["python", "shell"], "max_concurrent_sensors": 10, "heartbeat_interval": 30}', '{}', now()),
 ('s-node', 'local', 'sensor', 'h2', 'active', '{"runtimes": ["node"], "max_concurrent_sensors": 5, "heartbeat_interval": 30}', '{}', now() - interval '10 minutes'),
 ('s-off', 'local', 'sensor', 'h3', 'inactive', '{"runtimes": ["python"], "max_concurrent_sensors": 4}', '{"reaped_at": "x"}', now() - interval '1 day'),
 ('a-1', 'local', 'action', 'h4', 'active', '{"runtimes": ["python"]}', '{}', now())
"""


def cli(url, *args):
    return run_cli(*args, env={"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"})


def test_workers_table_and_summary(db_url):
    query(db_url, FLEET)
    result = cli(db_url, "workers")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "HOST", "STATUS", "RUNTIMES", "SENSORS", "HEARTBEAT", "LABELS", "TAINTS"]
    assert "0/5" in lines[1].split()  # sensors placed / capacity
    assert [line.split()[0] for line in lines[1:4]] == ["s-node", "s-off", "s-py"]
    assert "a-1" not in result.stdout
    assert "active (stale)" in lines[1]
    assert "active: 2 of 3" in result.stdout and "stale: 1" in result.stdout and "capacity: 15" in result.stdout
    assert "runtimes: node 1, python 1, shell 1" in result.stdout


def test_workers_filters_and_json(db_url):
    query(db_url, FLEET)
    data = json.loads(cli(db_url, "workers", "--json", "--runtime", "Python").stdout)
    assert sorted(w["name"] for w in data["workers"]) == ["s-off", "s-py"]
    stale = json.loads(cli(db_url, "workers", "--json", "--stale").stdout)
    assert [w["name"] for w in stale["workers"]] == ["s-node"]
    assert stale["summary"]["stale"] == 1


def test_metrics_in_prometheus_format(db_url):
    query(db_url, FLEET)
    result = cli(db_url, "metrics")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert 'attune_sensor_workers_active{role="sensor"} 2' in lines
    assert "attune_sensor_workers_stale 1" in lines
    assert "attune_sensor_workers_reaped 1" in lines
    assert 'attune_sensor_runtime_workers{runtime="python"} 1' in lines
    assert "attune_sensor_capacity_sensors 15" in lines
    assert "# TYPE attune_sensor_heartbeat_lag_seconds gauge" in lines
    assert "attune_sensor_gauges_age_seconds 0.000" in lines  # computed by this very call


def gauge(lines, name):
    return float(next(line.split()[-1] for line in lines if line.startswith(name + " ")))


def test_metrics_are_computed_once_per_period_and_shared(db_url):
    # every host scrapes; the table is scanned once per 10 s fleet-wide (docs/design.md, "Fleet gauges")
    query(db_url, FLEET)
    assert 'attune_sensor_workers_active{role="sensor"} 2' in cli(db_url, "metrics").stdout.splitlines()
    query(db_url, "INSERT INTO worker (name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat) "
                  "VALUES ('s-new', 'local', 'sensor', 'h5', 'active', '{\"runtimes\": [\"shell\"]}', '{}', now())")
    shared = cli(db_url, "metrics").stdout.splitlines()
    assert 'attune_sensor_workers_active{role="sensor"} 2' in shared  # the stored gauges, no new scan
    assert 0 < gauge(shared, "attune_sensor_gauges_age_seconds") <= 10
    query(db_url, "UPDATE attune_sensor.fleet_gauges SET computed_at = now() - interval '11 seconds'")
    renewed = cli(db_url, "metrics").stdout.splitlines()
    assert 'attune_sensor_workers_active{role="sensor"} 3' in renewed
    assert gauge(renewed, "attune_sensor_gauges_age_seconds") == 0


def test_a_read_only_role_computes_the_metrics_itself(cluster, db_url):
    query(db_url, FLEET)
    cli(db_url, "metrics")  # stored gauges exist, but this role may not renew them
    query(db_url, "INSERT INTO worker (name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat) "
                  "VALUES ('s-new', 'local', 'sensor', 'h5', 'active', '{}', '{}', now())")
    schema = query(db_url, "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                           "WHERE c.relname = 'worker' AND c.relkind IN ('r', 'p') ORDER BY n.nspname <> 'public'")[0][0]
    dbname = db_url.rsplit("/", 1)[1]
    role = f"watcher_{dbname}"  # roles are the cluster's, databases the test's
    query(db_url, f"CREATE ROLE {role} LOGIN PASSWORD 'watch-pw'; "
                  f"GRANT USAGE ON SCHEMA {schema} TO {role}; GRANT SELECT ON {schema}.worker TO {role}")
    result = cli(f"postgresql://{role}:watch-pw@127.0.0.1:{cluster.port}/{dbname}", "metrics")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert 'attune_sensor_workers_active{role="sensor"} 3' in lines and gauge(lines, "attune_sensor_gauges_age_seconds") == 0


def test_check_states(db_url, tmp_path, daemons):
    path = config_for(tmp_path, db_url, "s-check")
    assert run_cli("--config", path, "check").returncode == 2  # not registered yet
    daemon = daemons(path)
    daemon.wait_for_line("Registered sensor worker")
    ok = run_cli("--config", path, "check")
    assert ok.returncode == 0 and ok.stdout.startswith("OK: worker s-check")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    down = run_cli("--config", path, "check")
    assert down.returncode == 2 and "inactive" in down.stdout
    unknown = run_cli("--config", config_for(tmp_path, "postgresql://x:pw@127.0.0.1:1/none", "s-check"), "check")
    assert unknown.returncode == 3 and unknown.stdout.startswith("UNKNOWN:")
    bad = run_cli("--config", write_config(tmp_path, {"sensor": {"heartbeat_interval": -1}}), "check")
    assert bad.returncode == 3 and "heartbeat_interval" in bad.stdout


def test_commands_without_schema_say_to_migrate(empty_db_url):
    result = cli(empty_db_url, "workers")
    assert result.returncode == 78 and "attune-sensor migrate run" in result.stderr


def test_version_and_usage_errors():
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("attune-sensor 0.")
    assert run_cli().returncode == 2
    assert run_cli("frobnicate").returncode == 2
    help_text = run_cli("--help").stdout
    listed = re.findall(r"^    (\w+)\s", help_text, re.M)  # the commands' own lines, each with its help
    assert listed == ["run", "migrate", "workers", "check", "metrics", "place", "rebalance", "sync", "unplace", "assignments",
                      "config"], help_text


def test_is_configured_tells_a_fresh_install_from_a_configured_one(tmp_path):
    fresh = write_config(tmp_path, "# database:\n#   url: postgresql://...\n")
    result = run_cli("--config", fresh, "config", "--is-configured")
    assert result.returncode == 1 and "database.url is not set" in result.stderr
    assert run_cli("--config", fresh, "config").returncode == 78
    configured = write_config(tmp_path, {"database": {"url": "postgresql://a@b/c"}})
    assert run_cli("--config", configured, "config", "--is-configured").returncode == 0
    wrong = write_config(tmp_path, {"database": {"url": "postgresql://a@b/c"}, "sensor": {"heartbeat_interval": 0}})
    assert run_cli("--config", wrong, "config", "--is-configured").returncode == 0


SURROGATE = b"ref\xff".decode("utf-8", "surrogateescape")  # argv bytes that are not UTF-8
BAD_ARGUMENTS = [
    ("place", SURROGATE, "--runtime", "python"),
    ("place", "ok.ref", "--runtime", "python", "--selector", b"zone=\xffeu".decode("utf-8", "surrogateescape")),
    ("place", "ok.ref", "--runtime", "python", "--tolerate", b"gpu\xfe".decode("utf-8", "surrogateescape")),
    ("place", "ok.ref", "--runtime", "python", "--entrypoint", b"s\xff.py".decode("utf-8", "surrogateescape")),
    ("place", "ok.ref", "--runtime", "python", "--entrypoint", "s.py",
     "--env", b"K=\xff".decode("utf-8", "surrogateescape")),
    ("unplace", SURROGATE),
    ("assignments", "--worker", b"w\xff".decode("utf-8", "surrogateescape")),
    ("workers", "--runtime", b"py\xff".decode("utf-8", "surrogateescape")),
    ("place", "ok.ref", "--runtime", ""),
    ("workers", "--runtime", ""),
    ("place", "ok.ref", "--runtime", "p" * 10240),
    ("workers", "--runtime", "p" * 10240),
    ("place", "r" * 10240, "--runtime", "python"),
    ("place", "evil\u202eref", "--runtime", "python"),
    ("place", "evil\u0085ref", "--runtime", "python"),
    ("place", "evil\u2028ref", "--runtime", "python"),
    ("place", "evil\x7fref", "--runtime", "python"),
    ("unplace", "evil\u202eref"),
    ("assignments", "--worker", "w\u2028x"),
    ("place", "ok.ref", "--runtime", "python", *[a for i in range(1000) for a in ("--tolerate", f"t{i}")]),
    ("place", "ok.ref", "--runtime", "python", *[a for i in range(65) for a in ("--selector", f"k{i}=v")]),
    ("place", "ok.ref", "--runtime", "python", "--selector", "zone=eu", "--selector", "zone=us"),
    ("place", "ok.ref", "--runtime", "python", "--selector", "novalue"),
    ("place", "ok.ref", "--runtime", "python", "--tolerate", "gpu:sometimes"),
    ("assignments", "--worker", "w1", "--mine"),
    ("frobnicate\x1b[2J",),
]


def test_bad_arguments_are_usage_errors_in_one_line_before_the_database(spec_db_url):
    before = query(spec_db_url, "SELECT count(*) FROM attune_sensor.assignment")
    for args in BAD_ARGUMENTS:
        result = cli(spec_db_url, *args)
        shown = repr(args)[:120]
        assert result.returncode == 2, (shown, result.returncode, result.stderr[-300:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("attune-sensor: "), (shown, result.stderr[-300:])
        assert len(lines[0]) < 400 and lines[0].isprintable(), (shown, lines[0][:300])
        for word in ("Traceback", "internal error", "SELECT", "INSERT", "psycopg2"):
            assert word not in result.stderr, (shown, result.stderr[-300:])
    assert query(spec_db_url, "SELECT count(*) FROM attune_sensor.assignment") == before


def test_config_may_follow_the_command(tmp_path):
    wrong = write_config(tmp_path, {"database": {"url": "postgresql://a@b/c"}, "sensor": {"heartbeat_interval": -1}})
    for args in (("workers", "--config", wrong), ("migrate", "info", "--config", wrong), ("check", "--config", wrong),
                 ("place", "r", "--runtime", "python", "--config", wrong), ("config", "--config", wrong)):
        result = run_cli(*args)
        assert "heartbeat_interval" in result.stdout + result.stderr, (args, result.stderr)
    good = write_config(tmp_path, {"database": {"url": "postgresql://a@b/c"}, "sensor": {"worker_name": "after"}})
    shown = run_cli("--config", wrong, "config", "--config", good)  # the later one wins
    assert shown.returncode == 0 and "worker_name: after" in shown.stdout


def test_every_command_has_its_help():
    for command in (["run"], ["migrate"], ["migrate", "run"], ["migrate", "info"], ["workers"], ["check"],
                    ["metrics"], ["place"], ["rebalance"], ["unplace"], ["assignments"], ["config"]):
        result = run_cli(*command, "--help")
        assert result.returncode == 0, command
        paragraphs = result.stdout.split("\n\n")
        description = paragraphs[1].strip()
        assert description and not description.endswith(":") and not description.startswith(
            ("positional arguments", "options")), (command, result.stdout)


@pytest.mark.parametrize("argv", [["run"], ["--config", "/x", "run"], ["run", "--config=/y"],
                                  ["--config", "/a", "run", "--config", "/b"], ["--instance", "i1", "run"],
                                  ["run", "--instance=i2", "--config", "c.yaml"], ["--config=", "run"]])
def test_the_daemons_command_line_reads_as_argparse_reads_it(argv):
    """`run`'s command lines are read without argparse (a tenth of the daemon's start,
    docs/performance.md §1): the same namespace, and nothing else taken that way."""
    from attune_sensor import cli

    assert vars(cli._run_arguments(argv)) == vars(cli._parser().parse_args(argv))


@pytest.mark.parametrize("argv", [["run", "--help"], ["run", "x"], ["--config"], ["run", "--config", "-z"],
                                  ["run", "run"], ["--conf", "/x", "run"], ["workers"], []])
def test_other_command_lines_are_left_to_argparse(argv):
    from attune_sensor import cli

    assert cli._run_arguments(argv) is None
