-- idempotent: `migrate run` applies this file again when one of its functions is missing (repair)
-- The heartbeat that carries the fleet's reaper, and the stale rule it reaps by, as functions
-- the server keeps (docs/design.md, "Reaper" and "Staleness"). Sent as one statement, the
-- heartbeat with the reaper's CTEs was planned afresh at every beat: planning was most of its
-- server time. PL/pgSQL plans each statement of a function once per session and reuses the plan
-- (per server connection, so behind PgBouncer's transaction pooling too), and the statement the
-- daemon sends is a short call.
--
-- Both work on both flavours (the spec's worker table and the Attune platform's): the worker
-- table is named unqualified and found through the caller's search_path, which the daemon sets
-- in the same transaction when the connection's does not find it (db/schema.py); the plan
-- cache re-plans when that search_path differs. PL/pgSQL resolves names when a statement is
-- first run, not here, so creating them needs no worker table; every expression is valid on
-- both tables (roles and statuses compared as text or as literals of the column's own type).
-- SECURITY INVOKER (the default): the caller's own privileges apply, nothing is lent. OR REPLACE, as
-- migration 1 adopts: a schema whose bookkeeping was lost keeps its way through `migrate run`.

-- The stale rule (schema.stale_condition, the same expression for the read side, which must also
-- work without this schema): a worker is stale when its heartbeat is older than the greater of
-- the caller's multiplier and the one it recorded (1.5 to 100, else none) times the interval it
-- recorded (a number above 0 clamped to 0.1 .. 86400 s, else 30 s). Typed and bounded before any
-- cast: no row can make it raise. A one-expression SQL function, STABLE and not STRICT, so the
-- planner inlines it into the statement that calls it.
CREATE OR REPLACE FUNCTION attune_sensor.is_stale(beat TIMESTAMPTZ, caps JSONB, multiplier FLOAT8)
RETURNS BOOLEAN LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT beat < now() - make_interval(secs => greatest(multiplier,
         (CASE WHEN jsonb_typeof(caps -> 'stale_multiplier') IS DISTINCT FROM 'number' THEN NULL
               WHEN (caps -> 'stale_multiplier')::numeric BETWEEN 1.5 AND 100
               THEN (caps -> 'stale_multiplier')::numeric::float8 END))
       * (CASE WHEN jsonb_typeof(caps -> 'heartbeat_interval') IS DISTINCT FROM 'number' THEN 30
               WHEN (caps -> 'heartbeat_interval')::numeric <= 0 THEN 30
               ELSE least(greatest((caps -> 'heartbeat_interval')::numeric, 0.1), 86400)::float8 END))
$$;

-- One heartbeat of worker p_id, fenced by the xmin of our last write (docs/design.md,
-- "Fencing"), carrying the fleet's gated reaper (docs/design.md, "Reaper"):
-- 1. the one-row gate opens at most once per 10 s fleet-wide (a last_scan in the future counts
--    as expired: a clock stepped back must not stop reaping; the advisory lock keeps two
--    heartbeats of one instant from both opening it, without waiting);
-- 2. only the heartbeat that opened it marks the stale workers inactive (never its own row;
--    never the platform's own sensor rows, nor hybrid rows attune-sensor did not register);
-- 3. the beat: one HOT update by primary key (no index on last_heartbeat, fillfactor 70).
-- Returns the beat's new xmin and heartbeat (both NULL when the fence missed: someone else wrote
-- the row) and the workers it marked, [[id, name, host], ...], always, fence missed or not, for
-- the journal and their sensors' failover.
CREATE OR REPLACE FUNCTION attune_sensor.heartbeat(p_id BIGINT, p_fence XID, p_reaper TEXT, p_multiplier FLOAT8,
                                        OUT beat_xmin TEXT, OUT beat_at TIMESTAMPTZ, OUT reaped JSON)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    reaped := '[]';
    UPDATE attune_sensor.reaper_gate SET last_scan = now(), scanned_by = p_reaper
     WHERE CASE WHEN last_scan < now() - make_interval(secs => 10.0) OR last_scan > clock_timestamp()
                THEN pg_try_advisory_xact_lock(71968425864806) ELSE false END;
    IF FOUND THEN
        WITH marked AS (
            UPDATE worker AS w
               SET status = 'inactive',
                   meta = coalesce(w.meta, '{}'::jsonb) || jsonb_build_object(
                       'reaped_at', now(), 'reaped_by', p_reaper, 'reaped_last_heartbeat', w.last_heartbeat)
             WHERE w.id <> p_id
               AND ((w.worker_role::text = 'sensor'
                     AND NOT (w.worker_role::text = 'sensor'
                              AND NOT coalesce(jsonb_typeof(w.meta -> 'instance_id') = 'string', false)
                              AND (w.meta IS NULL OR CASE WHEN jsonb_typeof(w.meta) = 'object'
                                   THEN w.meta ? 'reaped_at' AND w.meta - ARRAY['reaped_at', 'reaped_by',
                                        'reaped_last_heartbeat']::text[] = '{}'::jsonb ELSE false END)))
                    OR (w.worker_role::text = 'hybrid'
                        AND coalesce(jsonb_typeof(w.meta -> 'instance_id') = 'string', false)))
               AND w.status = 'active'
               AND attune_sensor.is_stale(w.last_heartbeat, w.capabilities, p_multiplier)
            RETURNING w.id, w.name, w.host
        )
        SELECT coalesce(json_agg(json_build_array(id, name, host)), '[]') INTO reaped FROM marked;
    END IF;
    UPDATE worker SET last_heartbeat = now(), status = 'active'
     WHERE id = p_id AND xmin = p_fence
    RETURNING xmin::text, last_heartbeat INTO beat_xmin, beat_at;
END
$$;
