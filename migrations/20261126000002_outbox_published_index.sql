-- no-transaction
-- The relay deletes published rows older than RELAY_RETAIN_SECS every few seconds
-- (`purge_published`). With no index on `published_at` that was a scan of the
-- whole outbox each time: an hour of rows by default, one per worker transaction,
-- growing with the load. Indexed, the purge reads only the rows it deletes. Rows
-- are already indexed again when published (the partial index on unpublished
-- rows makes that update non-HOT), so this adds one entry per row, not a write
-- path. CONCURRENTLY: built on a live outbox it must not block the workers'
-- inserts; hence no transaction around this file.
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_published ON outbox (published_at)
    WHERE published_at IS NOT NULL;
