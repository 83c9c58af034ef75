-- Event batches claimed by the publisher and not yet confirmed by the broker.
--
-- Before publishing, the publisher records which outbox rows go into which event message. A batch is
-- published again, unchanged and with the same messageId, until the broker confirmed it; then its row and
-- its outbox rows are deleted in one transaction. So after a crash a consumer sees the very same message
-- again (and can drop it by messageId), never the same change inside a differently cut message.
--
-- publisher_lease elects one publisher among the processes sharing this file: the holder renews its lease
-- well before `expires_at` (Unix milliseconds); when it dies, another process takes the lease once it expired.

CREATE TABLE publish_batches (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    seqs       TEXT NOT NULL, -- JSON array of pending_changes.seq, in publishing order
    claimed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE publisher_lease (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    holder     TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
