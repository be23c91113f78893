-- One row per scored transaction, approved or not. Operators and tests query these column names.
-- Partitioned by event time (the transaction's own timestamp): a redelivery or a producer retry of
-- the same transaction always carries the same event time, so (transaction_id, event_time) is a
-- real idempotency key even though a partitioned table cannot have a unique index without the
-- partition column.
CREATE TABLE IF NOT EXISTS transactions (
    transaction_id  text             NOT NULL,
    user_id         text             NOT NULL,
    amount          double precision NOT NULL,
    currency        text             NOT NULL DEFAULT 'USD',
    merchant        text             NOT NULL,
    mcc             text,
    country         text,
    card_id         text,
    device_id       text,
    ip              text,
    channel         text,
    lat             double precision,
    lon             double precision,
    event_time      timestamptz      NOT NULL,
    stream_id       text             NOT NULL,
    scored_at       timestamptz      NOT NULL DEFAULT clock_timestamp(),
    score           real             NOT NULL,
    decision        text             NOT NULL CHECK (decision IN ('approve', 'review', 'decline')),
    reasons         text[]           NOT NULL DEFAULT '{}',
    model_version   text             NOT NULL,
    PRIMARY KEY (transaction_id, event_time)
) PARTITION BY RANGE (event_time);

-- Rows whose day has no partition yet land here instead of failing the batch; ensure_partitions
-- moves them out when their day's partition is created.
CREATE TABLE IF NOT EXISTS transactions_default PARTITION OF transactions DEFAULT;

CREATE INDEX IF NOT EXISTS transactions_user_time ON transactions (user_id, event_time);
CREATE INDEX IF NOT EXISTS transactions_flagged ON transactions (event_time) WHERE decision <> 'approve';

-- Creates the daily partitions covering [first_day, last_day], moving any rows the default
-- partition already holds for those days. Safe to call concurrently and repeatedly.
CREATE OR REPLACE FUNCTION fraudd_ensure_partitions(first_day date, last_day date)
RETURNS integer LANGUAGE plpgsql AS $fn$
DECLARE
    day      date;
    part     text;
    created  integer := 0;
    lo       timestamptz;
    hi       timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('fraudd_ensure_partitions'));
    day := first_day;
    WHILE day <= last_day LOOP
        part := format('transactions_%s', to_char(day, 'YYYYMMDD'));
        lo := day::timestamp AT TIME ZONE 'UTC';
        hi := (day + 1)::timestamp AT TIME ZONE 'UTC';
        IF to_regclass(quote_ident(part)) IS NULL THEN
            EXECUTE format('CREATE TABLE %I (LIKE transactions INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
            EXECUTE format('WITH moved AS (DELETE FROM transactions_default WHERE event_time >= $1 AND event_time < $2 RETURNING *)
                            INSERT INTO %I SELECT * FROM moved', part) USING lo, hi;
            EXECUTE format('ALTER TABLE transactions ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
            created := created + 1;
        END IF;
        day := day + 1;
    END LOOP;
    RETURN created;
END
$fn$;
