"""Attune-flavour databases for the tests, from two sources:

* "fixture": tests/attune_flavour.sql, the project's own SQL written from the platform's facts,
  always available;
* "platform": the Attune platform's real migrations in ../shared/attune-schema (never copied
  into the project). Where that folder is absent the tests that need it are skipped with the
  reason, unless ATTUNE_SENSOR_REQUIRE_PLATFORM_SCHEMA=1 (CI sets it) makes them fail.
"""

import json
import os
from pathlib import Path

import psycopg2

from support import query, run_cli

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_SQL = Path(__file__).with_name("attune_flavour.sql")
PLATFORM_SCHEMA_DIR = Path(os.environ.get("ATTUNE_SCHEMA_DIR") or ROOT.parent / "shared" / "attune-schema")
REQUIRE_PLATFORM = os.environ.get("ATTUNE_SENSOR_REQUIRE_PLATFORM_SCHEMA") == "1"


def platform_migrations():
    """The platform's migration files in the order it applies them (by name)."""
    return sorted(PLATFORM_SCHEMA_DIR.glob("*.sql"))


def platform_missing_reason():
    if not platform_migrations():
        return f"the Attune platform's migrations are not at {PLATFORM_SCHEMA_DIR} (set ATTUNE_SCHEMA_DIR)"
    return None


def build(url, source):
    """Builds the Attune schema in the (empty) database at `url`, as its owner, the way the
    platform does: each file with search_path attune, public."""
    conn = psycopg2.connect(url)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            if source == "fixture":
                cursor.execute(FIXTURE_SQL.read_text())
                return
            for path in platform_migrations():
                cursor.execute("SET search_path TO attune, public")
                cursor.execute(path.read_text())
    finally:
        conn.close()


# --- the platform's rows, as its API or a pack installation writes them (tests of the sync pass) ---


def add_worker(url, name, runtimes=("python", "shell"), capacity=5, labels=None, taints=None, versions=None,
               schema_version=20261201000005):
    """A live sensor worker row as a daemon of this version writes it (`schema_version`: the own
    schema its code speaks, None for a daemon of an earlier version)."""
    capabilities = {"runtimes": list(runtimes), "max_concurrent_sensors": capacity, "heartbeat_interval": 30}
    if schema_version is not None:
        capabilities["attune_sensor_schema"] = schema_version
    if labels is not None:
        capabilities["labels"] = labels
    if taints is not None:
        capabilities["taints"] = taints
    if versions is not None:
        capabilities["runtime_versions"] = versions
    query(url, "INSERT INTO worker (name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat) "
               "VALUES (%s, 'local', 'sensor', %s, 'active', %s, '{}', now())", (name, name, json.dumps(capabilities)))


def add_runtime(url, ref, name, aliases, versions=()):
    runtime_id = query(url, "INSERT INTO runtime (ref, name, aliases, distributions) VALUES (%s, %s, %s, '{}') "
                            "RETURNING id", (ref, name, list(aliases)))[0][0]
    for version in versions:
        query(url, "INSERT INTO runtime_version (runtime, runtime_ref, version) VALUES (%s, %s, %s)",
              (runtime_id, ref, version))
    return runtime_id


def _pack(url, pack_ref):
    """The pack's id where the platform's schema has a pack table (its rule needs one)."""
    if not query(url, "SELECT to_regclass('pack') IS NOT NULL")[0][0]:
        return None
    query(url, "INSERT INTO pack (ref, label, version) VALUES (%s, %s, '1.0.0') ON CONFLICT (ref) DO NOTHING",
          (pack_ref, pack_ref))
    return query(url, "SELECT id FROM pack WHERE ref = %s", (pack_ref,))[0][0]


def add_sensor(url, ref, runtime_id, runtime_ref, entrypoint="s.py", enabled=True, rules_enabled=(True,),
               params=None, constraint=None, selector=None, tolerations=None, affinity=None):
    """A platform sensor with one trigger and a rule per entry of `rules_enabled`. Returns its id."""
    pack_ref, name = ref.split(".")
    pack_id = _pack(url, pack_ref)
    sensor_id = query(url, "INSERT INTO sensor (ref, pack_ref, label, entrypoint, runtime, runtime_ref, enabled, "
                           "runtime_version_constraint, worker_selector, worker_tolerations, worker_affinity) "
                           "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                      (ref, pack_ref, name, entrypoint, runtime_id, runtime_ref, enabled, constraint,
                       json.dumps(selector or {}), json.dumps(tolerations or []), json.dumps(affinity or {})))[0][0]
    trigger_id = query(url, "INSERT INTO trigger (ref, pack_ref, label, sensor, sensor_ref) VALUES (%s, %s, %s, %s, %s) "
                            "RETURNING id", (f"{pack_ref}.t_{name}", pack_ref, name, sensor_id, ref))[0][0]
    pack_column = ", pack" if pack_id is not None else ""
    pack_value = f", {int(pack_id)}" if pack_id is not None else ""
    for n, rule_enabled in enumerate(rules_enabled):
        query(url, f"INSERT INTO rule (ref, pack_ref, label, action_ref, trigger, trigger_ref, trigger_params, "
                   f"enabled{pack_column}) VALUES (%s, %s, %s, 'core.echo', %s, %s, %s, %s{pack_value})",
              (f"{pack_ref}.r_{name}_{n}", pack_ref, name, trigger_id, f"{pack_ref}.t_{name}",
               json.dumps(params if params is not None else {"n": n}), rule_enabled))
    return sensor_id


def sync(url):
    return run_cli("sync", env={"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"})


def loads_by_worker(url):
    """{worker name: sensors placed on it}, every worker listed."""
    return dict(query(url, "SELECT w.name, count(a.*) FROM worker w LEFT JOIN attune_sensor.assignment a "
                           "ON a.worker_id = w.id GROUP BY w.name"))


def placed(url):
    return {ref: (worker, origin) for ref, worker, origin in query(
        url, "SELECT a.sensor_ref, w.name, a.origin FROM attune_sensor.assignment a "
             "LEFT JOIN worker w ON w.id = a.worker_id")}
