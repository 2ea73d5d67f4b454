-- Key columns compare bytewise. The cluster's default collation (C.UTF-8 here,
-- often en_US.UTF-8 elsewhere) makes every b-tree comparison of these keys go
-- through the locale (`strcoll`), which `make bench` showed in the worker's
-- backend profile. The keys are ASCII identifiers (digits, letters), so their
-- order and equality do not change; only the cost of comparing them does.
-- A collation change is binary-compatible: Postgres rebuilds the indexes that
-- use these columns but does not rewrite the tables.
ALTER TABLE cards ALTER COLUMN card_no TYPE TEXT COLLATE "C";
ALTER TABLE transfers
    ALTER COLUMN asp_id TYPE TEXT COLLATE "C",
    ALTER COLUMN correlation_id TYPE TEXT COLLATE "C";
ALTER TABLE submissions
    ALTER COLUMN asp_id TYPE TEXT COLLATE "C",
    ALTER COLUMN correlation_id TYPE TEXT COLLATE "C";
ALTER TABLE ledger_entries
    ALTER COLUMN card_no TYPE TEXT COLLATE "C",
    ALTER COLUMN side TYPE TEXT COLLATE "C";

-- Outbox rows (a worker transaction's messages, megabytes of JSON under load)
-- are compressed with lz4 where the server supports it: a third of the bytes to
-- TOAST and WAL. The earlier `STORAGE EXTERNAL` avoided pglz, which is slow;
-- lz4 is not. A server built without lz4 keeps storing them uncompressed.
DO $$
BEGIN
    ALTER TABLE outbox ALTER COLUMN messages SET COMPRESSION lz4;
    ALTER TABLE outbox ALTER COLUMN messages SET STORAGE EXTENDED;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'lz4 is not supported by this server; outbox rows stay uncompressed';
END
$$;
