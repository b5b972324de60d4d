-- The spec's migration: sensor workers share the worker table, told apart by worker_role.
-- Rows that exist before this migration are action workers.

DO $$
BEGIN
    IF to_regtype('worker_role_enum') IS NULL THEN
        CREATE TYPE worker_role_enum AS ENUM ('action', 'sensor', 'hybrid');
    END IF;
END
$$;

-- The default fills existing rows in the same statement; dropping it afterwards matches the
-- spec's schema, where every writer names its role.
ALTER TABLE worker ADD COLUMN IF NOT EXISTS worker_role worker_role_enum NOT NULL DEFAULT 'action';
ALTER TABLE worker ALTER COLUMN worker_role DROP DEFAULT;
