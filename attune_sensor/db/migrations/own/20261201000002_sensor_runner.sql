-- Running what is placed (docs/scheduling.md, "Running sensors").

-- What the worker runs for a placement: a script under the host's packs_base_dir (NULL: nothing,
-- the placement is for an external runtime), and extra environment variables. Both are checked
-- again on the worker, which never trusts the database with what code it runs.
ALTER TABLE attune_sensor.assignment
    ADD COLUMN entrypoint TEXT CHECK (entrypoint IS NULL OR length(entrypoint) BETWEEN 1 AND 4096),
    ADD COLUMN env JSONB NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(env) = 'object'),
    -- A planned move (rebalance) from a live worker: the worker that may still run the sensor.
    -- The new worker starts it only once this is NULL (the old one stopped it and said so) or
    -- the old worker is stale, which it never is while its sensors run (docs/design.md,
    -- "At most one copy").
    ADD COLUMN previous_worker_id BIGINT;
CREATE INDEX assignment_handover ON attune_sensor.assignment (previous_worker_id)
    WHERE previous_worker_id IS NOT NULL;

-- Bounds on what anyone who may write an assignment can make a worker read: a sensor ref of
-- one printable line, a runtime name, an env of at most 64 short variables. NOT VALID: rows
-- made before are kept as they are (the worker bounds what it reads too: scheduler.MINE_SQL).
ALTER TABLE attune_sensor.assignment
    ADD CONSTRAINT assignment_ref_printable CHECK (sensor_ref !~ '[[:cntrl:]]') NOT VALID,
    ADD CONSTRAINT assignment_runtime_name CHECK (runtime ~ '^[a-z0-9][a-z0-9_.+-]{0,31}$') NOT VALID,
    ADD CONSTRAINT assignment_env_bounded CHECK (octet_length(env::text) <= 300000) NOT VALID;

-- Each worker's report of the sensor processes it supervises, written at its assignments
-- cadence (never on the heartbeat path); `assignments` and `check` read it.
CREATE TABLE attune_sensor.sensor_run (
    worker_id BIGINT NOT NULL,
    sensor_ref TEXT NOT NULL CHECK (length(sensor_ref) BETWEEN 1 AND 255),
    status TEXT NOT NULL CHECK (status IN ('starting', 'running', 'backoff', 'failed', 'stopping', 'waiting')),
    pid INTEGER CHECK (pid IS NULL OR pid > 0),
    consecutive_failures INTEGER NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0),
    last_exit_code INTEGER,
    last_signal INTEGER,
    next_restart_at TIMESTAMPTZ,
    detail TEXT CHECK (detail IS NULL OR length(detail) <= 4096),
    updated TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (worker_id, sensor_ref)
);
