-- The outbox carries the writing transaction's id, so the publisher orders it without joining the whole
-- version log: the window that groups one transaction's changes runs over the outbox alone.

ALTER TABLE pending_changes ADD COLUMN txid xid8;
UPDATE pending_changes p SET txid = v.txid FROM resource_versions v WHERE v.seq = p.seq;
-- The trigger inserts outbox rows inside the writing transaction: the default is that transaction's id.
ALTER TABLE pending_changes ALTER COLUMN txid SET DEFAULT pg_current_xact_id(), ALTER COLUMN txid SET NOT NULL;
