"""The reaper's rules kept twice, held together: the heartbeat's reap runs in the server as
attune_sensor.heartbeat() with the stale rule attune_sensor.is_stale() (own migration
20261201000004: plans cached per session), while the read side (`workers`, `metrics`, `check`,
placement) builds the same rule inline (schema.stale_condition, fleet.REAPED_ROLES), since it
must also work for a role without the own schema. A change to one that the other does not follow
fails here."""

import json

import pytest

from attune_sensor import config, fleet
from attune_sensor.db import Database, schema
from attune_sensor.worker.registration import SensorWorkerRegistration
from support import attune_database, query, spec_database

SEARCH_PATH = "SET search_path TO public, attune; "

# what any program may have written in a row's capabilities: every branch of the rule
CAPABILITIES = [
    None, {}, {"heartbeat_interval": 1}, {"heartbeat_interval": 0}, {"heartbeat_interval": -5},
    {"heartbeat_interval": 0.01}, {"heartbeat_interval": 1e300}, {"heartbeat_interval": "10"},
    {"heartbeat_interval": None}, {"heartbeat_interval": [1]}, {"heartbeat_interval": True},
    {"heartbeat_interval": 20, "stale_multiplier": 1}, {"heartbeat_interval": 20, "stale_multiplier": 1.5},
    {"heartbeat_interval": 20, "stale_multiplier": 10}, {"heartbeat_interval": 20, "stale_multiplier": 100},
    {"heartbeat_interval": 20, "stale_multiplier": 101}, {"heartbeat_interval": 20, "stale_multiplier": "9"},
    {"stale_multiplier": 50}, "[]", "7",
]
AGES = ["0", "2", "29", "31", "59", "61", "91", "200", "1000", "5000", "86400", "300000"]  # seconds
MULTIPLIERS = ["NULL", "1.5", "2", "3", "10"]


def test_the_servers_stale_rule_is_the_inline_one(db_url):
    values = ", ".join(f"('{json.dumps(c) if not isinstance(c, str) else c}'::jsonb)" for c in CAPABILITIES)
    for multiplier in MULTIPLIERS:
        rows = query(db_url, f"""
            SELECT w.capabilities::text, age,
                   attune_sensor.is_stale(w.last_heartbeat, w.capabilities, {multiplier}),
                   {schema.stale_condition("w", multiplier)}
              FROM (VALUES {values}) AS c(caps),
                   unnest(ARRAY[{", ".join(AGES)}]::float8[]) AS age,
                   LATERAL (SELECT c.caps AS capabilities,
                                   now() - make_interval(secs => age) AS last_heartbeat) AS w
             UNION ALL
            SELECT 'infinite', NULL, attune_sensor.is_stale(t, '{{}}', {multiplier}),
                   {schema.stale_condition("w", multiplier)}
              FROM unnest(ARRAY['infinity', '-infinity', NULL]::timestamptz[]) AS t,
                   LATERAL (SELECT t AS last_heartbeat, '{{}}'::jsonb AS capabilities) AS w""")
        assert len(rows) == len(CAPABILITIES) * len(AGES) + 3
        differ = [row for row in rows if row[2] is not row[3]]
        assert differ == [], multiplier
        assert any(row[2] for row in rows) and any(row[2] is False for row in rows)


def rows_for(url, roles):
    """Workers in every state the reap tells apart: role, meta (ours, the platform's, marked),
    status, stale or not."""
    metas = {"ours": '{"instance_id": "i"}', "platform": None, "marked": '{"reaped_at": "x", "reaped_by": "y"}',
             "scalar": '"text"', "other": '{"note": 1}'}
    made = []
    for role in roles:
        for meta_name, meta in metas.items():
            for status in ("active", "inactive"):
                for age in (1, 3600):
                    name = f"{role}-{meta_name}-{status}-{age}"
                    query(url, SEARCH_PATH + "INSERT INTO worker (name, worker_type, worker_role, host, status, "
                                             "capabilities, meta, last_heartbeat) VALUES (%s, 'local', %s, 'h', %s, "
                                             "'{\"heartbeat_interval\": 10}', %s::jsonb, now() - make_interval(secs => %s))",
                          (name, role, status, meta, age))
                    made.append(name)
    return made


@pytest.fixture(params=["spec", "attune-search_path", "attune-schema_only"])
def any_url(request, cluster, template_db):
    """Each flavour, and the platform's without its search_path setting (each statement then
    carries set_config('search_path', ...): the function finds the worker table through it)."""
    if request.param == "spec":
        return spec_database(cluster, template_db)
    return attune_database(cluster, request.getfixturevalue("attune_template"),
                           search_path=request.param == "attune-search_path")


def test_the_heartbeats_reap_marks_what_the_read_sides_rule_calls_reapable(any_url):
    url = any_url
    roles = [r[0] for r in query(url, SEARCH_PATH + "SELECT unnest(enum_range(NULL::worker_role_enum))::text")]
    rows_for(url, roles)
    expected = sorted(r[0] for r in query(url, SEARCH_PATH + f"SELECT w.name FROM worker AS w WHERE {fleet.REAPED_ROLES} "
                                                             f"AND w.status = 'active' AND "
                                                             f"{fleet.STALE_EXPR.replace('%(multiplier)s', '3')}"))
    assert expected and "sensor-platform-active-3600" not in expected and "sensor-ours-active-3600" in expected
    cfg = config.load(None, {"DATABASE_URL": url, "ATTUNE_CONFIG": "/dev/null"}).with_sensor(worker_name="reaper")
    db = Database.from_config(cfg)
    try:
        registration = SensorWorkerRegistration(db, cfg, ["shell"])
        schema.attach(db)
        registration.register()
        registration.reap_multiplier = 3.0
        query(url, "UPDATE attune_sensor.reaper_gate SET last_scan = '-infinity'")
        beat = registration.heartbeat()
    finally:
        db.close()
    assert beat.updated and sorted(name for _, name, _ in beat.reaped) == expected
    # every row that was active and is not any more, and nothing else, was marked
    marked = query(url, SEARCH_PATH + "SELECT name FROM worker WHERE status::text = 'inactive' "
                                      "AND name LIKE '%%-active-%%' ORDER BY 1")
    assert [m[0] for m in marked] == expected


# what any program may have written: every branch of the capacity rule and of the row's owner
CAPACITY_VALUES = [None, 0, 1, 12, 12.0, 12.5, -1, 1000000, 1000001, 1e400, "12", True, [3], {"n": 3}]
METAS = [None, {}, {"instance_id": "i"}, {"instance_id": 7}, {"reaped_at": "x"},
         {"reaped_at": "x", "reaped_by": "y", "note": 1}, "text", [1]]


def test_placements_capacity_and_rows_are_the_read_sides(db_url):
    """Placement's functions (own migration 20261201000005) against the inline rules `workers`,
    `metrics` and `check` use without the own schema (schema.capacity_of, fleet.PLACEABLE_ROLES)."""
    caps = [json.dumps({"max_concurrent_sensors": v}) if v != 1e400 else '{"max_concurrent_sensors": 1e400}'
            for v in CAPACITY_VALUES] + ['"scalar"', "[]"]
    rows = query(db_url, f"SELECT w.capabilities::text, attune_sensor.capacity(w.capabilities), {schema.capacity_of('w')} "
                         "FROM (SELECT c::jsonb AS capabilities FROM unnest(%s::text[]) AS c) AS w", (caps,))
    assert len(rows) == len(caps) and [r for r in rows if r[1] != r[2]] == []
    assert {r[1] for r in rows} >= {0, 1, 12, 1000000}
    metas = ["null" if m is None else json.dumps(m) for m in METAS]
    rows = query(db_url, f"SELECT w.worker_role, w.meta::text, attune_sensor.placeable(w.worker_role, w.meta), "
                         f"{fleet.PLACEABLE_ROLES} FROM (SELECT r AS worker_role, "
                         "CASE WHEN m = 'null' THEN NULL ELSE m::jsonb END AS meta "
                         "FROM unnest(ARRAY['sensor', 'hybrid', 'action']) AS r, unnest(%s::text[]) AS m) AS w",
                 (metas,))
    assert len(rows) == 3 * len(METAS) and [r for r in rows if r[2] is not r[3]] == []
    assert {r[2] for r in rows} == {True, False}
