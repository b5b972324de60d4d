-- attune-sensor's own schema, on both database flavours (never the platform's objects).
-- Adopts what earlier versions created "when missing" from Python: every statement keeps an
-- object that is already there, so a database that has them keeps its assignments.

CREATE SCHEMA IF NOT EXISTS attune_sensor;

-- The reaper's one-row gate: at most one stale scan per 10 s fleet-wide (fleet.GATED_REAP_CTES).
CREATE TABLE IF NOT EXISTS attune_sensor.reaper_gate (
    only_row BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_row),
    last_scan TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    scanned_by TEXT
);
INSERT INTO attune_sensor.reaper_gate DEFAULT VALUES ON CONFLICT DO NOTHING;

-- One row per sensor: worker_id NULL while pending (scheduler.py).
CREATE TABLE IF NOT EXISTS attune_sensor.assignment (
    sensor_ref TEXT PRIMARY KEY CHECK (length(sensor_ref) BETWEEN 1 AND 255),
    runtime TEXT NOT NULL,
    selector JSONB NOT NULL DEFAULT '{}',
    tolerations JSONB NOT NULL DEFAULT '[]',
    worker_id BIGINT,
    assigned_at TIMESTAMPTZ,
    created TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS assignment_by_worker ON attune_sensor.assignment (worker_id) WHERE worker_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS assignment_pending ON attune_sensor.assignment (created) WHERE worker_id IS NULL;

-- The order a placement walks the workers in: per live worker and runtime, its load ratio. Only
-- orders; capacity is checked against the assignments (docs/design.md, "Placement at scale").
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
DROP TRIGGER IF EXISTS count_worker_load ON attune_sensor.assignment;
CREATE TRIGGER count_worker_load AFTER INSERT OR DELETE OR UPDATE OF worker_id ON attune_sensor.assignment
    FOR EACH ROW EXECUTE FUNCTION attune_sensor.count_worker_load();

-- The fleet's gauges, recomputed by the first caller after 10 s (fleet.metrics).
CREATE TABLE IF NOT EXISTS attune_sensor.fleet_gauges (
    only_row BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_row),
    computed_at TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    multiplier FLOAT8,
    gauges JSONB
);
INSERT INTO attune_sensor.fleet_gauges DEFAULT VALUES ON CONFLICT DO NOTHING;
