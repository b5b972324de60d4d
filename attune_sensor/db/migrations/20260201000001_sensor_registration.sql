-- What sensor registration needs from the worker table:
--   * unique names, so registration is one atomic INSERT ... ON CONFLICT (DESIGN.md decision 2)
--   * `updated` maintained by the database on every update
--   * indexes for the spec's queries, and none on last_heartbeat: heartbeats stay HOT updates
--     (DESIGN.md decision 4), helped by free space on each page (fillfactor)
--   * worker_heartbeat_interval(): each worker's own interval, for staleness (decision 8)

DO $$
DECLARE
    blocking TEXT;
BEGIN
    SELECT string_agg(format('%s (ids %s)', name, ids), '; ' ORDER BY name)
      INTO blocking
      FROM (SELECT name, string_agg(id::text, ', ' ORDER BY id) AS ids
              FROM worker GROUP BY name HAVING count(*) > 1) AS duplicated;
    IF blocking IS NOT NULL THEN
        RAISE EXCEPTION 'worker names must be unique, but these rows share a name: %', blocking
            USING HINT = 'rename or delete all but one row of each name, then run attune-sensor migrate run again';
    END IF;
END
$$;

CREATE UNIQUE INDEX IF NOT EXISTS worker_name_key ON worker (name);

-- The original schema indexed last_heartbeat; that index made every heartbeat a non-HOT update.
DROP INDEX IF EXISTS idx_worker_last_heartbeat;
DROP INDEX IF EXISTS worker_last_heartbeat_idx;

-- "active sensor workers", "stale workers", the monitoring query, the scheduler's query
CREATE INDEX IF NOT EXISTS worker_role_status_idx ON worker (worker_role, status);
-- capabilities->'runtimes' ? 'python'
CREATE INDEX IF NOT EXISTS worker_runtimes_idx ON worker USING gin ((capabilities -> 'runtimes'));

ALTER TABLE worker SET (fillfactor = 70);

CREATE OR REPLACE FUNCTION worker_touch_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated := now();
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS worker_touch_updated ON worker;
CREATE TRIGGER worker_touch_updated BEFORE UPDATE ON worker
    FOR EACH ROW EXECUTE FUNCTION worker_touch_updated();

-- A worker's own heartbeat interval in seconds, 30 when it did not record one (or recorded junk).
CREATE OR REPLACE FUNCTION worker_heartbeat_interval(capabilities JSONB) RETURNS DOUBLE PRECISION
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    -- nested CASE: unlike AND, it guarantees the cast only sees numbers
    SELECT CASE WHEN jsonb_typeof(capabilities -> 'heartbeat_interval') = 'number' THEN
        CASE WHEN (capabilities ->> 'heartbeat_interval')::double precision > 0
             THEN (capabilities ->> 'heartbeat_interval')::double precision
             ELSE 30 END
    ELSE 30 END
$$;
