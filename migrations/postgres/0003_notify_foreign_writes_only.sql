-- NOTIFY only for writes by other SQL clients.
--
-- PostgreSQL serialises the commits of transactions that issued NOTIFY on a server-wide lock. The bridge wakes
-- its own publisher in process, so its connections carry `fhir_pubsub.writer = bridge` and skip the notification;
-- any other writer still wakes the publisher at commit.

CREATE OR REPLACE FUNCTION fhir_pubsub_record_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    new_seq bigint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO resource_versions (resource_type, resource_id, version_id, change_type, last_updated, body)
        VALUES (NEW.resource_type, NEW.resource_id, NEW.version_id, 'create', NEW.last_updated, NEW.body)
        RETURNING seq INTO new_seq;
    ELSIF TG_OP = 'UPDATE' THEN
        IF NEW.resource_type <> OLD.resource_type OR NEW.resource_id <> OLD.resource_id THEN
            RAISE EXCEPTION 'fhir-pubsub: a resource''s type and id cannot change; delete it and insert the new one';
        END IF;
        IF NEW.version_id = OLD.version_id AND NEW.body = OLD.body AND NEW.last_updated = OLD.last_updated THEN
            RETURN NULL; -- nothing changed: no version, no event
        END IF;
        INSERT INTO resource_versions (resource_type, resource_id, version_id, change_type, last_updated, body)
        VALUES (NEW.resource_type, NEW.resource_id, NEW.version_id, 'update', NEW.last_updated, NEW.body)
        RETURNING seq INTO new_seq;
    ELSE
        INSERT INTO resource_versions (resource_type, resource_id, version_id, change_type, last_updated, body)
        VALUES (OLD.resource_type, OLD.resource_id, OLD.version_id, 'delete', NULL, NULL)
        RETURNING seq INTO new_seq;
    END IF;
    INSERT INTO pending_changes (seq) VALUES (new_seq);
    -- Delivered at commit, once per transaction: wakes the publisher without waiting for its poll. The bridge
    -- wakes its publisher itself and marks its connections, so its own commits skip NOTIFY (which serialises
    -- the commits of notifying transactions server-wide).
    IF current_setting('fhir_pubsub.writer', true) IS DISTINCT FROM 'bridge' THEN
        PERFORM pg_notify('fhir_pubsub_changes', '');
    END IF;
    RETURN NULL;
END
$$;
