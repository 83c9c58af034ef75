-- The resource store, its history, the change outbox and the command inbox (see the PostgreSQL
-- migration for the role of each table). SQLite has one writer at a time, so `seq` is in commit order.
-- Any SQL client may write `resources` directly: the triggers record the version and the pending change.

CREATE TABLE resources (
    resource_type TEXT NOT NULL,
    resource_id   TEXT NOT NULL,
    version_id    TEXT NOT NULL,
    last_updated  TEXT NOT NULL,
    body          TEXT NOT NULL,
    PRIMARY KEY (resource_type, resource_id)
) WITHOUT ROWID;

CREATE TABLE resource_versions (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    txid          INTEGER NOT NULL DEFAULT 0,
    recorded_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    resource_type TEXT NOT NULL,
    resource_id   TEXT NOT NULL,
    version_id    TEXT NOT NULL,
    change_type   TEXT NOT NULL CHECK (change_type IN ('create', 'update', 'delete')),
    last_updated  TEXT,
    body          TEXT
);

CREATE UNIQUE INDEX resource_versions_unique_version
    ON resource_versions (resource_type, resource_id, version_id) WHERE change_type <> 'delete';

CREATE TABLE pending_changes (
    seq INTEGER PRIMARY KEY REFERENCES resource_versions (seq)
);

CREATE TABLE inbox (
    message_id   TEXT PRIMARY KEY,
    message_type TEXT NOT NULL,
    response     TEXT NOT NULL,
    received_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) WITHOUT ROWID;

CREATE TRIGGER resources_record_insert AFTER INSERT ON resources
BEGIN
    INSERT INTO resource_versions (resource_type, resource_id, version_id, change_type, last_updated, body)
    VALUES (NEW.resource_type, NEW.resource_id, NEW.version_id, 'create', NEW.last_updated, NEW.body);
    INSERT INTO pending_changes (seq) VALUES (last_insert_rowid());
END;

CREATE TRIGGER resources_refuse_rename BEFORE UPDATE ON resources
WHEN NEW.resource_type <> OLD.resource_type OR NEW.resource_id <> OLD.resource_id
BEGIN
    SELECT RAISE(ABORT, 'fhir-pubsub: a resource''s type and id cannot change; delete it and insert the new one');
END;

CREATE TRIGGER resources_record_update AFTER UPDATE ON resources
WHEN NOT (NEW.version_id = OLD.version_id AND NEW.body = OLD.body AND NEW.last_updated = OLD.last_updated)
BEGIN
    INSERT INTO resource_versions (resource_type, resource_id, version_id, change_type, last_updated, body)
    VALUES (NEW.resource_type, NEW.resource_id, NEW.version_id, 'update', NEW.last_updated, NEW.body);
    INSERT INTO pending_changes (seq) VALUES (last_insert_rowid());
END;

CREATE TRIGGER resources_record_delete AFTER DELETE ON resources
BEGIN
    INSERT INTO resource_versions (resource_type, resource_id, version_id, change_type, last_updated, body)
    VALUES (OLD.resource_type, OLD.resource_id, OLD.version_id, 'delete', NULL, NULL);
    INSERT INTO pending_changes (seq) VALUES (last_insert_rowid());
END;
