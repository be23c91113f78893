"""TimescaleDB for real: the pipeline and chaos tests again on a hypertable, and the states around it.

Every test here runs on a PostgreSQL cluster of its own that loads TimescaleDB, with the policies
an operator sets (``fraudd migrate --compress-after-days 1 --retention-days 30``). The pipeline
and chaos tests are imported, not copied: here they run against the hypertable while a
compressor compresses every chunk again and again under the writers — rows keep arriving in
compressed chunks, and redeliveries are checked against compressed rows — and must give the same
exact counts. The other tests cover late and re-sent rows in a chunk the compression policy
compressed, the retention policy, and a server where TimescaleDB is installed but not loaded.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from fraudd.keys import Keys
from fraudd.schema import load_migrations

from .conftest import Namespace, migrated_namespace, wait_for
from .services import TIMESCALEDB, PostgresServer, scratch_postgres, start, stop
from .streams import alerts, fully_drained, payload, publish
from .test_chaos import test_exactly_once_under_chaos  # noqa: F401  (runs here on the hypertable)
from .test_pipeline import (  # noqa: F401  (run here on the hypertable)
    test_killed_worker_is_respawned_and_nothing_is_lost,
    test_valid_and_invalid_entries_with_two_workers,
)

COMPRESS_AFTER_DAYS = 1
RETENTION_DAYS = 30
POLL_S = 0.1
RECOMPRESS_EVERY_S = 1.0
# 01:00 UTC two days ago: its day's chunk is older than the compression policy, younger than the retention.
LATE_DAY = (int(time.time()) // 86400 - 2) * 86400 + 3600


@pytest.fixture(scope="module", autouse=True)
def policies() -> Iterator[None]:
    """Every ``fraudd migrate`` of this module sets both policies, as an operator's environment file would."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FRAUDD_COMPRESS_AFTER_DAYS", str(COMPRESS_AFTER_DAYS))
        patch.setenv("FRAUDD_RETENTION_DAYS", str(RETENTION_DAYS))
        yield


@pytest.fixture(scope="module")
def dedicated_postgres(timescaledb_postgres: PostgresServer) -> PostgresServer:
    """The chaos test's own PostgreSQL (stopped and restarted by it) is the TimescaleDB cluster."""
    return timescaledb_postgres


@pytest.fixture
def ns(redis_client: redis.Redis, timescaledb_postgres: PostgresServer) -> Iterator[Namespace]:
    """A namespace migrated on the TimescaleDB cluster: ``transactions`` is a hypertable there."""
    yield from migrated_namespace(redis_client, postgres_url=timescaledb_postgres.url)


class ChunkCompressor(threading.Thread):
    """Compresses every chunk of the cluster's ``transactions`` hypertables as soon as it appears,
    and again at most every second once rows arrived in it since, until stopped: what the
    compression policy does to a chunk that still receives late rows, at test speed."""

    def __init__(self, url: str) -> None:
        super().__init__(name="compressor", daemon=True)
        self._url = url
        self._stopping = threading.Event()
        self._arrived: dict[str, int] = {}  # chunk -> rows seen in its uncompressed part
        self._compressed_at: dict[str, float] = {}
        self.compressions = 0
        self.rows_into_compressed = 0  # rows seen arriving in a compressed chunk (written, or opened by a key check)
        self.error: BaseException | None = None

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=60)

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=3) as conn:
                    while not self._stopping.wait(POLL_S):
                        self._pass(conn)
            except (psycopg.OperationalError, psycopg.errors.UndefinedTable):
                self._stopping.wait(POLL_S)  # PostgreSQL stopped by the chaos test, or no hypertable yet
            except BaseException as exc:  # surfaced by the test
                self.error = exc
                return

    def _pass(self, conn: psycopg.Connection) -> None:
        chunks = conn.execute(
            "SELECT format('%I.%I', chunk_schema, chunk_name), is_compressed FROM timescaledb_information.chunks "
            "WHERE hypertable_name = 'transactions'"
        ).fetchall()
        for chunk, compressed in chunks:
            if compressed:
                arrived = conn.execute(f"SELECT count(*) FROM ONLY {chunk}").fetchone()[0]
                self.rows_into_compressed += max(0, arrived - self._arrived.get(chunk, 0))
                self._arrived[chunk] = arrived
                if not arrived or time.monotonic() - self._compressed_at.get(chunk, 0.0) < RECOMPRESS_EVERY_S:
                    continue
            conn.execute("SELECT compress_chunk(%s::regclass)", (chunk,))
            self.compressions += 1
            self._arrived[chunk] = 0
            self._compressed_at[chunk] = time.monotonic()


@pytest.fixture(autouse=True)
def compressed_under_the_writers(request: pytest.FixtureRequest, timescaledb_postgres: PostgresServer) -> Iterator[None]:
    """The imported tests run while their chunks are compressed; they must have written into compressed chunks."""
    if request.function.__module__ == __name__:
        yield
        return
    compressor = ChunkCompressor(timescaledb_postgres.url)
    compressor.start()
    try:
        yield
    finally:
        compressor.stop()
    assert compressor.error is None, repr(compressor.error)
    assert compressor.compressions > 0 and compressor.rows_into_compressed > 0, vars(compressor)
    print(f"\ncompressions {compressor.compressions}, rows written into compressed chunks {compressor.rows_into_compressed}")


def _run_policy(ns: Namespace, policy: str) -> None:
    """Run the namespace's TimescaleDB policy job now instead of at its next schedule."""
    (job,) = ns.sql(
        "SELECT job_id FROM timescaledb_information.jobs WHERE proc_name = %s AND hypertable_schema = %s",
        (policy, ns.schema),
    )[0]
    with psycopg.connect(ns.postgres_url, autocommit=True) as conn:
        conn.execute("CALL public.run_job(%s)", (job,))


def _unschedule_policies(ns: Namespace) -> None:
    """Stop the scheduler from running the namespace's policy jobs (``_run_policy`` still runs them)."""
    with psycopg.connect(ns.postgres_url, autocommit=True) as conn:
        conn.execute(
            "SELECT public.alter_job(job_id, scheduled => false) FROM timescaledb_information.jobs WHERE hypertable_schema = %s",
            (ns.schema,),
        )
        unscheduled = conn.execute(
            "SELECT count(*) FROM timescaledb_information.jobs WHERE hypertable_schema = %s AND scheduled", (ns.schema,)
        ).fetchone()
    assert unscheduled == (0,)


def _chunk_of(ns: Namespace, transaction_id: str) -> tuple[str, bool]:
    """(chunk, is compressed) of the chunk holding ``transaction_id``."""
    return ns.sql(
        "SELECT format('%%I.%%I', c.chunk_schema, c.chunk_name), c.is_compressed FROM transactions t "
        "JOIN timescaledb_information.chunks c ON c.hypertable_schema = %s AND c.hypertable_name = 'transactions' "
        "AND t.event_time >= c.range_start AND t.event_time < c.range_end WHERE t.transaction_id = %s",
        (ns.schema, transaction_id),
    )[0]


def test_late_and_resent_rows_in_a_compressed_chunk(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    # The test runs the policies itself: a first run of the scheduler's own, late on a busy
    # server, could drop the ancient row below before it is counted.
    _unschedule_policies(ns)
    # One daemon throughout, as in production: each step publishes, then waits for the drain.
    daemon = start(ns, tmp_path, "--workers", "2", "--batch-size", "500")

    def drained() -> None:
        wait_for(lambda: fully_drained(redis_client, ns), 120, message="the stream to be drained")

    try:
        first = [payload(f"old_{i}", user=f"old_user_{i % 40}", amount=5 + i % 900, ts=LATE_DAY + i) for i in range(3000)]
        publish(redis_client, ns.stream, first)
        drained()
        stored = dict(ns.sql("SELECT transaction_id, decision FROM transactions"))
        assert len(stored) == 3000

        _run_policy(ns, "policy_compression")
        chunk, compressed = _chunk_of(ns, "old_0")
        assert compressed and ns.sql(f"SELECT count(*) FROM ONLY {chunk}")[0][0] == 0

        # Late rows of that day; re-sent rows Redis still knows (the staging table's ON CONFLICT on
        # compressed rows); re-sent rows Redis forgot (a plain COPY, refused by the key, then the same).
        late = [payload(f"late_{i}", user=f"old_user_{i % 40}", ts=LATE_DAY + 3000 + i) for i in range(1000)]
        publish(redis_client, ns.stream, first[:500] + late)
        drained()
        keys = Keys(ns.stream, ns.fraud_stream, ns.dlq_stream)
        redis_client.unlink(*redis_client.scan_iter(match=keys.seen_prefix + "*", count=10_000))
        publish(redis_client, ns.stream, first[500:1000])
        drained()

        rows = dict(ns.sql("SELECT transaction_id, decision FROM transactions"))
        assert len(rows) == 4000 == ns.sql("SELECT count(*) FROM transactions")[0][0]
        assert {txid: rows[txid] for txid in stored} == stored  # the first stored decision stands
        assert _chunk_of(ns, "late_0") == (chunk, True)
        sent = alerts(redis_client, ns)
        per_id = Counter(a["transaction_id"] for a in sent)
        assert set(per_id) == {txid for txid, decision in rows.items() if decision != "approve"}
        assert max(per_id.values(), default=1) == 1
        assert all(a["decision"] == rows[a["transaction_id"]] for a in sent)

        # The retention policy drops whole chunks older than its age, and nothing younger.
        publish(redis_client, ns.stream, [payload("ancient", ts=time.time() - (RETENTION_DAYS + 10) * 86400)])
        drained()
        assert ns.sql("SELECT count(*) FROM transactions WHERE transaction_id = 'ancient'")[0][0] == 1
        _run_policy(ns, "policy_retention")
        assert ns.sql("SELECT count(*) FROM transactions WHERE transaction_id = 'ancient'")[0][0] == 0
        assert ns.sql("SELECT count(*) FROM transactions")[0][0] == 4000
    finally:
        stop(daemon)


@pytest.fixture
def unloaded_postgres() -> Iterator[PostgresServer]:
    """TimescaleDB installed but not in shared_preload_libraries: the state right after installing it."""
    yield from scratch_postgres()


def test_installed_but_not_loaded(unloaded_postgres: PostgresServer, redis_client: redis.Redis) -> None:
    ns = Namespace(f"t{uuid.uuid4().hex[:10]}", postgres_url=unloaded_postgres.url)
    try:
        refused = ns.fraudd("migrate", "--retention-days", "30")
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert len(lines) == 1 and "needs TimescaleDB" in lines[0] and "shared_preload_libraries" in lines[0], lines
        assert ns.sql("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (ns.schema,))[0][0] == 0  # nothing changed

        migrated = ns.fraudd("migrate", "--retention-days", "0")
        assert migrated.returncode == 0 and "Traceback" not in migrated.stderr, migrated.stderr
        (storage,) = [line for line in migrated.stdout.splitlines() if line.startswith("transactions:")]
        assert "native daily partitions" in storage and "shared_preload_libraries = 'timescaledb'" in storage
        assert ns.sql("SELECT count(*) FROM fraudd_schema_migrations")[0][0] == len(load_migrations())
        assert ns.sql("SELECT relkind FROM pg_class WHERE oid = 'transactions'::regclass")[0][0] == "p"
        assert ns.sql("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'")[0][0] == 0

        # The operator loads it and restarts; the next migrate turns the still-empty table into a hypertable.
        unloaded_postgres.stop()
        unloaded_postgres.settings.update(TIMESCALEDB)
        unloaded_postgres.start()
        converted = ns.fraudd("migrate", "--retention-days", "0")
        assert converted.returncode == 0, converted.stderr
        assert "up to date" in converted.stdout and "transactions: TimescaleDB hypertable" in converted.stdout
        assert (
            ns.sql("SELECT count(*) FROM timescaledb_information.hypertables WHERE hypertable_schema = %s", (ns.schema,))[0][0]
            == 1
        )
    finally:
        ns.drop(redis_client)


def test_migrate_as_the_owner_of_the_database_not_a_superuser(unloaded_postgres: PostgresServer) -> None:
    """The README's deploy steps: a role ``fraudd`` owning a database ``fraudd``, nothing more."""
    unloaded_postgres.execute("CREATE ROLE fraudd LOGIN")
    unloaded_postgres.execute("CREATE DATABASE fraudd OWNER fraudd")
    ns = Namespace("public", postgres_url=f"postgresql://fraudd@127.0.0.1:{unloaded_postgres.port}/fraudd")
    migrated = ns.fraudd("migrate", "--retention-days", "0")
    assert migrated.returncode == 0, migrated.stderr
    assert "native daily partitions" in migrated.stdout and "not loaded" in migrated.stdout

    unloaded_postgres.stop()
    unloaded_postgres.settings.update(TIMESCALEDB)
    unloaded_postgres.start()
    converted = ns.fraudd("migrate", "--retention-days", "0")
    assert converted.returncode == 0, converted.stderr
    assert "transactions: TimescaleDB hypertable" in converted.stdout, converted.stdout
