"""The ``alert_deliveries`` table: what is to be sent, what was, and what was given up.

Every statement takes a whole batch (``unnest`` of arrays), so the log costs a fixed number of
round trips per stream batch and per claim, never one per alert. The statuses and the lease are
described in ``fraudd/migrations/003_alert_deliveries.sql``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import orjson
import psycopg
import redis
from psycopg_pool import AsyncConnectionPool
from redis.cluster import RedisCluster

from ..runtime.deadletters import marker_prefix
from .channels import Alert

# The rows travel as one JSON document built by orjson, the alerts embedded as they came: a text[]
# parameter would have psycopg escape every quote of every alert in Python, its main cost per alert.
# A row may be inserted already claimed by the worker that inserts it, for its first attempt, with a
# lease of l seconds: then it costs no claim of its own. The lease runs from the insert itself, not
# from when the worker built the row: an insert that waited out a PostgreSQL outage would
# otherwise land with its lease already over, and another claim would send the alert a second time.
# The rows returned are those inserted (not already there).
_INSERT = """
INSERT INTO alert_deliveries (transaction_id, channel, status, stream_id, alert, next_attempt_at, digest_id, attempts,
                              first_attempt_at, last_attempt_at)
SELECT t, c, s, i, a, CASE WHEN l IS NULL THEN to_timestamp(n) ELSE now() + l * interval '1 second' END, g,
       (l IS NOT NULL)::int, CASE WHEN l IS NOT NULL THEN now() END, CASE WHEN l IS NOT NULL THEN now() END
FROM jsonb_to_recordset(%s::jsonb) AS u(t text, c text, s text, i text, a jsonb, n float8, g text, l float8)
ON CONFLICT (transaction_id, channel) DO NOTHING
RETURNING transaction_id, channel
"""

# Claims take the due rows nobody else holds and move them one lease ahead: a claimer that dies
# leaves them due again when the lease runs out.
_CLAIM = """
WITH due AS (
    SELECT transaction_id FROM alert_deliveries
    WHERE channel = %(channel)s AND status = %(status)s AND next_attempt_at <= now()
    ORDER BY next_attempt_at LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED)
UPDATE alert_deliveries d
SET next_attempt_at = now() + %(lease)s * interval '1 second', attempts = d.attempts + 1,
    first_attempt_at = coalesce(d.first_attempt_at, now()), last_attempt_at = now()
FROM due
WHERE d.channel = %(channel)s AND d.transaction_id = due.transaction_id
RETURNING d.transaction_id, d.stream_id, d.alert::text, d.attempts
"""

# Outcomes only move rows still to send: a row recorded delivered is never sent or changed again.
# Every statement must find its rows through the primary key: right after a burst the table's
# statistics still describe it as nearly empty, and the planner would scan the rows still to send
# (through the partial index, or all of them) once per round, or once per row. So the status test
# is written so that it cannot pick the partial index, and the pool's sessions never seq-scan.
_DELIVERED = """
UPDATE alert_deliveries SET status = 'delivered', delivered_at = now(), digest_id = coalesce(%(g)s, digest_id)
WHERE channel = %(c)s AND transaction_id = ANY(%(t)s::text[]) AND status NOT IN ('delivered', 'failed')
"""
# The other outcomes carry values per row: one statement per kind and channel, the values as arrays
# (a flaky peer makes retries common, so no statement per row). The ``ANY`` keeps the key lookup
# in the index condition; the join alone would scan the channel's rows. A worker that retried a
# delivery within its claim reports the attempts it made and when it made the last (``a``, ``l``);
# otherwise those are NULL and the claim's own count and time stand.
_OUTCOME = """
UPDATE alert_deliveries d SET {assignments}
FROM unnest(%(t)s::text[], %(e)s::text[], %(n)s::float8[], %(a)s::int[], %(l)s::float8[]) AS u(t, e, n, a, l)
WHERE d.channel = %(c)s AND d.transaction_id = ANY(%(t)s::text[]) AND d.transaction_id = u.t
  AND d.status NOT IN ('delivered', 'failed')
"""
_ATTEMPTS = "attempts = coalesce(u.a, d.attempts), last_attempt_at = coalesce(to_timestamp(u.l), d.last_attempt_at)"
_ASSIGNMENTS = {
    # delivered after retries within the claim
    "delivered": f"status = 'delivered', delivered_at = now(), last_error = u.e, {_ATTEMPTS}",
    "retry": f"last_error = u.e, next_attempt_at = to_timestamp(u.n), {_ATTEMPTS}",
    "failed": f"status = 'failed', last_error = u.e, {_ATTEMPTS}",
    # claimed but never attempted: the claim's attempt is taken back
    "released": "attempts = d.attempts - 1, next_attempt_at = to_timestamp(u.n)",
}


# Settled rows past the retention, a chunk per statement: no statement holds many row locks or
# runs long, and rows still to send are kept whatever their age.
_PURGE = """
DELETE FROM alert_deliveries WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM alert_deliveries
    WHERE created_at < now() - %(days)s * interval '1 day' AND status IN ('delivered', 'failed')
    LIMIT %(limit)s))
"""
PURGE_CHUNK = 10_000


def purge_settled(conn: psycopg.Connection, older_than_days: int) -> int:
    """Delete the delivered and failed rows created more than ``older_than_days`` ago (``conn`` in
    autocommit: each chunk commits on its own); returns how many went."""
    purged = 0
    while True:
        deleted = conn.execute(_PURGE, {"days": older_than_days, "limit": PURGE_CHUNK}).rowcount
        purged += deleted
        if deleted < PURGE_CHUNK:
            return purged


REASON_UNDELIVERABLE = "alert_undeliverable"  # the DLQ reason of a delivery given up after --max-attempts

_RETRY_FAILED = """
UPDATE alert_deliveries SET status = 'pending', attempts = 0, next_attempt_at = now()
FROM unnest(%s::text[], %s::text[]) AS u(t, c)
WHERE transaction_id = u.t AND channel = u.c AND status = 'failed'
"""


def retry_failed(
    conn: psycopg.Connection,
    client: redis.Redis | RedisCluster,
    fraud_stream: str,
    dlq_stream: str,
    letters: list[dict[bytes, bytes]],
) -> int:
    """Make the deliveries of these ``alert_undeliverable`` dead letters due again (``fraudd dlq
    replay``), and forget that they were dead-lettered, so that another give-up is written again.
    Returns how many deliveries were failed and are now due."""
    keys = [(orjson.loads(f[b"data"])["transaction_id"], f[b"channel"].decode()) for f in letters]
    updated = conn.execute(_RETRY_FAILED, ([t for t, _c in keys], [c for _t, c in keys])).rowcount
    prefix = marker_prefix(fraud_stream, dlq_stream)
    client.delete(*[f"{prefix}{t}:{c}" for t, c in keys])
    return updated


@dataclass(slots=True)
class NewDelivery:
    alert: Alert
    channel: str
    status: str  # 'pending' or 'digest'
    due_at: float  # Unix seconds, of a row not claimed at its insert
    digest_id: str | None = None
    lease_s: float | None = None  # claimed by the inserting worker for its first attempt, this long from the insert


@dataclass(slots=True)
class Claimed:
    alert: Alert
    attempts: int  # including the attempt this claim is for
    claimed_at: float = field(default_factory=time.monotonic)
    # Attempts the claimer retried on its own within the claim (not in the table yet), the last
    # one's error and Unix time: what the outcome writes in the end.
    retries: int = 0
    last_error: str | None = None
    attempted_at: float | None = None


@dataclass(slots=True)
class Outcome:
    channel: str
    transaction_id: str
    delivered: bool
    error: str | None = None
    retry_at: float | None = None  # None with delivered False: given up
    digest_id: str | None = None
    released: bool = False  # claimed but never attempted (the channel was paused, or the worker stops)
    attempts: int | None = None  # attempts made, when the claimer retried within its claim (else as claimed)
    attempted_at: float | None = None  # Unix time of the last of those attempts


class DeliveryLog:
    """A small async pool of connections to the schema holding ``alert_deliveries``."""

    def __init__(self, postgres_url: str, pg_schema: str, max_size: int = 4) -> None:
        # Claims and outcomes commit without waiting for the WAL flush: should PostgreSQL itself
        # crash and lose the last few, a claim simply lapses and an outcome is made again (under
        # the same webhook-id). New deliveries (``add``) are the durable record before the stream
        # ack, and wait for the flush. No sequential scans: see _DELIVERED.
        self.pool = AsyncConnectionPool(
            postgres_url,
            min_size=1,
            max_size=max_size,
            open=False,
            timeout=10,
            kwargs={
                "options": f"-c search_path={pg_schema} -c synchronous_commit=off -c enable_seqscan=off",
                "connect_timeout": 5,
            },
        )

    async def open(self) -> None:
        await self.pool.open(wait=False)

    async def close(self) -> None:
        await self.pool.close()

    async def add(self, rows: list[NewDelivery]) -> set[tuple[str, str]]:
        """Record new deliveries; rows already there (a redelivered stream entry) are left as they
        are. Returns the (transaction id, channel) of the rows inserted."""
        if not rows:
            return set()
        document = orjson.dumps(
            [
                {
                    "t": r.alert.transaction_id,
                    "c": r.channel,
                    "s": r.status,
                    "i": r.alert.stream_id,
                    "a": orjson.Fragment(r.alert.body),
                    "n": r.due_at,
                    "g": r.digest_id,
                    "l": r.lease_s,
                }
                for r in rows
            ]
        )
        async with self.pool.connection() as conn:
            await conn.execute("SET LOCAL synchronous_commit = on")
            cursor = await conn.execute(_INSERT, (document.decode(),))
            return set(await cursor.fetchall())

    async def claim(self, channel: str, status: str, limit: int, lease_s: float) -> list[Claimed]:
        async with self.pool.connection() as conn:
            cursor = await conn.execute(_CLAIM, {"channel": channel, "status": status, "limit": limit, "lease": lease_s})
            rows = await cursor.fetchall()
        return [Claimed(Alert(txid, stream_id, text.encode()), attempts) for txid, stream_id, text, attempts in rows]

    async def record(self, outcomes: list[Outcome]) -> None:
        """Write a round of outcomes in one transaction."""
        delivered: dict[tuple[str, str | None], list[str]] = {}
        others: dict[tuple[str, str], list[Outcome]] = {}
        for o in outcomes:
            if o.delivered and o.attempts is None:
                delivered.setdefault((o.channel, o.digest_id), []).append(o.transaction_id)
            else:
                kind = (
                    "delivered" if o.delivered else "released" if o.released else "retry" if o.retry_at is not None else "failed"
                )
                others.setdefault((kind, o.channel), []).append(o)
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cursor:
            for (channel, digest_id), ids in delivered.items():
                await cursor.execute(_DELIVERED, {"c": channel, "g": digest_id, "t": ids})
            for (kind, channel), rows in others.items():
                await cursor.execute(
                    _OUTCOME.format(assignments=_ASSIGNMENTS[kind]),
                    {
                        "c": channel,
                        "t": [o.transaction_id for o in rows],
                        "e": [o.error for o in rows],
                        "n": [o.retry_at for o in rows],
                        "a": [o.attempts for o in rows],
                        "l": [o.attempted_at for o in rows],
                    },
                )

    async def backlog(self) -> int:
        """Deliveries still to make, due or not (the service's queue beyond the stream)."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute("SELECT count(*) FROM alert_deliveries WHERE status IN ('pending', 'digest')")
            [(count,)] = await cursor.fetchall()
            return int(count)
