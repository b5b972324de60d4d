-- idempotent: `migrate run` applies this file again when one of its functions is missing (repair)
-- Concurrent `place` calls write to different workers at once (docs/design.md, "Placement at
-- scale", "A lock per worker"). Until now every placement held the one placement lock for its
-- walk, its insert and the insert's triggers: four placers on 10,000 workers queued on it, 1,763
-- placements a second. Now:
--
-- - `place` holds the placement lock in SHARED mode: any number of `place` calls run together,
--   and every other writer of placements (failover batches, rebalance, release, hand-over,
--   unplace, the load sync, the platform's sync) still holds it exclusively, alone;
-- - the walk claims the worker it stops at with a transaction-scoped lock of that worker, tried
--   first: a worker another placer is writing to is passed over for the next of the same rank,
--   so concurrent placers spread out instead of piling onto the least loaded one; when every
--   worker of the best rank is claimed, the placer waits for one (a lock wait PostgreSQL sees,
--   and breaks with a deadlock error if transactions placing crosswise make a cycle);
-- - under that lock, with a fresh snapshot, the worker must still have room and the load the
--   walk read: a worker that another placer wrote to since is walked again. Loads only grow
--   while `place` calls run together (everything that lowers one is exclusive), so the worker
--   chosen is the least loaded of those nobody else is writing to: the balance of the one lock.
--
-- Capacity is still counted from the assignments, by whoever holds the worker's lock; two
-- `place` calls of the same ref make one row, and the second reports where the first put it.

-- Where the walk for a runtime starts (docs/design.md, "Where the walk starts"): no live row of
-- worker_load for that runtime lies below this ratio. Every placement leaves the version of the
-- row it counted behind, below the new one in the walk's index, until a vacuum: at 100,000
-- placements a walk stepped over 299 index pages of them against 6 after a VACUUM. A placement
-- raises the start when the lowest live ratio has risen (once per load level, not per
-- placement); whatever puts a row of worker_load below it (a row added, a ratio lowered: a
-- sensor leaving a worker, a sync's recount, whichever version's code wrote it) sets it back to
-- -Infinity, by the triggers below. The rows are made by the syncs, which hold the placement
-- lock alone; a placement only updates one, and skips it when another placement holds it: no
-- placement ever waits for this table.
CREATE TABLE IF NOT EXISTS attune_sensor.walk_start (
    runtime TEXT PRIMARY KEY,
    ratio FLOAT8 NOT NULL
);
CREATE OR REPLACE FUNCTION attune_sensor.clear_walk_start() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE attune_sensor.walk_start SET ratio = '-Infinity' WHERE ratio > '-Infinity';
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS clear_walk_start_on_insert ON attune_sensor.worker_load;
CREATE TRIGGER clear_walk_start_on_insert AFTER INSERT ON attune_sensor.worker_load
    FOR EACH STATEMENT EXECUTE FUNCTION attune_sensor.clear_walk_start();
DROP TRIGGER IF EXISTS clear_walk_start_on_lower ON attune_sensor.worker_load;
CREATE TRIGGER clear_walk_start_on_lower AFTER UPDATE ON attune_sensor.worker_load
    FOR EACH ROW WHEN (NEW.ratio < OLD.ratio OR NEW.runtime IS DISTINCT FROM OLD.runtime)
    EXECUTE FUNCTION attune_sensor.clear_walk_start();

-- The lock of one worker's placements: a key of its own (two int4 halves, apart from every bigint
-- advisory key); two workers sharing a hash share a lock, which costs only waiting. `claim`
-- tries it; `await_claim` waits for it (a wait PostgreSQL sees, and whose cycles it breaks with
-- a deadlock error).
CREATE OR REPLACE FUNCTION attune_sensor.claim(worker_id BIGINT) RETURNS BOOLEAN
LANGUAGE sql VOLATILE AS $$
SELECT pg_try_advisory_xact_lock(1098151029, hashint8(worker_id))
$$;
CREATE OR REPLACE FUNCTION attune_sensor.await_claim(worker_id BIGINT) RETURNS VOID
LANGUAGE sql VOLATILE AS $$
SELECT pg_advisory_xact_lock(1098151029, hashint8(worker_id))  -- the key of attune_sensor.claim
$$;

-- The walk (as migration 5's choose_worker): worker_load's index for the runtime in ratio order,
-- from where the walk starts; the first eligible worker without an untolerated
-- prefer_no_schedule taint, else the first with one; with preferred affinity terms, every
-- eligible worker by score, then taint, then load. That order is the rule's: a worker of a
-- better rank (untainted before tainted, a higher score first) is never passed over for a worse
-- one. With `p_claim`, the first worker of the best rank that this transaction claims
-- (attune_sensor.claim, tried only once the worker passed the rule: the CASE keeps the planner
-- from trying it first), `claimed` true; when every worker of that rank is being written to by
-- other placements, the first of them, `claimed` false: the caller waits for it
-- (await_claim). A start that hid every worker (a value written by hand) is set back, and the
-- walk made again from the bottom. `ratio`: the worker's ratio as the walk read it.
CREATE OR REPLACE FUNCTION attune_sensor.claim_worker(p_runtime TEXT, p_selector JSONB, p_tolerations JSONB,
                                                      p_affinity JSONB, p_versions JSONB, p_multiplier FLOAT8,
                                                      p_claim BOOLEAN, OUT id BIGINT, OUT name TEXT,
                                                      OUT ratio FLOAT8, OUT claimed BOOLEAN)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    start FLOAT8 := coalesce((SELECT s.ratio FROM attune_sensor.walk_start AS s WHERE s.runtime = p_runtime),
                             '-Infinity');
    lowest FLOAT8;
    tainted BOOLEAN;
    trying BOOLEAN;
    rank_score BIGINT;
    rank_tainted BOOLEAN;
    held RECORD;
    candidate RECORD;
BEGIN
    claimed := false;
    LOOP
        IF jsonb_array_length(coalesce(p_affinity -> 'preferred', '[]'::jsonb)) = 0 THEN
            -- untainted, then tainted; each first tried with claims, then (when claiming found
            -- none) without, to learn whether workers of that rank are only being written to
            FOR step IN 1..4 LOOP
                tainted := step > 2;
                trying := p_claim AND step IN (1, 3);
                CONTINUE WHEN step IN (2, 4) AND NOT p_claim;
                SELECT c.id, c.name, l.ratio INTO id, name, ratio FROM attune_sensor.worker_load AS l
                 CROSS JOIN LATERAL (SELECT w.id, w.name FROM worker AS w
                                      WHERE w.id = l.worker_id
                                        AND CASE WHEN attune_sensor.eligible(w.id, w.worker_role::text, w.meta, w.status::text,
                                                                             w.last_heartbeat, w.capabilities,
                                                                             (to_jsonb(w) ->> 'cordoned')::boolean, p_runtime,
                                                                             p_selector, p_tolerations, p_affinity, p_versions,
                                                                             p_multiplier)
                                                       AND attune_sensor.penalized(w.capabilities, p_tolerations) = tainted
                                                 THEN NOT trying OR attune_sensor.claim(w.id) ELSE false END
                                     OFFSET 0) AS c
                 WHERE l.runtime = p_runtime AND l.ratio >= start
                 ORDER BY l.ratio, l.worker_id LIMIT 1;
                IF id IS NOT NULL THEN
                    claimed := trying;
                    EXIT;
                END IF;
            END LOOP;
        ELSE
            -- every eligible worker is scored before the first is known: claim in that order
            held := NULL;
            FOR candidate IN
                SELECT c.id, c.name, l.ratio, c.score, c.penalized FROM attune_sensor.worker_load AS l
                 CROSS JOIN LATERAL (SELECT w.id, w.name,
                                            attune_sensor.affinity_score(attune_sensor.worker_labels(w.capabilities),
                                                                         p_affinity) AS score,
                                            attune_sensor.penalized(w.capabilities, p_tolerations) AS penalized
                                       FROM worker AS w
                                      WHERE w.id = l.worker_id
                                        AND attune_sensor.eligible(w.id, w.worker_role::text, w.meta, w.status::text,
                                                                    w.last_heartbeat, w.capabilities,
                                                                    (to_jsonb(w) ->> 'cordoned')::boolean, p_runtime,
                                                                    p_selector, p_tolerations, p_affinity, p_versions,
                                                                    p_multiplier)
                                     OFFSET 0) AS c
                 WHERE l.runtime = p_runtime AND l.ratio >= start
                 ORDER BY c.score DESC, c.penalized, l.ratio, l.worker_id
            LOOP
                -- past the rank of a worker being written to: wait for that one
                EXIT WHEN held IS NOT NULL AND (candidate.score, candidate.penalized) IS DISTINCT FROM (rank_score, rank_tainted);
                IF NOT p_claim OR attune_sensor.claim(candidate.id) THEN
                    id := candidate.id;
                    name := candidate.name;
                    ratio := candidate.ratio;
                    claimed := p_claim;
                    EXIT;
                END IF;
                IF held IS NULL THEN
                    held := candidate;
                    rank_score := candidate.score;
                    rank_tainted := candidate.penalized;
                END IF;
            END LOOP;
            IF id IS NULL AND held IS NOT NULL THEN
                id := held.id;
                name := held.name;
                ratio := held.ratio;
            END IF;
        END IF;
        EXIT WHEN id IS NOT NULL OR start = '-Infinity';
        -- nothing from the start: walk again from the bottom, and set the start back if that finds one
        lowest := start;
        start := '-Infinity';
    END LOOP;
    IF id IS NULL THEN
        RETURN;
    END IF;
    IF lowest IS NOT NULL THEN
        PERFORM 1 FROM attune_sensor.walk_start AS s WHERE s.runtime = p_runtime FOR UPDATE SKIP LOCKED;
        IF FOUND THEN
            UPDATE attune_sensor.walk_start AS s SET ratio = '-Infinity' WHERE s.runtime = p_runtime;
        END IF;
    ELSIF ratio > start THEN
        -- the worker found lies above the start: the lowest live row may have risen (a load
        -- level filled up); within a level, nothing to look at
        lowest := (SELECT l.ratio FROM attune_sensor.worker_load AS l WHERE l.runtime = p_runtime AND l.ratio >= start
                    ORDER BY l.ratio LIMIT 1);
        IF lowest > start THEN
            -- SKIP LOCKED: another placement raising it at the same moment is left to do it
            PERFORM 1 FROM attune_sensor.walk_start AS s WHERE s.runtime = p_runtime AND s.ratio < lowest
                FOR UPDATE SKIP LOCKED;
            IF FOUND THEN
                UPDATE attune_sensor.walk_start AS s SET ratio = lowest WHERE s.runtime = p_runtime;
            END IF;
        END IF;
    END IF;
END $$;

-- Migration 5's walk, for the callers that hold the placement lock exclusively (place_queued):
-- nobody else writes, so there is nothing to claim.
CREATE OR REPLACE FUNCTION attune_sensor.choose_worker(p_runtime TEXT, p_selector JSONB, p_tolerations JSONB,
                                                       p_affinity JSONB, p_versions JSONB, p_multiplier FLOAT8)
RETURNS TABLE (id BIGINT, name TEXT) LANGUAGE sql VOLATILE AS $$
SELECT c.id, c.name
  FROM attune_sensor.claim_worker(p_runtime, p_selector, p_tolerations, p_affinity, p_versions, p_multiplier, false) AS c
 WHERE c.id IS NOT NULL
$$;

-- `attune-sensor place` (same contract as migration 5's): the sensor placed where the walk
-- claims a worker (pending when no worker may take it), or left as it is when placed already.
-- Returns the worker's name (where it is, if placed before) and, when it was placed before with
-- other settings, those settings (the caller refuses: unplace first). A placement of the
-- platform's sensors is refused: the sync pass owns it (docs/scheduling.md). Every round either
-- returns or follows another placement's progress (a claim it waited for, a write it saw).
CREATE OR REPLACE FUNCTION attune_sensor.place_sensor(p_ref TEXT, p_runtime TEXT, p_selector JSONB,
                                                      p_tolerations JSONB, p_entrypoint TEXT, p_env JSONB,
                                                      p_multiplier FLOAT8, p_lock BIGINT,
                                                      OUT worker_name TEXT, OUT placed_with JSONB)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    chosen RECORD;
    existing attune_sensor.assignment%ROWTYPE;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(p_lock);
    LOOP
        SELECT * INTO existing FROM attune_sensor.assignment WHERE sensor_ref = p_ref;
        IF FOUND AND existing.origin IS DISTINCT FROM 'manual' THEN
            RAISE EXCEPTION 'sensor % is placed by the sync of the platform''s sensors, not by place', p_ref
                  USING ERRCODE = 'object_in_use';
        END IF;
        IF FOUND AND existing.worker_id IS NOT NULL THEN
            SELECT w.name INTO worker_name FROM worker AS w WHERE w.id = existing.worker_id;
            IF (existing.runtime, existing.selector, existing.tolerations, existing.entrypoint, existing.env)
               IS DISTINCT FROM (p_runtime, p_selector, p_tolerations, p_entrypoint, p_env) THEN
                placed_with := jsonb_build_object('runtime', existing.runtime, 'selector', existing.selector,
                                                  'tolerations', existing.tolerations,
                                                  'entrypoint', existing.entrypoint, 'env', existing.env);
            END IF;
            RETURN;
        END IF;
        chosen := attune_sensor.claim_worker(p_runtime, p_selector, p_tolerations, '{}'::jsonb, NULL, p_multiplier, true);
        IF chosen.id IS NOT NULL AND NOT chosen.claimed THEN
            -- every worker of the best rank is being written to by another placement, which ends
            -- with its statement: wait for the first, then walk again
            PERFORM attune_sensor.await_claim(chosen.id);
            CONTINUE;
        ELSIF chosen.id IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM attune_sensor.worker_load AS l JOIN worker AS w ON w.id = l.worker_id
                               WHERE l.worker_id = chosen.id AND l.runtime = p_runtime AND l.ratio = chosen.ratio
                                 AND attune_sensor.has_room(w.id, w.capabilities)) THEN
            -- another placer wrote to it between the walk's snapshot and the claim: walk again
            CONTINUE;
        END IF;
        -- a pending row takes the new settings; a row placed meanwhile by a concurrent `place` of
        -- the same ref is left alone, and the next round reports it
        INSERT INTO attune_sensor.assignment AS a (sensor_ref, runtime, selector, tolerations, entrypoint, env,
                                                   worker_id, assigned_at, previous_worker_id)
        VALUES (p_ref, p_runtime, p_selector, p_tolerations, p_entrypoint, p_env, chosen.id,
                CASE WHEN chosen.id IS NOT NULL THEN now() END,
                -- only a sensor with a reported process may still run somewhere
                CASE WHEN EXISTS (SELECT 1 FROM attune_sensor.sensor_run AS r WHERE r.sensor_ref = p_ref)
                     THEN attune_sensor.still_running(p_ref, p_multiplier) END)
        ON CONFLICT (sensor_ref) DO UPDATE
           SET runtime = EXCLUDED.runtime, selector = EXCLUDED.selector, tolerations = EXCLUDED.tolerations,
               entrypoint = EXCLUDED.entrypoint, env = EXCLUDED.env, worker_id = EXCLUDED.worker_id,
               assigned_at = EXCLUDED.assigned_at
         WHERE a.worker_id IS NULL AND a.origin = 'manual';
        IF FOUND THEN
            worker_name := chosen.name;
            RETURN;
        END IF;
        -- not written: placed meanwhile by another `place` of the ref (the next round says where),
        -- or skipped by a trigger (it stays pending)
        EXIT WHEN NOT EXISTS (SELECT 1 FROM attune_sensor.assignment WHERE sensor_ref = p_ref AND worker_id IS NOT NULL);
    END LOOP;
END $$;

-- The origin guard (migration 5's function) only where it can refuse something: an insert that
-- names an origin other than 'manual', an update that changes it. A trigger whose WHEN is false
-- costs no call: every `place` paid one (about 5 % of a placement's server time).
DROP TRIGGER IF EXISTS guard_origin ON attune_sensor.assignment;
CREATE TRIGGER guard_origin BEFORE INSERT ON attune_sensor.assignment
    FOR EACH ROW WHEN (NEW.origin IS DISTINCT FROM 'manual') EXECUTE FUNCTION attune_sensor.guard_origin();
DROP TRIGGER IF EXISTS guard_origin_change ON attune_sensor.assignment;
CREATE TRIGGER guard_origin_change BEFORE UPDATE OF origin ON attune_sensor.assignment
    FOR EACH ROW WHEN (NEW.origin IS DISTINCT FROM OLD.origin) EXECUTE FUNCTION attune_sensor.guard_origin();

-- attune_sensor.still_running and a placement's check before it find a sensor's reported
-- processes by ref: without this index each placement read every report (one row per running
-- sensor of the fleet).
CREATE INDEX IF NOT EXISTS sensor_run_by_ref ON attune_sensor.sensor_run (sensor_ref);
