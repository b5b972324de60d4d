-- A group role with exactly what daemons and the read-side commands need: no DDL, no DELETE.
-- Give it to each host's login role:
--     CREATE ROLE sensor01 LOGIN PASSWORD '...' IN ROLE attune_sensor_daemon;
-- `migrate run` keeps needing the schema owner. Creating a role needs CREATEROLE: a migrator
-- without it skips the role with a notice (a DBA can create it and run the grants below).

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'attune_sensor_daemon') THEN
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = current_user AND (rolcreaterole OR rolsuper)) THEN
            RAISE NOTICE 'role attune_sensor_daemon not created: % lacks CREATEROLE', current_user;
            RETURN;
        END IF;
        CREATE ROLE attune_sensor_daemon NOLOGIN;
    END IF;
    GRANT SELECT, INSERT, UPDATE ON worker TO attune_sensor_daemon;
    GRANT SELECT ON runtime, attune_sensor_migrations TO attune_sensor_daemon;
    GRANT USAGE ON SEQUENCE worker_id_seq TO attune_sensor_daemon;
    GRANT EXECUTE ON FUNCTION worker_heartbeat_interval(JSONB) TO attune_sensor_daemon;
END
$$;
