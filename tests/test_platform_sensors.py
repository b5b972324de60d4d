"""The platform's sensors placed by the platform's own rules (issue 16): the sync pass and
`attune-sensor sync` on databases built by the project's fixture and by the platform's real
migrations, the rules' SQL held to a transcription of the platform's Rust, and a real daemon that
finds, runs and stops a platform sensor by itself."""

import json
import random

import pytest

from attune_sensor.platform import rules
from platform_db import add_runtime, add_sensor, add_worker, placed, sync
from support import Daemon, attune_database, query, run_cli, wait_for, write_config


@pytest.fixture(params=["fixture", "platform"])
def platform_url(request, cluster, attune_templates):
    return attune_database(cluster, attune_templates(request.param))


def test_sync_places_exactly_what_the_platform_runs_by_its_rules(platform_url):
    url = platform_url
    python = add_runtime(url, "core.python", "Python", ["python", "python3"], versions=["3.11.2", "3.12.1"])
    shell = add_runtime(url, "core.shell", "Shell", ["shell", "bash", "sh"])
    add_worker(url, "w-eu", labels={"zone": "eu"}, versions={"python": ["3.11.2"]})
    add_worker(url, "w-us", labels={"zone": "us", "disk": "ssd"}, versions={"python": ["3.12.4"]})
    add_worker(url, "w-gpu", labels={"zone": "eu", "gpu": "yes"}, taints=[{"key": "gpu", "effect": "no_schedule"}],
               versions={"python": ["3.11.9"]})
    add_sensor(url, "demo.timer", python, "core.python", params={"interval": 5})
    add_sensor(url, "demo.off", python, "core.python", enabled=False)
    add_sensor(url, "demo.norule", python, "core.python", rules_enabled=(False,))
    add_sensor(url, "demo.internal", python, "core.python", entrypoint="internal://timer")
    add_sensor(url, "demo.sh", shell, "core.shell", entrypoint="watch.sh", selector={"zone": "us"})
    add_sensor(url, "demo.gpu", python, "core.python", selector={"gpu": "yes"},
               tolerations=[{"key": "gpu", "operator": "exists"}])
    # the platform's toleration needs the taint's key: an empty one tolerates nothing
    add_sensor(url, "demo.nokey", python, "core.python", selector={"gpu": "yes"},
               tolerations=[{"key": "", "operator": "exists"}])
    add_sensor(url, "demo.affine", python, "core.python",
               affinity={"required": [{"match_expressions": [{"key": "zone", "operator": "in", "values": ["us"]}]}]})
    add_sensor(url, "demo.anti", python, "core.python",
               affinity={"anti_affinity": [{"match_labels": {"zone": "eu"}}]})
    add_sensor(url, "demo.prefers", python, "core.python",
               affinity={"preferred": [{"weight": 10, "preference": {"match_labels": {"zone": "eu"}}},
                                       {"weight": 50, "preference": {"match_expressions": [
                                           {"key": "disk", "operator": "exists"}]}}]})
    add_sensor(url, "demo.new", python, "core.python", constraint=">=3.12")
    add_sensor(url, "demo.ancient", python, "core.python", constraint="<3")
    # a manual placement of a sensor the platform does not know is kept
    assert run_cli("place", "ext.one", "--runtime", "shell",
                   env={"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"}).returncode == 0

    # a row another program wrote with a keyless toleration: under the platform's rule it
    # tolerates no taint, so the only worker its selector matches (tainted) cannot take it
    query(url, "INSERT INTO attune_sensor.assignment (sensor_ref, runtime, selector, tolerations) VALUES "
               "('ext.keyless', 'python', '{\"gpu\": \"yes\"}', '[{\"key\": \"\", \"operator\": \"exists\"}]')")

    result = sync(url)
    assert result.returncode == 0, result.stderr
    assert placed(url).pop("ext.keyless") == (None, "manual")
    query(url, "DELETE FROM attune_sensor.assignment WHERE sensor_ref = 'ext.keyless'")
    assert "not placed demo.ancient: no available version of its runtime matches runtime_version_constraint '<3'" \
        in result.stdout
    assert "warning demo.nokey: worker_tolerations key must be non-empty" in result.stdout
    found = placed(url)
    assert found.pop("ext.one")[1] == "manual"
    assert {ref for ref in found} == {"demo.timer", "demo.sh", "demo.gpu", "demo.nokey", "demo.affine", "demo.anti",
                                      "demo.prefers", "demo.new"}
    assert all(origin == "platform" for _, origin in found.values())
    assert found["demo.sh"][0] == "w-us"
    assert found["demo.gpu"][0] == "w-gpu"
    assert found["demo.nokey"][0] is None  # pending: its only match is tainted
    assert found["demo.affine"][0] == "w-us"
    assert found["demo.anti"][0] == "w-us"
    assert found["demo.prefers"][0] == "w-us"  # weight 50 (disk) over 10 (zone eu)
    assert found["demo.new"][0] == "w-us"  # the only worker with a 3.12
    assert found["demo.timer"][0] in ("w-eu", "w-us")
    row = query(url, "SELECT runtime, entrypoint, triggers FROM attune_sensor.assignment WHERE sensor_ref = 'demo.timer'")
    rule_id = query(url, "SELECT id FROM rule WHERE ref = 'demo.r_timer_0'")[0][0]
    assert row == [("python", "demo/sensors/s.py", [{"id": rule_id, "ref": "demo.r_timer_0", "config": {"interval": 5}}])]
    assert "8 platform sensor(s) runnable: 8 added, 0 changed, 0 removed, 1 not placeable, 0 held by manual " \
           "placements; 7 placed, " \
           "2 pending" in result.stdout  # demo.nokey and ext.keyless

    # the platform changes its mind: a rule disabled, a sensor disabled, a selector changed
    query(url, "UPDATE rule SET enabled = false WHERE ref = 'demo.r_timer_0'")
    query(url, "UPDATE sensor SET enabled = false WHERE ref = 'demo.gpu'")
    query(url, "UPDATE sensor SET worker_selector = '{\"zone\": \"eu\"}' WHERE ref = 'demo.sh'")
    again = sync(url)
    assert again.returncode == 0, again.stderr
    assert "removed demo.timer" in again.stdout and "removed demo.gpu" in again.stdout
    assert "changed demo.sh" in again.stdout and "released demo.sh from w-us" in again.stdout
    found = placed(url)
    assert "demo.timer" not in found and "demo.gpu" not in found and found["ext.one"][1] == "manual"
    assert found["demo.sh"][0] in ("w-eu", "w-gpu") or found["demo.sh"][0] is None
    assert found["demo.sh"][0] != "w-gpu"  # tainted, not tolerated
    # nothing changed: a pass changes nothing
    assert "0 added, 0 changed, 0 removed" in sync(url).stdout


def test_place_and_unplace_leave_the_platforms_sensors_to_its_rows(platform_url):
    url = platform_url
    env = {"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"}
    python = add_runtime(url, "core.python", "Python", ["python", "python3"])
    add_sensor(url, "demo.owned", python, "core.python")
    add_sensor(url, "demo.idle", python, "core.python", enabled=False)
    add_worker(url, "w-1")
    for ref in ("demo.owned", "demo.idle"):
        refused = run_cli("place", ref, "--runtime", "python", env=env)
        assert refused.returncode == 2 and "is one of the platform's" in refused.stderr, refused.stderr
    assert sync(url).returncode == 0
    refused = run_cli("unplace", "demo.owned", env=env)
    assert refused.returncode == 2 and "is one of the platform's" in refused.stderr
    assert placed(url)["demo.owned"] == ("w-1", "platform")
    # the platform's sensor removed from its table: sync removes the placement
    query(url, "DELETE FROM sensor WHERE ref = 'demo.owned'")
    out = sync(url).stdout
    assert "removed demo.owned" in out and "demo.owned" not in placed(url)


def test_a_manual_placement_of_a_sensor_the_platform_comes_to_know_is_kept_until_unplaced(platform_url):
    """The sync never rewrites or deletes a manual placement (it cannot tell a daemon host's
    word from the platform's); it says so, and `unplace` hands the sensor to the platform's rules."""
    url = platform_url
    env = {"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"}
    add_worker(url, "w-1")
    assert run_cli("place", "demo.late", "--runtime", "python", "--entrypoint", "x/y.py", env=env).returncode == 0
    python = add_runtime(url, "core.python", "Python", ["python"])
    add_sensor(url, "demo.late", python, "core.python")
    out = sync(url).stdout
    assert "manual placement kept demo.late" in out and "1 held by manual placements" in out
    assert query(url, "SELECT origin, entrypoint, worker_id IS NOT NULL FROM attune_sensor.assignment") == \
        [("manual", "x/y.py", True)]
    assert run_cli("unplace", "demo.late", env=env).returncode == 0
    assert "added demo.late" in sync(url).stdout
    assert query(url, "SELECT origin, entrypoint, worker_id IS NOT NULL FROM attune_sensor.assignment") == \
        [("platform", "demo/sensors/s.py", True)]


def test_the_daemon_role_deletes_platform_placements_only_through_the_sync_function(platform_url):
    """Least privilege: attune_sensor_daemon has no DELETE on assignments; the sync function
    deletes only those of origin `platform`, and PUBLIC may not run it."""
    grants = query(platform_url, "SELECT has_table_privilege('attune_sensor_daemon', 'attune_sensor.assignment', "
                                 "'DELETE'), has_function_privilege('attune_sensor_daemon', "
                                 "'attune_sensor.sync_platform_sensors(jsonb, text[], text, bigint)', 'EXECUTE'), "
                                 "has_function_privilege('public', "
                                 "'attune_sensor.sync_platform_sensors(jsonb, text[], text, bigint)', 'EXECUTE')")
    assert grants == [(False, True, False)]
    query(platform_url, "INSERT INTO attune_sensor.assignment (sensor_ref, runtime) VALUES ('ext.m', 'python')")
    query(platform_url, "INSERT INTO attune_sensor.assignment (sensor_ref, runtime, origin) "
                        "VALUES ('old.p', 'python', 'platform')")
    query(platform_url, "UPDATE attune_sensor.sync_gate SET pass_token = 'pass-1'")
    changes = query(platform_url, "SET ROLE attune_sensor_daemon; "
                                  "SELECT * FROM attune_sensor.sync_platform_sensors('[]', '{}', 'pass-1', 1)")
    assert changes == [("old.p", "removed")]
    assert query(platform_url, "SELECT sensor_ref FROM attune_sensor.assignment") == [("ext.m",)]


def test_sync_says_plainly_where_there_is_nothing_to_sync(spec_db_url):
    result = run_cli("sync", env={"DATABASE_URL": spec_db_url, "ATTUNE_CONFIG": "/dev/null"})
    assert result.returncode == 1 and "no platform sensors to place" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- the rules' SQL against a transcription of the platform's scheduling.rs -------------------


def _term_matches(labels, term):
    """scheduling::selector_term_matches, transcribed."""
    if any(labels.get(k) != v for k, v in term.get("match_labels", {}).items()):
        return False
    for e in term.get("match_expressions", []):
        value = labels.get(e["key"])
        ok = {"in": value is not None and value in e["values"],
              "not_in": value is None or value not in e["values"],
              "exists": e["key"] in labels, "does_not_exist": e["key"] not in labels}[e["operator"]]
        if not ok:
            return False
    return True


def _allows(labels, affinity):
    required = affinity.get("required", [])
    return ((not required or any(_term_matches(labels, t) for t in required))
            and not any(_term_matches(labels, t) for t in affinity.get("anti_affinity", [])))


def _score(labels, affinity):
    return sum(p["weight"] for p in affinity.get("preferred", []) if _term_matches(labels, p["preference"]))


def _random_term(rng):
    keys, values = ["zone", "gpu", "disk"], ["a", "b", "c"]
    term = {"match_labels": {k: rng.choice(values) for k in rng.sample(keys, rng.randint(0, 2))},
            "match_expressions": []}
    for _ in range(rng.randint(0, 2)):
        operator = rng.choice(rules.EXPRESSION_OPERATORS)
        term["match_expressions"].append({"key": rng.choice(keys), "operator": operator,
                                          "values": rng.sample(values, rng.randint(1, 2))
                                          if operator in ("in", "not_in") else []})
    return term


def test_the_affinity_sql_answers_as_the_platforms_rust_does(spec_db_url):
    rng = random.Random(16)
    cases = []
    for _ in range(400):
        labels = {k: rng.choice(["a", "b", "c"]) for k in rng.sample(["zone", "gpu", "disk"], rng.randint(0, 3))}
        affinity = rules.parse_affinity({
            "required": [_random_term(rng) for _ in range(rng.randint(0, 2))],
            "anti_affinity": [_random_term(rng) for _ in range(rng.randint(0, 1))],
            "preferred": [{"weight": rng.randint(1, 100), "preference": _random_term(rng)}
                          for _ in range(rng.randint(0, 2))]}) or {}
        cases.append({"labels": labels, "affinity": affinity})
    rows = query(spec_db_url, "SELECT attune_sensor.affinity_allows(c -> 'labels', c -> 'affinity'), "
                              "attune_sensor.affinity_score(c -> 'labels', c -> 'affinity') "
                              "FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS t(c, n) ORDER BY n",
                 (json.dumps(cases),))
    expected = [(_allows(c["labels"], c["affinity"]), _score(c["labels"], c["affinity"])) for c in cases]
    assert rows == expected
    assert {allowed for allowed, _ in expected} == {True, False}  # the corpus reaches both answers


VERSIONS = ["3.12.1", "3.12", "3", "v3.12.1", "V2.0", " 3.11.2 ", "3.12.1-beta.1", "3.12.1+build.5", "1.2.3.4",
            "01.2.3", "3.x", "", "abc", "3.12.1-", "3..1", "10.20.30", "3.12.1-rc.1+b", "v", "2.0.0-alpha.01"]


def test_the_version_key_sql_parses_versions_as_the_platform_does(spec_db_url):
    rows = query(spec_db_url, "SELECT attune_sensor.version_key(v) FROM unnest(%s::text[]) WITH ORDINALITY AS t(v, n) "
                              "ORDER BY n", (VERSIONS,))
    assert [r[0] for r in rows] == [rules.version_key(v) for v in VERSIONS]
    assert rules.version_key("v3.12.1") == "3.12" and rules.version_key("3.x") is None


def test_offers_version_follows_runtime_versions_then_detected_interpreters(spec_db_url):
    want = {"names": ["python"], "accept": ["3.12"]}
    cases = [({"runtime_versions": {"python": ["3.12.4"]}}, True),
             ({"runtime_versions": {"python": ["3.11.2"]}}, False),
             ({"runtime_versions": {"node": ["20.1.0"]}}, True),  # none for python: every registered one
             ({"detected_interpreters": [{"name": "python3", "version": "3.12.0"}]}, True),
             ({"detected_interpreters": [{"name": "Python", "version": "3.10.0"}]}, False),
             ({"runtime_versions": {"python": ["3.12.1"]},
               "detected_interpreters": [{"name": "python", "version": "3.10.0"}]}, True),
             ({}, True)]
    rows = query(spec_db_url, "SELECT attune_sensor.offers_version(c, %s::jsonb) FROM jsonb_array_elements(%s::jsonb) "
                              "WITH ORDINALITY AS t(c, n) ORDER BY n",
                 (json.dumps(want), json.dumps([c for c, _ in cases])))
    assert [r[0] for r in rows] == [expected for _, expected in cases]


def test_the_rules_read_values_as_the_platform_does():
    # version_matching.rs's own examples
    def matches(version, constraint):
        return rules.matches(rules.parse_version(version), rules.parse_constraint(constraint))
    assert matches("3.12.1", ">=3.12") and not matches("3.11.0", ">=3.12")
    assert matches("3.12.5", ">=3.12,<4.0") and not matches("4.0.0", ">=3.12,<4.0")
    assert matches("3.12.5", "~3.12") and not matches("3.13.0", "~3.12")
    assert matches("3.15.0", "^3.12") and not matches("4.0.0", "^3.12")
    assert matches("3.12.7", "3.12") and not matches("3.13.0", "3.12")
    assert matches("0.2.5", "^0.2.3") and not matches("0.3.0", "^0.2.3")
    assert not matches("3.13.0-rc.1", ">=3.12")  # a pre-release only where a comparator names one
    assert rules.versions_for(">=3.11", ["3.10.4", "3.11.2", "3.12", "junk"]) == ["3.11", "3.12"]
    assert rules.versions_for(None, []) is None
    with pytest.raises(rules.RuleError, match="no registered versions"):
        rules.versions_for(">=3", [])
    with pytest.raises(rules.RuleError, match="invalid runtime_version_constraint"):
        rules.versions_for("!!3", ["3.1"])
    # scheduling.rs's validation: what the platform refuses, and so reads as its default
    for bad in ({"preferred": [{"weight": 101, "preference": {}}]},
                {"required": [{"match_expressions": [{"key": "k", "operator": "exists", "values": ["x"]}]}]},
                {"required": [{"match_labels": {"zone": " "}}]}):
        with pytest.raises(rules.RuleError):
            rules.parse_affinity(bad)
    with pytest.raises(rules.RuleError):
        rules.parse_tolerations([{"key": "gpu", "operator": "equal", "value": " "}])
    with pytest.raises(rules.RuleError):
        rules.parse_selector({"zone": 1})
    assert rules.parse_tolerations([{"key": "gpu"}]) == [{"key": "gpu", "operator": "equal"}]
    assert rules.runtime_kind(rules.runtime_names("Node.js", ["nodejs"])) == "node"


# --- a real daemon: finds the platform's sensor, runs it, stops it when the platform does ---------

SENSOR = """\
import json, os, time
with open({out!r}, "w") as f:
    json.dump(dict(os.environ), f)
while True:
    time.sleep(0.2)
"""


def test_a_daemon_runs_the_platforms_sensor_by_itself_and_stops_it_when_its_rule_is_disabled(
        cluster, attune_templates, tmp_path):
    url = attune_database(cluster, attune_templates("fixture"))
    out = tmp_path / "seen.json"
    base = tmp_path / "packs"
    (base / "demo" / "sensors").mkdir(parents=True)
    (base / "demo" / "sensors" / "watch.py").write_text(SENSOR.format(out=str(out)))
    python = add_runtime(url, "core.python", "Python", ["python", "python3"])
    sensor_id = add_sensor(url, "demo.watch", python, "core.python", entrypoint="watch.py",
                           params={"path": "/var/log"})
    token = tmp_path / "token"
    token.write_text("tok-9\n")
    token.chmod(0o600)
    config = write_config(tmp_path, {"database": {"url": url}, "packs_base_dir": str(base),
                                     "api": {"url": "http://api.example:8080", "token_file": str(token)},
                                     "sensor": {"worker_name": "sensor-plat", "heartbeat_interval": 1,
                                                "sensor_timeout": 2}})
    daemon = Daemon(config, {"ATTUNE_SENSOR_RUNTIMES": "python"})
    try:
        daemon.wait_for_line("platform sensors synced: 1 runnable; 1 added", timeout=30)
        env = json.loads(wait_for(lambda: out.exists() and out.read_text(), 30, what="the sensor's environment"))
        rule_id = query(url, "SELECT id FROM rule WHERE ref = 'demo.r_watch_0'")[0][0]
        assert json.loads(env["ATTUNE_SENSOR_TRIGGERS"]) == [{"id": rule_id, "ref": "demo.r_watch_0",
                                                              "config": {"path": "/var/log"}}]
        assert env["ATTUNE_SENSOR_ID"] == str(sensor_id) and env["ATTUNE_SENSOR_REF"] == "demo.watch"
        pid = query(url, "SELECT pid FROM sensor_process WHERE sensor_ref = 'demo.watch'")
        assert pid and pid[0][0]
        query(url, "UPDATE rule SET enabled = false WHERE ref = 'demo.r_watch_0'")
        daemon.wait_for_line("removed)", timeout=30)
        daemon.wait_for_line("released sensor demo.watch", timeout=30)
        assert "demo.watch" not in placed(url)
    finally:
        daemon.stop()


def test_hostile_platform_rows_cost_only_their_own_sensor(platform_url):
    url = platform_url
    python = add_runtime(url, "core.python", "Python", ["python"])
    add_worker(url, "w-1", capacity=10)
    deep = "[" * 5000 + "]" * 5000
    add_sensor(url, "demo.fine", python, "core.python")
    add_sensor(url, "demo.deep", python, "core.python")
    query(url, f"UPDATE sensor SET worker_affinity = '{deep}' WHERE ref = 'demo.deep'")
    add_sensor(url, "demo.deepparams", python, "core.python", params={"x": 1})
    query(url, f"UPDATE rule SET trigger_params = '{deep}' WHERE ref = 'demo.r_deepparams_0'")
    add_sensor(url, "demo.huge", python, "core.python", params={"blob": "x" * 200_000})
    add_sensor(url, "demo.nopack", python, "core.python")
    query(url, "UPDATE sensor SET pack_ref = NULL WHERE ref = 'demo.nopack'")
    add_sensor(url, "demo.escape", python, "core.python", entrypoint="../../../etc/cron.daily/x")
    result = sync(url)
    assert result.returncode == 0, result.stderr
    assert "not placed demo.deep: worker_affinity is nested too deeply to read" in result.stdout
    assert "not placed demo.huge: its trigger instances (ATTUNE_SENSOR_TRIGGERS) are over 131072 bytes" in result.stdout
    assert "not placed demo.nopack: it has no pack_ref" in result.stdout
    assert "not placed demo.escape: its script" in result.stdout and "'..'" in result.stdout
    found = placed(url)
    assert set(found) == {"demo.fine", "demo.deepparams"} and found["demo.fine"][0] == "w-1"
    # the rule's parameters go to the sensor as PostgreSQL wrote them, never parsed on the way
    assert query(url, "SELECT octet_length(triggers::text) > 10000 FROM attune_sensor.assignment "
                      "WHERE sensor_ref = 'demo.deepparams'") == [(True,)]


def test_a_value_nested_too_deeply_is_a_database_error_not_a_crash(spec_db_url):
    """Any program may write a row: a JSON value deeper than Python's parser recurses comes out of
    every statement as a DatabaseError (the daemon's loop logs it and goes on), never a
    RecursionError that ends the process."""
    from attune_sensor.db import Database
    from attune_sensor.errors import DatabaseError

    db = Database(spec_db_url)
    try:
        with pytest.raises(DatabaseError, match="nested too deeply"):
            db.execute("SELECT %s::jsonb", ("[" * 5000 + "]" * 5000,))
        assert db.execute("SELECT '[[1]]'::jsonb, '{\"a\": 1}'::json") == [([[1]], {"a": 1})]
    finally:
        db.close()


def test_a_pass_whose_gate_was_taken_by_a_newer_one_writes_nothing_more(platform_url):
    """Each of a pass's writes carries the token its claim set: once `attune-sensor sync` (or a
    pass after the spacing) claimed the gate, an older pass still writing is refused."""
    url = platform_url
    query(url, "UPDATE attune_sensor.sync_gate SET pass_token = 'older'")
    python = add_runtime(url, "core.python", "Python", ["python"])
    add_sensor(url, "demo.one", python, "core.python")
    assert sync(url).returncode == 0  # the newer pass
    entry = json.dumps([{"sensor_ref": "demo.two", "runtime": "python"}])
    with pytest.raises(Exception, match="another sync pass took over"):
        query(url, "SELECT * FROM attune_sensor.sync_platform_sensors(%s::jsonb, NULL, 'older', 1)", (entry,))
    assert set(placed(url)) == {"demo.one"}


def test_the_platforms_sensors_go_only_to_workers_of_this_version(platform_url):
    """During a rolling upgrade a daemon of an earlier version would run a platform sensor
    without its trigger instances: the walk passes it by, and a placement written by its own
    (older) rule is skipped by the schema's guard."""
    url = platform_url
    python = add_runtime(url, "core.python", "Python", ["python"])
    add_worker(url, "w-old", capacity=10, schema_version=None)
    add_sensor(url, "demo.one", python, "core.python")
    out = sync(url).stdout
    assert "added demo.one" in out and placed(url)["demo.one"] == (None, "platform")
    old_id = query(url, "SELECT id FROM worker WHERE name = 'w-old'")[0][0]
    query(url, "UPDATE attune_sensor.assignment SET worker_id = %s WHERE sensor_ref = 'demo.one'", (old_id,))
    assert placed(url)["demo.one"] == (None, "platform")  # the earlier version's write, skipped
    add_worker(url, "w-new", capacity=10)
    sync(url)
    assert placed(url)["demo.one"] == ("w-new", "platform")
