-- Labels: chargebacks and analyst verdicts, from the stream transactions:labels, POST /v1/labels
-- and `fraudd label --file` (all through fraudd.learning.labels.store_labels).
-- Every distinct report once, so the same report delivered twice is one row and nothing is lost
-- when a verdict changes.
CREATE TABLE IF NOT EXISTS label_history (
    transaction_id text        NOT NULL,
    label          text        NOT NULL CHECK (label IN ('fraud', 'legit')),
    source         text        NOT NULL DEFAULT '',
    reported_at    timestamptz NOT NULL,
    received_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (transaction_id, reported_at, source, label)
);

-- The latest verdict per transaction: what training, reports and label-fed features read.
CREATE TABLE IF NOT EXISTS labels (
    transaction_id text        PRIMARY KEY,
    label          text        NOT NULL CHECK (label IN ('fraud', 'legit')),
    source         text        NOT NULL DEFAULT '',
    reported_at    timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS labels_reported ON labels (reported_at);
