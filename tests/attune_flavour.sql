-- An "Attune flavour" database for the tests: the worker table as the Attune platform's current
-- schema has it, written for this project from the facts the platform's migrations establish
-- (docs/design.md, "Two flavours"). Only what touches a sensor worker is here. The suite in
-- test_platform_schema.py runs against the platform's real migrations as well.
--
-- What it reproduces, because attune-sensor must live with each of these:
--   * everything in schema "attune"; nothing added to public
--   * worker_role_enum without 'hybrid'
--   * worker.name UNIQUE, status NOT NULL DEFAULT 'active', the cordon columns
--   * an index on last_heartbeat (heartbeats are not HOT until the operator opts in)
--   * a BEFORE UPDATE trigger maintaining "updated"
--   * worker_history and an AFTER trigger that writes it as the role making the change, for
--     every insert, delete, and update that changes more than last_heartbeat
--   * the view healthy_workers: active, heartbeat under 30 s old, health absent or tolerable

CREATE SCHEMA attune;
SET search_path TO attune, public;

CREATE TYPE worker_type_enum AS ENUM ('local', 'remote', 'container');
CREATE TYPE worker_role_enum AS ENUM ('action', 'sensor');
CREATE TYPE worker_status_enum AS ENUM ('active', 'inactive', 'busy', 'error');

CREATE TABLE identity (
    id BIGSERIAL PRIMARY KEY,
    login TEXT NOT NULL UNIQUE
);

CREATE TABLE runtime (
    id BIGSERIAL PRIMARY KEY,
    ref TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    aliases TEXT[] NOT NULL DEFAULT '{}'::text[],
    distributions JSONB NOT NULL,
    execution_config JSONB NOT NULL DEFAULT '{}'::jsonb
);

CREATE FUNCTION touch_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated := now();
    RETURN NEW;
END
$$;

CREATE TABLE worker (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    worker_type worker_type_enum NOT NULL,
    worker_role worker_role_enum NOT NULL,
    runtime BIGINT REFERENCES runtime (id) ON DELETE SET NULL,
    host TEXT,
    port INTEGER,
    status worker_status_enum NOT NULL DEFAULT 'active',
    capabilities JSONB,
    meta JSONB,
    last_heartbeat TIMESTAMPTZ,
    cordoned BOOLEAN NOT NULL DEFAULT false,
    cordon_reason TEXT,
    cordoned_by BIGINT REFERENCES identity (id) ON DELETE SET NULL,
    cordoned_at TIMESTAMPTZ,
    created TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX worker_by_name ON worker (name);
CREATE INDEX worker_by_type ON worker (worker_type);
CREATE INDEX worker_by_role ON worker (worker_role);
CREATE INDEX worker_by_runtime ON worker (runtime);
CREATE INDEX worker_by_status ON worker (status);
CREATE INDEX worker_by_last_heartbeat ON worker (last_heartbeat DESC) WHERE last_heartbeat IS NOT NULL;
CREATE INDEX worker_by_created ON worker (created DESC);
CREATE INDEX worker_by_status_role ON worker (status, worker_role);
CREATE INDEX worker_capabilities ON worker USING gin (capabilities);
CREATE INDEX worker_meta ON worker USING gin (meta);
CREATE INDEX worker_health ON worker USING gin ((capabilities -> 'health' -> 'status'));
CREATE INDEX worker_cordoned_only ON worker (cordoned) WHERE cordoned;
CREATE INDEX worker_by_role_cordon_status ON worker (worker_role, cordoned, status);

CREATE TRIGGER worker_touch BEFORE UPDATE ON worker
    FOR EACH ROW EXECUTE FUNCTION touch_updated();

CREATE TABLE worker_history (
    time TIMESTAMPTZ NOT NULL DEFAULT now(),
    operation TEXT NOT NULL,
    entity_id BIGINT NOT NULL,
    entity_ref TEXT,
    changed_fields TEXT[] NOT NULL DEFAULT '{}',
    old_values JSONB,
    new_values JSONB
);

-- Not SECURITY DEFINER, and its table name is unqualified: it runs as the writer, with the
-- writer's search_path, exactly as the platform's does.
CREATE FUNCTION keep_worker_history() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    before JSONB;
    after JSONB;
    changed TEXT[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO worker_history (operation, entity_id, entity_ref, new_values)
        VALUES ('INSERT', NEW.id, NEW.name, to_jsonb(NEW) - 'last_heartbeat' - 'created' - 'updated');
        RETURN NEW;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO worker_history (operation, entity_id, entity_ref, old_values)
        VALUES ('DELETE', OLD.id, OLD.name, to_jsonb(OLD));
        RETURN OLD;
    END IF;
    before := to_jsonb(OLD) - 'last_heartbeat' - 'updated';
    after := to_jsonb(NEW) - 'last_heartbeat' - 'updated';
    SELECT coalesce(array_agg(key ORDER BY key), '{}') INTO changed
      FROM jsonb_each(after) AS n (key, value)
     WHERE before -> key IS DISTINCT FROM value;
    IF cardinality(changed) > 0 THEN
        INSERT INTO worker_history (operation, entity_id, entity_ref, changed_fields, old_values, new_values)
        VALUES ('UPDATE', NEW.id, NEW.name, changed,
                (SELECT jsonb_object_agg(k, before -> k) FROM unnest(changed) AS k),
                (SELECT jsonb_object_agg(k, after -> k) FROM unnest(changed) AS k));
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER worker_history_writer AFTER INSERT OR UPDATE OR DELETE ON worker
    FOR EACH ROW EXECUTE FUNCTION keep_worker_history();

CREATE VIEW healthy_workers AS
SELECT w.id, w.name, w.worker_type, w.worker_role, w.status, w.capabilities, w.last_heartbeat
  FROM worker AS w
 WHERE w.status = 'active'
   AND w.last_heartbeat > now() - interval '30 seconds'
   AND (w.capabilities -> 'health' IS NULL
        OR w.capabilities -> 'health' ->> 'status' IN ('healthy', 'degraded'));

-- The platform's sensors and its record of their processes (what the runner reports into):
-- `sensor` with the columns a sensor worker reads, `sensor_process` as the platform has it,
-- one row per (sensor, worker), keyed both ways, removed with its worker or its sensor.
CREATE TYPE sensor_process_status_enum AS ENUM ('starting', 'running', 'stopped', 'failed', 'backoff');

CREATE TABLE sensor (
    id BIGSERIAL PRIMARY KEY,
    ref TEXT NOT NULL UNIQUE CHECK (ref = lower(ref) AND ref ~ '^[^.]+\.[^.]+$'),
    pack_ref TEXT,
    label TEXT NOT NULL,
    entrypoint TEXT NOT NULL,
    runtime BIGINT NOT NULL REFERENCES runtime(id) ON DELETE CASCADE,
    runtime_ref TEXT NOT NULL,
    enabled BOOLEAN NOT NULL,
    worker_selector JSONB NOT NULL DEFAULT '{}'::jsonb,
    worker_tolerations JSONB NOT NULL DEFAULT '[]'::jsonb,
    worker_affinity JSONB NOT NULL DEFAULT '{}'::jsonb,
    runtime_version_constraint TEXT,
    created TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- What makes a sensor runnable for the platform: an enabled rule on one of its triggers
-- (trigger.sensor), whose trigger_params reach the sensor in ATTUNE_SENSOR_TRIGGERS; and the
-- registered versions of its runtime, for runtime_version_constraint.
CREATE TABLE trigger (
    id BIGSERIAL PRIMARY KEY,
    ref TEXT NOT NULL UNIQUE CHECK (ref = lower(ref) AND ref ~ '^[^.]+\.[^.]+$'),
    pack_ref TEXT,
    label TEXT NOT NULL,
    enabled BOOLEAN NOT NULL DEFAULT TRUE,
    sensor BIGINT REFERENCES sensor(id) ON DELETE SET NULL,
    sensor_ref TEXT,
    created TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE rule (
    id BIGSERIAL PRIMARY KEY,
    ref TEXT NOT NULL UNIQUE CHECK (ref = lower(ref) AND ref ~ '^[^.]+\.[^.]+$'),
    pack_ref TEXT NOT NULL,
    label TEXT NOT NULL,
    action_ref TEXT NOT NULL,
    trigger BIGINT REFERENCES trigger(id) ON DELETE SET NULL,
    trigger_ref TEXT NOT NULL,
    trigger_params JSONB DEFAULT '{}'::jsonb,
    enabled BOOLEAN NOT NULL,
    created TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE runtime_version (
    id BIGSERIAL PRIMARY KEY,
    runtime BIGINT NOT NULL REFERENCES runtime(id) ON DELETE CASCADE,
    runtime_ref TEXT NOT NULL,
    version TEXT NOT NULL,
    is_default BOOLEAN NOT NULL DEFAULT FALSE,
    available BOOLEAN NOT NULL DEFAULT TRUE,
    UNIQUE (runtime, version)
);

CREATE TABLE sensor_process (
    id BIGSERIAL PRIMARY KEY,
    sensor BIGINT NOT NULL REFERENCES sensor(id) ON DELETE CASCADE,
    sensor_ref TEXT NOT NULL,
    worker BIGINT NOT NULL REFERENCES worker(id) ON DELETE CASCADE,
    worker_name TEXT NOT NULL,
    status sensor_process_status_enum NOT NULL DEFAULT 'starting',
    pid INTEGER CHECK (pid IS NULL OR pid > 0),
    consecutive_failures INTEGER NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0),
    last_exit_code INTEGER,
    last_signal INTEGER,
    last_started_at TIMESTAMPTZ,
    last_stopped_at TIMESTAMPTZ,
    next_restart_at TIMESTAMPTZ,
    stderr_excerpt TEXT,
    meta JSONB NOT NULL DEFAULT '{}'::jsonb,
    created TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX ux_sensor_process_sensor_worker ON sensor_process (sensor, worker);
CREATE UNIQUE INDEX ux_sensor_process_sensor_ref_worker_name ON sensor_process (sensor_ref, worker_name);
CREATE TRIGGER sensor_process_touch BEFORE UPDATE ON sensor_process
    FOR EACH ROW EXECUTE FUNCTION touch_updated();
