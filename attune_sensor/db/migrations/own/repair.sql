-- Not a versioned migration: run by every `migrate run` after the migrations, to restore what
-- attune-sensor derives and others may drop (the load index, its trigger, the one-row tables'
-- rows, the placement indexes). Idempotent, and it keeps every row that is there
-- (docs/operations.md, "Repair"); the functions of the idempotent migrations (4 and 5) are
-- restored by applying those files again (migrations._repair). It
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
INSERT INTO attune_sensor.sync_gate DEFAULT VALUES ON CONFLICT DO NOTHING;
-- the indexes placement reads through (migrations 1 and 2)
CREATE INDEX IF NOT EXISTS assignment_by_worker ON attune_sensor.assignment (worker_id) WHERE worker_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS assignment_pending ON attune_sensor.assignment (created) WHERE worker_id IS NULL;
CREATE INDEX IF NOT EXISTS assignment_handover ON attune_sensor.assignment (previous_worker_id)
    WHERE previous_worker_id IS NOT NULL;
