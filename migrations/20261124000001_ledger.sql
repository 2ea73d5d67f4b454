-- The card ledger: reference data (affiliates, ASPs and their keys, products,
-- members, cards), the transfers that moved money, the double-entry ledger and the
-- transactional outbox. Money is NUMERIC everywhere; user ids exceed BIGINT.

CREATE TABLE affiliates (
    affiliate_id TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE asps (
    asp_id             TEXT PRIMARY KEY CHECK (length(asp_id) = 15),
    affiliate_id       TEXT NOT NULL REFERENCES affiliates (affiliate_id),
    require_encryption BOOLEAN NOT NULL DEFAULT false,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Access keys are stored as SHA-256 hashes; the signing secret is the HMAC key the
-- client shares with us and so must be readable by the gateway.
CREATE TABLE access_keys (
    key_hash       TEXT PRIMARY KEY CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    asp_id         TEXT NOT NULL REFERENCES asps (asp_id),
    signing_secret TEXT NOT NULL CHECK (length(signing_secret) > 0),
    status         TEXT NOT NULL DEFAULT 'ACTIVE' CHECK (status IN ('ACTIVE', 'DISABLED')),
    expires_at     TIMESTAMPTZ,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX access_keys_by_asp ON access_keys (asp_id);

CREATE TABLE crypto_keys (
    key_id       TEXT PRIMARY KEY CHECK (length(key_id) = 32),
    asp_id       TEXT NOT NULL REFERENCES asps (asp_id),
    key_material BYTEA NOT NULL CHECK (length(key_material) = 32),
    status       TEXT NOT NULL DEFAULT 'ACTIVE' CHECK (status IN ('ACTIVE', 'DISABLED')),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- owner_affiliate_id has no foreign key on purpose: a product may name an affiliate
-- that does not exist, and a transfer with such a product answers 017_006.
CREATE TABLE products (
    product_id         TEXT PRIMARY KEY,
    owner_affiliate_id TEXT NOT NULL,
    kind               TEXT NOT NULL CHECK (kind IN ('PREPAID', 'GIFT')),
    collection_allowed BOOLEAN NOT NULL,
    max_balance        NUMERIC NOT NULL CHECK (max_balance >= 0),
    min_usage_rate     NUMERIC CHECK (min_usage_rate >= 0 AND min_usage_rate <= 1)
);

CREATE TABLE members (
    user_id      NUMERIC(19, 0) PRIMARY KEY CHECK (user_id BETWEEN 1 AND 9999999999999999999),
    affiliate_id TEXT NOT NULL REFERENCES affiliates (affiliate_id),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE cards (
    card_no         TEXT PRIMARY KEY CHECK (card_no ~ '^[0-9]{16}$'),
    user_id         NUMERIC(19, 0) NOT NULL REFERENCES members (user_id),
    product_id      TEXT NOT NULL REFERENCES products (product_id),
    status          TEXT NOT NULL CHECK (status IN ('ACTIVE', 'INACTIVE', 'SUSPENDED', 'LOST', 'EXPIRED', 'TERMINATED')),
    balance         NUMERIC NOT NULL CHECK (balance >= 0),
    -- What the card held before its first ledger entry; the audit checks
    -- balance = opening_balance + sum(entries).
    opening_balance NUMERIC NOT NULL CHECK (opening_balance >= 0),
    total_loaded    NUMERIC NOT NULL CHECK (total_loaded >= 0),
    expires_on      DATE NOT NULL,
    max_balance     NUMERIC CHECK (max_balance >= 0),
    -- Sequence number of the card's last ledger entry: entries are numbered 1, 2, ...
    sequence        BIGINT NOT NULL DEFAULT 0 CHECK (sequence >= 0),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX cards_by_member ON cards (user_id);

-- One row per request ever accepted for processing: (asp_id, correlation_id) names
-- it forever. A repeat finds this row and gets its stored result.
CREATE TABLE transfers (
    transfer_id      UUID PRIMARY KEY,
    asp_id           TEXT NOT NULL,
    correlation_id   TEXT NOT NULL,
    fingerprint      TEXT NOT NULL,
    user_id          NUMERIC(19, 0) NOT NULL,
    from_card_no     TEXT NOT NULL,
    to_card_no       TEXT NOT NULL,
    requested_amount NUMERIC,
    status           TEXT NOT NULL CHECK (status IN ('PENDING', 'COMPLETED', 'REJECTED')),
    result_code      TEXT,
    result_message   TEXT,
    amount           NUMERIC CHECK (amount > 0),
    submitted_at     TIMESTAMPTZ NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    decided_at       TIMESTAMPTZ,
    UNIQUE (asp_id, correlation_id)
);

-- Double entry: every completed transfer has one DEBIT and one CREDIT of the same
-- amount. Each entry carries the card's balance after it and the card's gap-free
-- sequence number.
CREATE TABLE ledger_entries (
    entry_id      UUID PRIMARY KEY,
    transfer_id   UUID NOT NULL REFERENCES transfers (transfer_id),
    card_no       TEXT NOT NULL REFERENCES cards (card_no),
    user_id       NUMERIC(19, 0) NOT NULL,
    side          TEXT NOT NULL CHECK (side IN ('DEBIT', 'CREDIT')),
    amount        NUMERIC NOT NULL CHECK (amount > 0),
    balance_after NUMERIC NOT NULL CHECK (balance_after >= 0),
    sequence      BIGINT NOT NULL CHECK (sequence >= 1),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (card_no, sequence),
    UNIQUE (transfer_id, side)
);
CREATE INDEX ledger_entries_by_transfer ON ledger_entries (transfer_id);

-- The transactional outbox: messages written in the same transaction as the ledger
-- change they announce, published by the relay afterwards.
CREATE TABLE outbox (
    id           BIGSERIAL PRIMARY KEY,
    topic        TEXT NOT NULL,
    partition    INTEGER,
    message_key  TEXT NOT NULL,
    payload      TEXT NOT NULL,
    headers      JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at TIMESTAMPTZ
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cardflow_outbox', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- Every request a gateway accepted for publishing, by (asp_id, correlation_id).
-- It lets any gateway tell "pending" from "unknown" in a status query and refuse a
-- reused correlation id (000_008) before anything is published.
CREATE TABLE submissions (
    asp_id         TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    fingerprint    TEXT NOT NULL,
    submitted_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (asp_id, correlation_id)
);
