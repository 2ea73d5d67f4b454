-- Throughput, measured with `make bench` (issue 7): per applied transfer the worker
-- wrote four outbox rows and the relay updated each of them again, and every ledger
-- entry ran two foreign-key checks that lock the referenced rows.
--
-- 1. The outbox holds ONE row per worker transaction: `messages` is a JSON array of
--    {topic, partition, key, headers, payload} in the order they must go out. The
--    relay publishes a row's messages and marks the row once.
-- 2. A message the broker refuses for good is copied to `outbox_parked` with the
--    reason, so the rest of its row (and every row behind it) still goes out.
-- 3. ledger_entries drops its foreign keys: the worker writes an entry only in the
--    transaction that inserts its transfer and holds its card locked, and
--    `cardflow audit` checks that every entry has its transfer and its card.
--    The index by transfer_id goes too; UNIQUE (transfer_id, side) serves it.

CREATE TABLE outbox_parked (
    outbox_id   BIGINT NOT NULL,
    position    INTEGER NOT NULL,
    topic       TEXT NOT NULL,
    partition   INTEGER,
    message_key TEXT NOT NULL,
    payload     TEXT NOT NULL,
    headers     JSONB NOT NULL DEFAULT '{}'::jsonb,
    reason      TEXT NOT NULL,
    parked_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (outbox_id, position)
);

INSERT INTO outbox_parked (outbox_id, position, topic, partition, message_key, payload, headers, reason, parked_at)
SELECT id, 0, topic, partition, message_key, payload, headers, parked_reason, COALESCE(published_at, now())
FROM outbox WHERE parked_reason IS NOT NULL;

-- Published rows are not needed any more: the ledger is the record.
DELETE FROM outbox WHERE published_at IS NOT NULL;

ALTER TABLE outbox ADD COLUMN messages TEXT, ADD COLUMN message_count INTEGER;
UPDATE outbox SET
    messages = json_build_array(json_build_object(
        'topic', topic, 'partition', partition, 'key', message_key, 'headers', headers, 'payload', payload::json))::text,
    message_count = 1;
ALTER TABLE outbox
    ALTER COLUMN messages SET NOT NULL,
    ALTER COLUMN message_count SET NOT NULL,
    ADD CONSTRAINT outbox_message_count_positive CHECK (message_count > 0),
    DROP COLUMN topic,
    DROP COLUMN partition,
    DROP COLUMN message_key,
    DROP COLUMN payload,
    DROP COLUMN headers,
    DROP COLUMN parked_reason;
-- A row is megabytes of JSON written once and read once: compressing it would
-- cost the worker CPU for space the purge gives back within minutes.
ALTER TABLE outbox ALTER COLUMN messages SET STORAGE EXTERNAL;

ALTER TABLE ledger_entries
    DROP CONSTRAINT ledger_entries_transfer_id_fkey,
    DROP CONSTRAINT ledger_entries_card_no_fkey;
DROP INDEX ledger_entries_by_transfer;
