-- The worker schema as existing Attune deployments have it, before worker roles.
-- Safe on an empty database and on one where these objects already exist.

DO $$
BEGIN
    IF to_regtype('worker_type_enum') IS NULL THEN
        CREATE TYPE worker_type_enum AS ENUM ('local', 'remote', 'container');
    END IF;
    IF to_regtype('worker_status_enum') IS NULL THEN
        CREATE TYPE worker_status_enum AS ENUM ('active', 'inactive', 'busy', 'error');
    END IF;
END
$$;

CREATE TABLE IF NOT EXISTS runtime (
    id BIGSERIAL PRIMARY KEY,
    ref TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    created TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS worker (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL,
    worker_type worker_type_enum NOT NULL,
    runtime BIGINT REFERENCES runtime(id),
    host TEXT,
    port INTEGER,
    status worker_status_enum DEFAULT 'inactive',
    capabilities JSONB,
    meta JSONB,
    last_heartbeat TIMESTAMPTZ,
    created TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
