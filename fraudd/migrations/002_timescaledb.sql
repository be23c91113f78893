-- With TimescaleDB installed, transactions become a hypertable (chunked by event time,
-- compressed after a week). Plain PostgreSQL keeps the native daily partitions of 001.
-- A hypertable cannot be made from a partitioned table, so the conversion rebuilds the empty
-- table; it is skipped once rows exist (convert such a table by hand, see README "Schema").
DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM transactions LIMIT 1) THEN
        RAISE NOTICE 'timescaledb available but transactions holds rows: left as native partitions';
        RETURN;
    END IF;
    CREATE EXTENSION IF NOT EXISTS timescaledb;
    ALTER TABLE transactions RENAME TO transactions_native;
    CREATE TABLE transactions (LIKE transactions_native INCLUDING ALL);
    DROP TABLE transactions_native CASCADE;
    PERFORM create_hypertable('transactions', 'event_time', chunk_time_interval => interval '1 day');
    EXECUTE 'ALTER TABLE transactions SET (timescaledb.compress, timescaledb.compress_segmentby = ''user_id'')';
    PERFORM add_compression_policy('transactions', interval '7 days');
    -- Chunks are created on demand: partition upkeep becomes a no-op.
    CREATE OR REPLACE FUNCTION fraudd_ensure_partitions(first_day date, last_day date)
    RETURNS integer LANGUAGE sql AS 'SELECT 0';
END
$do$;
