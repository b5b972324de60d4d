-- Worker events: register, deregister and reap send NOTIFY attune_worker_events with a small
-- JSON payload, so `attune-sensor workers --watch` shows hosts come and go without polling.
-- The trigger's WHEN clause keeps plain heartbeats (same status, same owner) free of it.

CREATE OR REPLACE FUNCTION worker_notify_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    event TEXT;
BEGIN
    IF NEW.meta ->> 'reaped_at' IS DISTINCT FROM (CASE WHEN TG_OP = 'UPDATE' THEN OLD.meta ->> 'reaped_at' END)
       AND NEW.status <> 'active' THEN
        event := 'reaped';
    ELSIF NEW.status = 'active' THEN
        event := 'registered';
    ELSE
        event := 'deregistered';
    END IF;
    PERFORM pg_notify('attune_worker_events', json_build_object(
        'event', event, 'id', NEW.id, 'name', NEW.name, 'host', NEW.host,
        'role', NEW.worker_role, 'status', NEW.status, 'at', now(),
        'by', CASE WHEN event = 'reaped' THEN NEW.meta ->> 'reaped_by' END)::text);
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS worker_event_insert ON worker;
CREATE TRIGGER worker_event_insert AFTER INSERT ON worker
    FOR EACH ROW EXECUTE FUNCTION worker_notify_event();

DROP TRIGGER IF EXISTS worker_event_update ON worker;
CREATE TRIGGER worker_event_update AFTER UPDATE ON worker
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR OLD.meta ->> 'instance_id' IS DISTINCT FROM NEW.meta ->> 'instance_id')
    EXECUTE FUNCTION worker_notify_event();
