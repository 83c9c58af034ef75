-- Event batches claimed by the publisher and not yet confirmed by the broker.
--
-- Before publishing, the publisher records which outbox rows go into which event message. A batch is
-- published again, unchanged and with the same messageId, until the broker confirmed it; then its row and
-- its outbox rows are deleted in one transaction. So after a crash a consumer sees the very same message
-- again (and can drop it by messageId), never the same change inside a differently cut message.
--
-- Leadership among bridge processes is a session advisory lock, not a table: it is released the moment
-- the leader's connection ends, however the process died.

CREATE TABLE publish_batches (
    id         bigserial PRIMARY KEY,
    seqs       bigint[] NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now()
);
