-- TimescaleDB storage for transactions. Applying this file changes nothing: it defines the function
-- that `fraudd migrate` calls on every run where the server has loaded TimescaleDB
-- (shared_preload_libraries). Merely installed, the extension cannot be created (the attempt kills
-- the session), so there transactions keeps the native daily partitions of 001, and enabling
-- TimescaleDB later converts the table at the next `fraudd migrate` as long as it is still empty.
--
-- fraudd_use_timescaledb(compress_after, drop_after) turns the empty, natively partitioned table
-- into a hypertable with daily chunks, then makes the compression and retention policies match its
-- arguments (NULL: no such policy). A table already holding rows stays native (convert it by hand,
-- see README "Schema"). Returns what transactions is now, for the operator.
--
-- Compressed batches are runs of event time, not one user each: a late or redelivered row must be
-- checked against the key (transaction_id, event_time), and with batches ordered by event time that
-- check opens the one batch whose time range holds the row. Segmenting by user would open a batch
-- of every user of the chunk per row (measured: 2,000 rows against a compressed chunk of 200,000
-- took 138 s by user segments, 0.13 s by time). Per-user reads still skip batches through the
-- bloom filters TimescaleDB builds from the user_id index.
CREATE OR REPLACE FUNCTION fraudd_use_timescaledb(compress_after interval, drop_after interval)
RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
    fraudd_schema     text := current_schema();
    timescaledb_schema text;
    job               integer;
    configured        interval;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'transactions'::regclass) = 'p' THEN
        IF EXISTS (SELECT 1 FROM transactions LIMIT 1) THEN
            RETURN 'native daily partitions (TimescaleDB is loaded, but the table already holds rows: convert it by hand)';
        END IF;
        -- In public, never in a fraudd schema: dropping that schema must not take the extension,
        -- and every hypertable of the database, with it.
        CREATE EXTENSION IF NOT EXISTS timescaledb WITH SCHEMA public;
    END IF;
    SELECT extnamespace::regnamespace::text INTO timescaledb_schema FROM pg_extension WHERE extname = 'timescaledb';
    PERFORM set_config('search_path', format('%I, %I', fraudd_schema, timescaledb_schema), true);

    IF (SELECT relkind FROM pg_class WHERE oid = 'transactions'::regclass) = 'p' THEN
        -- A hypertable cannot be made from a partitioned table: rebuild the empty one.
        ALTER TABLE transactions RENAME TO transactions_native;
        CREATE TABLE transactions (LIKE transactions_native INCLUDING ALL);
        DROP TABLE transactions_native CASCADE;
        PERFORM create_hypertable('transactions', by_range('event_time', interval '1 day'));
        ALTER TABLE transactions SET (timescaledb.compress, timescaledb.compress_segmentby = '',
                                      timescaledb.compress_orderby = 'event_time DESC');
        -- Chunks are created on demand: partition upkeep becomes a no-op.
        CREATE OR REPLACE FUNCTION fraudd_ensure_partitions(first_day date, last_day date)
        RETURNS integer LANGUAGE sql AS 'SELECT 0';
    END IF;

    SELECT j.job_id, (j.config ->> 'compress_after')::interval INTO job, configured
      FROM timescaledb_information.jobs j
     WHERE j.proc_name = 'policy_compression' AND j.hypertable_schema = fraudd_schema AND j.hypertable_name = 'transactions';
    IF job IS NOT NULL AND configured IS DISTINCT FROM compress_after THEN
        PERFORM remove_compression_policy('transactions');
    END IF;
    IF compress_after IS NOT NULL AND configured IS DISTINCT FROM compress_after THEN
        PERFORM add_compression_policy('transactions', compress_after);
    END IF;

    job := NULL;
    configured := NULL;
    SELECT j.job_id, (j.config ->> 'drop_after')::interval INTO job, configured
      FROM timescaledb_information.jobs j
     WHERE j.proc_name = 'policy_retention' AND j.hypertable_schema = fraudd_schema AND j.hypertable_name = 'transactions';
    IF job IS NOT NULL AND configured IS DISTINCT FROM drop_after THEN
        PERFORM remove_retention_policy('transactions');
    END IF;
    IF drop_after IS NOT NULL AND configured IS DISTINCT FROM drop_after THEN
        PERFORM add_retention_policy('transactions', drop_after);
    END IF;

    RETURN format('TimescaleDB hypertable, daily chunks, compression %s, retention %s',
                  coalesce('after ' || compress_after::text, 'off'), coalesce('drops chunks after ' || drop_after::text, 'off'));
END
$fn$;
