"""Second hostile review of own migration 6 (per-worker claims, attune_sensor.walk_start) and
the long-lived placer's periodic sync (SYNC_NEEDED_SQL / SYNC_NEW_SQL). Each test is a break a
user would notice, and fails on the code as reviewed (ce2c571)."""

from platform_db import add_worker, loads_by_worker
from support import query, run_cli


def test_a_walk_start_written_by_hand_is_set_back_by_the_next_placers_sync(db_url):
    """Found by a hostile review (fixed): docs/design.md ("Where the walk starts") says a start that is too high (a value
    written by hand, or one raised from a snapshot older than an operator's SQL) "costs balance
    until the next sync". Only the full recount sets it back (its INSERT fires the statement
    trigger); the sync every placer runs first and every 10 s (`attune-sensor place` at each
    call: SYNC_NEEDED_SQL, then SYNC_NEW_SQL only when a worker joined, left or changed capacity)
    never does, and a walk resets it only when it hides *every* worker. A start between two
    workers' ratios hides the empty worker: every `attune-sensor place` puts its sensor on the
    busier one, filling it, until some daemon happens to run a failover pass."""
    add_worker(db_url, "busy", capacity=10)
    add_worker(db_url, "empty", capacity=10)
    env = {"DATABASE_URL": db_url, "ATTUNE_CONFIG": "/dev/null"}
    for n in range(5):  # 0.5 on `busy`, 0 on `empty`
        query(db_url, "SET search_path TO public, attune; INSERT INTO attune_sensor.assignment "
                      "(sensor_ref, runtime, worker_id, assigned_at) SELECT %s, 'python', w.id, now() "
                      "FROM worker w WHERE w.name = 'busy'", (f"old.{n}",))
    assert run_cli("place", "first", "--runtime", "python", env=env).returncode == 0  # syncs, places on `empty`
    # too high a start, between the two rows
    query(db_url, "UPDATE attune_sensor.walk_start SET ratio = 0.3 WHERE runtime = 'python'")
    placed = []
    for n in range(4):
        result = run_cli("place", f"new.{n}", "--runtime", "python", env=env)
        assert result.returncode == 0, result.stderr
        placed.append(result.stdout.strip())
    loads = loads_by_worker(db_url)
    # least loaded first: `empty` (1 of 10) takes every one of them, `busy` stays at 5
    assert loads == {"busy": 5, "empty": 5}, (loads, placed)


def test_a_runtime_a_worker_adds_on_reload_is_offered_to_place(db_url):
    """Found by a hostile review (fixed): SYNC_NEEDED_SQL (asked before every periodic sync of a placer, `attune-sensor place`
    included) compares only worker ids and capacities, and SYNC_NEW_SQL adds rows only for a
    worker that has none at all. A worker that starts offering a runtime (its config's
    sensor.runtimes widened, `systemctl reload`: the row's capabilities change, its id stays)
    never gets a worker_load row for it from those syncs: `attune-sensor place --runtime node`
    keeps putting every node sensor on the one worker that offered node before, filling it,
    while the worker that now offers node too has room and no node sensor. Only a placement
    that finds no worker at all (the old one full) recounts."""
    add_worker(db_url, "node-old", runtimes=("node",), capacity=10)
    add_worker(db_url, "widened", runtimes=("python",), capacity=10)
    env = {"DATABASE_URL": db_url, "ATTUNE_CONFIG": "/dev/null"}
    first = run_cli("place", "n.0", "--runtime", "node", env=env)
    assert first.returncode == 0, first.stderr
    # the reload of `widened`: its daemon writes the new runtimes into the row (same id)
    query(db_url, "SET search_path TO public, attune; UPDATE worker SET capabilities = jsonb_set(capabilities, "
                  "'{runtimes}', '[\"python\", \"node\"]') WHERE name = 'widened'")
    for n in range(1, 7):
        result = run_cli("place", f"n.{n}", "--runtime", "node", env=env)
        assert result.returncode == 0, result.stderr
    loads = loads_by_worker(db_url)
    # 7 node sensors, least loaded first: `widened` takes its share (3 or 4), not none
    assert loads["widened"] >= 3, loads

