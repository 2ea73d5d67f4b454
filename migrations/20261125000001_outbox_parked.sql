-- A row the broker refuses for good (a reply to a partition that does not exist, a
-- message over the broker's size limit) is parked with the reason instead of
-- blocking every row behind it. Parked rows count as handled (published_at is set)
-- and are kept for inspection; `cardflow replay` rebuilds lost card.balance events
-- from the ledger.
ALTER TABLE outbox ADD COLUMN parked_reason TEXT;
