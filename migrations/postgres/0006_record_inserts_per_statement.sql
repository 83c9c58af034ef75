-- Inserts are recorded once per statement instead of once per row.
--
-- The row trigger runs its function for every inserted row: two single-row INSERTs planned and executed
-- inside PL/pgSQL each time, which is most of the work of a large plan of new resources. A statement
-- trigger with a transition table records all the rows of an INSERT with two set-wise INSERTs. The rows
-- are read in the order the statement inserted them, so the versions of one statement keep its order.
-- Updates and deletes keep the row trigger (an update compares each row with its previous version).

CREATE OR REPLACE FUNCTION fhir_pubsub_record_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    new_seq bigint;
BEGIN
    IF TG_OP = 'UPDATE' THEN
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

CREATE FUNCTION fhir_pubsub_record_inserts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    WITH recorded AS (
        INSERT INTO resource_versions (resource_type, resource_id, version_id, change_type, last_updated, body)
        SELECT resource_type, resource_id, version_id, 'create', last_updated, body FROM inserted
        RETURNING seq
    )
    INSERT INTO pending_changes (seq) SELECT seq FROM recorded;
    IF FOUND AND current_setting('fhir_pubsub.writer', true) IS DISTINCT FROM 'bridge' THEN
        PERFORM pg_notify('fhir_pubsub_changes', '');
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER resources_record_change ON resources;

CREATE TRIGGER resources_record_change
    AFTER UPDATE OR DELETE ON resources
    FOR EACH ROW EXECUTE FUNCTION fhir_pubsub_record_change();

CREATE TRIGGER resources_record_inserts
    AFTER INSERT ON resources
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION fhir_pubsub_record_inserts();
