-- A claim carries the changes' bodies only when asked: light events (and changes that are recorded but not
-- published) need the type, id and version alone, so a claim for them leaves the bodies, most of what it
-- would return, in the table.
--
-- The five-argument function of earlier versions stays, as a call of this one with the bodies, for a
-- process of an earlier version still running against this database.

CREATE FUNCTION fhir_pubsub_claim_batches(completed_ids bigint[], completed_seqs bigint[], publishing_through bigint,
                                          batch_size integer, max_batches integer, with_bodies boolean)
RETURNS TABLE (batch_id bigint, seq bigint, txid bigint, resource_type text, resource_id text, version_id text,
               change_type text, body text, recorded_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    chunk bigint[];
BEGIN
    LOCK TABLE publish_batches IN EXCLUSIVE MODE;
    IF cardinality(completed_ids) > 0 THEN
        DELETE FROM pending_changes WHERE seq = ANY (completed_seqs);
        DELETE FROM publish_batches WHERE id = ANY (completed_ids);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM publish_batches WHERE id > publishing_through) THEN
        -- One insert per batch, in publishing order, so that batch ids follow that order.
        FOR chunk IN
            SELECT array_agg(o.seq ORDER BY o.pos)
            FROM (SELECT p.seq, row_number() OVER (ORDER BY p.group_end, p.seq) - 1 AS pos
                  FROM (SELECT seq, max(seq) OVER (PARTITION BY txid) AS group_end
                        FROM pending_changes
                        -- An anti-join on the held seqs (a hash of them), not a scan of every batch per row.
                        WHERE seq NOT IN (SELECT unnest(b.seqs) FROM publish_batches b)
                        ORDER BY group_end, seq
                        LIMIT batch_size::bigint * max_batches) p) o
            GROUP BY o.pos / batch_size
            ORDER BY o.pos / batch_size
        LOOP
            INSERT INTO publish_batches (seqs) VALUES (chunk);
        END LOOP;
    END IF;
    RETURN QUERY
        SELECT b.id, u.seq, v.txid::text::bigint, v.resource_type, v.resource_id, v.version_id, v.change_type,
               CASE WHEN with_bodies THEN v.body END, v.recorded_at
        FROM publish_batches b
        CROSS JOIN LATERAL unnest(b.seqs) WITH ORDINALITY AS u(seq, ord)
        -- One index probe per claimed seq (OFFSET 0 keeps the planner from flattening it).
        LEFT JOIN LATERAL (SELECT * FROM resource_versions WHERE seq = u.seq OFFSET 0) v ON true
        WHERE b.id > publishing_through
        ORDER BY b.id, u.ord;
END
$$;

CREATE OR REPLACE FUNCTION fhir_pubsub_claim_batches(completed_ids bigint[], completed_seqs bigint[], publishing_through bigint,
                                          batch_size integer, max_batches integer)
RETURNS TABLE (batch_id bigint, seq bigint, txid bigint, resource_type text, resource_id text, version_id text,
               change_type text, body text, recorded_at timestamptz)
LANGUAGE sql AS $$
    SELECT * FROM fhir_pubsub_claim_batches(completed_ids, completed_seqs, publishing_through, batch_size, max_batches, true)
$$;
