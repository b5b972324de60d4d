"""Hostile review of own migration 6 (placement_worker_locks): `place` in shared mode with a
per-worker claim, attune_sensor.walk_start, the placer's periodic SYNC_NEW_SQL. Each test is a
break a user would notice; each fails on the code as it was reviewed."""

import subprocess
import sys
import threading
import time

import psycopg2
import pytest

from attune_sensor.db import Database, schema
from attune_sensor.placement.scheduler import PLACEMENT_LOCK_KEY, NoEligibleWorker, Scheduler
from attune_sensor.fleet import CAPACITY, PLACED_SENSORS, STALE_EXPR
from platform_db import add_worker, loads_by_worker
from support import base_env, query, run_cli

SEARCH_PATH = "SELECT set_config('search_path', 'public, attune', false)"


def where(url, ref):
    rows = query(url, "SET search_path TO public, attune; SELECT w.name FROM attune_sensor.assignment a "
                      "LEFT JOIN worker w ON w.id = a.worker_id WHERE a.sensor_ref = %s", (ref,))
    return rows[0][0] if rows else "(no row)"


def scheduler_for(url):
    db = Database(url, statement_timeout=20.0)
    return Scheduler(db, schema.attach(db)), db


def place_or_why(scheduler, ref, runtime="python", **kw):
    try:
        return scheduler.place(ref, runtime, **kw)
    except NoEligibleWorker as exc:
        return f"pending: {exc}"
    except Exception as exc:  # noqa: BLE001 - what the caller would see
        return f"error: {type(exc).__name__}: {exc}"


def terminate_placers(url):
    """Ends the server backends still running place_sensor (this test's own, on its own
    throwaway database), so that a hang found does not outlive the test."""
    query(url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
               "AND pid <> pg_backend_pid() AND query LIKE '%%place_sensor%%'")


PLACER = ("import sys\nfrom attune_sensor import config\nfrom attune_sensor.db import Database, schema\n"
          "from attune_sensor.placement.scheduler import Scheduler, NoEligibleWorker\n"
          "cfg = config.load(None, {'DATABASE_URL': sys.argv[1], 'ATTUNE_CONFIG': '/dev/null'})\n"
          "db = Database.from_config(cfg); s = Scheduler(db, schema.attach(db)); p = int(sys.argv[2])\n")


def run_placers(url, count, body, timeout=120):
    placers = [subprocess.Popen([sys.executable, "-c", PLACER + body, url, str(p)], env=base_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in range(count)]
    outputs = []
    try:
        for p in placers:
            outputs.append(p.communicate(timeout=timeout))
    finally:
        for p in placers:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in placers), [err for _, err in outputs]
    return [tuple(line.split()) for out, _ in outputs for line in out.splitlines()]


# --- 1. prefer_no_schedule is no longer "only when no untainted worker has room" -------------


def test_concurrent_placers_leave_a_prefer_no_schedule_worker_alone_while_an_untainted_one_has_room(db_url):
    """Found by a hostile review (fixed): the walk passes over a worker another placer holds the claim of and takes the
    next one, even when that next one is only in the walk's second branch (an untolerated
    prefer_no_schedule taint). docs/scheduling.md: a spot host with spot:prefer_no_schedule
    "takes sensors only when no untainted worker has room". With several `place` calls at once,
    sensors land on the spot host while the untainted worker has plenty of room."""
    add_worker(db_url, "steady", capacity=1000)
    add_worker(db_url, "spot", capacity=1000, taints=[{"key": "spot", "effect": "prefer_no_schedule"}])
    run_placers(db_url, 8, "for i in range(40): s.place(f's.{p}.{i}', 'python')\n")
    loads = loads_by_worker(db_url)
    assert loads == {"steady": 320, "spot": 0}, loads


def test_a_placer_waits_for_the_untainted_worker_another_is_writing_to_rather_than_take_the_spot_host(db_url):
    """Finding (deterministic form of the one above): while another `place` holds the claim of
    the only untainted worker (mid-write, not committed), `place` does not wait for it as it
    does when every eligible worker is claimed: it writes the sensor onto the prefer_no_schedule
    worker at once, although the untainted one has 999 places left."""
    add_worker(db_url, "steady", capacity=1000)
    add_worker(db_url, "spot", capacity=1000, taints=[{"key": "spot", "effect": "prefer_no_schedule"}])
    scheduler, db = scheduler_for(db_url)
    scheduler.sync()
    other = psycopg2.connect(db_url)
    outcome = []
    placing = threading.Thread(target=lambda: outcome.append(place_or_why(scheduler, "s.new")))
    try:
        cursor = other.cursor()
        cursor.execute(SEARCH_PATH)
        # another `place` mid-write: the shared placement lock and the claim of `steady`
        cursor.execute("SELECT pg_advisory_xact_lock_shared(%s), attune_sensor.claim(w.id) FROM worker w "
                       "WHERE w.name = 'steady'", (PLACEMENT_LOCK_KEY,))
        assert cursor.fetchone()[1] is True
        placing.start()
        time.sleep(1.0)  # it may wait for the other placement: that one ends now
    finally:
        other.rollback()
        other.close()
        placing.join(30)
        db.close()
    assert outcome == ["steady"], outcome


# --- 2. a walk start above the rows is never set back ------------------------------------


@pytest.mark.parametrize("start", ["Infinity", "NaN"])
def test_a_walk_start_above_every_row_is_set_back_and_the_sensor_placed(db_url, start):
    """Found by a hostile review (fixed): a walk_start row above every worker_load row of its runtime (here 'Infinity'; NaN
    and any ratio above the fleet's do the same) hides every worker from every walk: `place`
    says the sensor is pending ("every eligible worker is full") on an empty fleet, and neither
    the retry sync `place` runs, nor a full `sync`, nor a failover pass (reconcile) sets it back:
    SYNC_SQL clears walk_start only when a worker_load row changed. The migration's promise "a
    placement that finds no worker syncs, which sets it back, and tries again" does not hold."""
    add_worker(db_url, "roomy", capacity=10)
    scheduler, db = scheduler_for(db_url)
    try:
        scheduler.sync()
        query(db_url, "UPDATE attune_sensor.walk_start SET ratio = %s::float8 WHERE runtime = 'python'", (start,))
        first = place_or_why(scheduler, "s.1")
        scheduler.sync()
        _, placed = scheduler.reconcile()
        second = place_or_why(scheduler, "s.2")
    finally:
        db.close()
    assert (first, placed, second) == ("roomy", {}, "roomy"), (first, placed, second)


def test_an_older_daemons_sync_in_a_rolling_upgrade_does_not_hide_a_joined_worker(db_url):
    """Found by a hostile review (fixed): docs/design.md promises an old daemon keeps working on a newer own schema
    (rolling upgrade: migrate first, then the hosts). A daemon of the previous version syncs
    worker_load with its own SYNC_SQL, which knows nothing of walk_start: a worker that joins
    gets its row (ratio 0) below the start the placements raised, and no walk sees it. The new
    version's syncs then find nothing to change, so they never set the start back: sensors stay
    pending, and failover passes place nothing, while the new worker is empty."""
    add_worker(db_url, "old-full", capacity=2)
    scheduler, db = scheduler_for(db_url)
    try:
        assert [scheduler.place(f"s.{n}", "python") for n in range(2)] == ["old-full", "old-full"]
        add_worker(db_url, "joined", capacity=10)
        # the previous version's sync (git show e397b1b:attune_sensor/placement/scheduler.py), as an
        # old daemon's failover pass runs it before placing
        old_sync = OLD_SYNC_SQL.format(load=PLACED_SENSORS, capacity=CAPACITY, stale=STALE_EXPR,
                                       roles="attune_sensor.placeable(w.worker_role::text, w.meta)",
                                       worker_load="attune_sensor.worker_load")
        query(db_url, "SET search_path TO public, attune; " + old_sync,
              {"lock": PLACEMENT_LOCK_KEY, "multiplier": 3.0})
        said = place_or_why(scheduler, "s.new")
        _, placed = scheduler.reconcile()  # a new daemon's failover pass: full sync, then the pending
    finally:
        db.close()
    assert where(db_url, "s.new") == "joined", (said, placed)


OLD_SYNC_SQL = """
SELECT pg_advisory_xact_lock(%(lock)s);
WITH workers AS (
    SELECT w.id, w.capabilities -> 'runtimes' AS runtimes, {load} AS load,
           CASE WHEN {capacity} BETWEEN 0 AND 1000000 THEN floor({capacity})::int ELSE 0 END AS capacity
      FROM worker AS w
     WHERE {roles} AND w.status = 'active' AND NOT {stale} AND jsonb_typeof(w.capabilities -> 'runtimes') = 'array'
), live AS (
    SELECT DISTINCT ON (id, runtime) id, runtime, capacity, load
      FROM workers CROSS JOIN jsonb_array_elements_text(runtimes) AS r(runtime)
), gone AS (
    DELETE FROM {worker_load} AS l
     WHERE NOT EXISTS (SELECT 1 FROM live WHERE live.id = l.worker_id AND live.runtime = l.runtime)
    RETURNING 1
), kept AS (
    INSERT INTO {worker_load} AS l (worker_id, runtime, capacity, load)
    SELECT id, runtime, capacity, load FROM live
    ON CONFLICT (worker_id, runtime) DO UPDATE SET capacity = EXCLUDED.capacity, load = EXCLUDED.load
     WHERE (l.capacity, l.load) IS DISTINCT FROM (EXCLUDED.capacity, EXCLUDED.load)
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM kept)
"""


# --- 3. place of a pending platform placement loops forever in the server ------------------


def test_place_of_a_platform_placement_is_refused_at_once_and_leaves_nothing_running(db_url):
    """Found by a hostile review (fixed): place_sensor now loops until its INSERT ... ON CONFLICT DO UPDATE writes a row.
    For a pending placement of origin 'platform' whose settings (here the platform's version
    rule: {platform: true}) the chosen worker fails, the trigger guard_platform_placement skips
    the update, FOUND is false, and the loop walks to the same worker again, forever, without
    even the 1 ms sleep: `place` (the documented Python API; the CLI too once the platform's
    sensor row is gone and the next sync pass has not removed the placement yet) never answers,
    and the server backend keeps spinning after the client gave up, holding the placement lock
    in shared mode, so every failover pass, sync and unplace then waits behind it."""
    add_worker(db_url, "older-daemon", capacity=10, schema_version=None)  # an earlier version's daemon
    query(db_url, "INSERT INTO attune_sensor.assignment (sensor_ref, runtime, origin, versions) "
                  "VALUES ('pack.poll', 'python', 'platform', '{\"platform\": true}')")
    scheduler, db = scheduler_for(db_url)
    db.statement_timeout = 10.0
    scheduler.sync()
    try:
        said = place_or_why(scheduler, "pack.poll")
        time.sleep(1.0)
        spinning = query(db_url, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                 "AND state = 'active' AND query LIKE '%%place_sensor%%' "
                                 "AND pid <> pg_backend_pid()")[0][0]
    finally:
        db.close()
        terminate_placers(db_url)
    # what a caller gets: a refusal at once (the platform's sync pass owns that placement, as the
    # CLI says), and nothing left running in the server
    assert ("placed by the sync of the platform's sensors" in said, spinning) == (True, 0), \
        f"place said {said!r}; {spinning} backend(s) still running place_sensor after the caller gave up"


# --- 4. two transactions placing sensors wait for each other forever ----------------------


def test_two_transactions_placing_crosswise_end_with_a_deadlock_error_not_a_hang(db_url):
    """Found by a hostile review (fixed): a claim is held to the end of the transaction, and a `place` that finds every
    eligible worker claimed sleeps 1 ms and tries again, holding no lock PostgreSQL could see
    it wait for. Two sessions each placing sensors in one explicit transaction (a provisioning
    script: BEGIN; place_sensor(...) x N; COMMIT) that each need the worker the other claimed
    wait for each other forever: no deadlock error, no progress, and the shared placement lock
    they hold keeps every failover pass, sync and unplace of the fleet waiting too. Under the one
    exclusive lock (migration 5) the second session simply waited for the first."""
    add_worker(db_url, "py", runtimes=("python",), capacity=10)
    add_worker(db_url, "node", runtimes=("node",), capacity=10)
    scheduler, db = scheduler_for(db_url)
    scheduler.sync()
    db.close()
    call = ("SELECT worker_name FROM attune_sensor.place_sensor(%s, %s, '{}'::jsonb, '[]'::jsonb, NULL, '{}'::jsonb, "
            "3.0, %s)")
    one, two = psycopg2.connect(db_url), psycopg2.connect(db_url)
    results = {}

    def second_place(name, conn, ref, runtime):
        try:
            with conn.cursor() as cursor:
                cursor.execute(call, (ref, runtime, PLACEMENT_LOCK_KEY))
                results[name] = cursor.fetchone()[0]
        except psycopg2.Error as exc:
            results[name] = f"error: {exc.pgcode}"

    threads = []
    try:
        for conn, ref, runtime in ((one, "a.py", "python"), (two, "b.node", "node")):
            with conn.cursor() as cursor:
                cursor.execute(SEARCH_PATH)
                cursor.execute("SET statement_timeout = '60s'")  # a bound for this test only
                cursor.execute(call, (ref, runtime, PLACEMENT_LOCK_KEY))
        threads = [threading.Thread(target=second_place, args=("one", one, "c.node", "node")),
                   threading.Thread(target=second_place, args=("two", two, "d.py", "python"))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(results) < 1:
            time.sleep(0.1)
        ended_in_time = dict(results)
    finally:
        terminate_placers(db_url)
        for thread in threads:
            thread.join(30)
        one.close()
        two.close()
    # at least one of them must end (placed, or PostgreSQL's deadlock error so it can retry)
    assert ended_in_time, "neither transaction's place_sensor ended within 15 s"


# --- 5. a raised capacity is never learnt by `place` ---------------------------------------


def test_place_learns_a_raised_capacity_at_its_next_sync(db_url):
    """Found by a hostile review (fixed): `place` now syncs worker_load with SYNC_NEW_SQL (rows for workers that joined
    only), where it ran the full recount before; a full sync comes only when a placement finds no
    worker at all. A worker whose max_concurrent_sensors was raised (a `systemctl reload` stores
    it in the row; its daemon's next survey runs no pass when nothing is pending) keeps its old
    capacity in the walk's order: `attune-sensor place` keeps alternating as if both had 10
    places, and fills the worker of 10 to its last place while the one of 100 is at a tenth."""
    add_worker(db_url, "big-now", capacity=10)
    add_worker(db_url, "small", capacity=10)
    env = {"DATABASE_URL": db_url, "ATTUNE_CONFIG": "/dev/null"}
    assert run_cli("place", "s.0", "--runtime", "python", env=env).returncode == 0
    query(db_url, "SET search_path TO public, attune; UPDATE worker SET capabilities = jsonb_set(capabilities, "
                  "'{max_concurrent_sensors}', '100') WHERE name = 'big-now'")
    for n in range(1, 20):
        result = run_cli("place", f"s.{n}", "--runtime", "python", env=env)
        assert result.returncode == 0, result.stderr
    loads = loads_by_worker(db_url)
    # least loaded first (placed / capacity): big-now takes nearly all of them
    assert loads["small"] <= 3, loads
