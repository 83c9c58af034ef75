-- The resource store, its history, the change outbox and the command inbox.
--
-- resources          the current version of every live resource, body stored byte-for-byte as given.
-- resource_versions  every version ever written, plus a tombstone row per delete (body NULL), so versionIds
--                    are never reused. `seq` orders the versions of one resource in commit order (a writer
--                    holds the resource row's lock when the trigger takes the next seq), `txid` groups the
--                    rows of one transaction.
-- pending_changes    the outbox: one row per version not yet published. A row is visible exactly when its
--                    transaction committed, and is deleted only after the broker confirmed its event, so
--                    the publisher can never skip a committed change (see docs/design.md).
-- inbox              processed command messageIds and the response each produced.
--
-- Any SQL client may write `resources` directly: the trigger records the version and the pending change
-- for it as well, so its changes are published like the bridge's own.

CREATE TABLE resources (
    resource_type text NOT NULL,
    resource_id   text NOT NULL,
    version_id    text NOT NULL,
    last_updated  text NOT NULL,
    body          text NOT NULL,
    PRIMARY KEY (resource_type, resource_id)
);

CREATE TABLE resource_versions (
    seq           bigserial PRIMARY KEY,
    txid          xid8 NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    resource_type text NOT NULL,
    resource_id   text NOT NULL,
    version_id    text NOT NULL,
    change_type   text NOT NULL CHECK (change_type IN ('create', 'update', 'delete')),
    last_updated  text,
    body          text
);

-- A versionId is written once per resource; tombstones repeat the id of the version they removed.
CREATE UNIQUE INDEX resource_versions_unique_version
    ON resource_versions (resource_type, resource_id, version_id) WHERE change_type <> 'delete';

CREATE TABLE pending_changes (
    seq bigint PRIMARY KEY REFERENCES resource_versions (seq)
);

CREATE TABLE inbox (
    message_id   uuid PRIMARY KEY,
    message_type text NOT NULL,
    response     text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION fhir_pubsub_record_change() RETURNS trigger
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
    -- Delivered at commit, once per transaction: wakes the publisher without waiting for its poll.
    PERFORM pg_notify('fhir_pubsub_changes', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER resources_record_change
    AFTER INSERT OR UPDATE OR DELETE ON resources
    FOR EACH ROW EXECUTE FUNCTION fhir_pubsub_record_change();
