-- Not a versioned migration: run by every `migrate run` after the migrations, to restore what
-- attune-sensor derives and others may drop (the load index, its trigger, the one-row tables'
-- rows, the heartbeat's functions). Idempotent, and it keeps every row that is there (docs/operations.md, "Repair"). It
-- repeats definitions of migration 1 on purpose: a migration is history and never edited, this
-- file is the current state repaired to; a migration that changes one of these objects changes
-- it here too.
CREATE TABLE IF NOT EXISTS attune_sensor.worker_load (
    worker_id BIGINT NOT NULL,
    runtime TEXT NOT NULL,
    load INTEGER NOT NULL DEFAULT 0,
    capacity INTEGER NOT NULL DEFAULT 0,
    ratio FLOAT8 GENERATED ALWAYS AS
        (CASE WHEN capacity > 0 THEN load::float8 / capacity ELSE 'Infinity'::float8 END) STORED,
    PRIMARY KEY (worker_id, runtime)
);
CREATE INDEX IF NOT EXISTS worker_load_walk ON attune_sensor.worker_load (runtime, ratio, worker_id);
CREATE OR REPLACE FUNCTION attune_sensor.count_worker_load() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.worker_id IS NOT NULL THEN
        UPDATE attune_sensor.worker_load SET load = load - 1 WHERE worker_id = OLD.worker_id;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.worker_id IS NOT NULL THEN
        UPDATE attune_sensor.worker_load SET load = load + 1 WHERE worker_id = NEW.worker_id;
    END IF;
    RETURN NULL;
END $$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'count_worker_load'
                      AND tgrelid = 'attune_sensor.assignment'::regclass) THEN
        CREATE TRIGGER count_worker_load AFTER INSERT OR DELETE OR UPDATE OF worker_id ON attune_sensor.assignment
            FOR EACH ROW EXECUTE FUNCTION attune_sensor.count_worker_load();
        -- a counter that missed changes is rebuilt from the assignments by the next sync
        DELETE FROM attune_sensor.worker_load;
    END IF;
END $$;
INSERT INTO attune_sensor.reaper_gate DEFAULT VALUES ON CONFLICT DO NOTHING;
INSERT INTO attune_sensor.fleet_gauges DEFAULT VALUES ON CONFLICT DO NOTHING;
-- The heartbeat with its gated reaper and the stale rule it reaps by (migration 20261201000004,
-- which says why): without them every daemon's heartbeat fails.
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
