"""The ``alert_deliveries`` table: what is to be sent, what was, and what was given up.

Every statement takes a whole batch (``unnest`` of arrays), so the log costs a fixed number of
round trips per stream batch and per claim, never one per alert. The statuses and the lease are
described in ``schema/003_alert_deliveries.sql``.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from psycopg_pool import AsyncConnectionPool

from .channels import Alert

_INSERT = """
INSERT INTO alert_deliveries (transaction_id, channel, status, stream_id, alert, next_attempt_at, digest_id)
SELECT t, c, s, i, a::jsonb, to_timestamp(n), g
FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::float8[], %s::text[]) AS u(t, c, s, i, a, n, g)
ON CONFLICT (transaction_id, channel) DO NOTHING
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
_DELIVERED = """
UPDATE alert_deliveries d SET status = 'delivered', delivered_at = now(), digest_id = coalesce(u.g, d.digest_id)
FROM unnest(%s::text[], %s::text[], %s::text[]) AS u(t, c, g)
WHERE d.transaction_id = u.t AND d.channel = u.c AND d.status IN ('pending', 'digest')
"""
_RETRY = """
UPDATE alert_deliveries d SET last_error = u.e, next_attempt_at = to_timestamp(u.n)
FROM unnest(%s::text[], %s::text[], %s::text[], %s::float8[]) AS u(t, c, e, n)
WHERE d.transaction_id = u.t AND d.channel = u.c AND d.status IN ('pending', 'digest')
"""
_FAILED = """
UPDATE alert_deliveries d SET status = 'failed', last_error = u.e
FROM unnest(%s::text[], %s::text[], %s::text[]) AS u(t, c, e)
WHERE d.transaction_id = u.t AND d.channel = u.c AND d.status IN ('pending', 'digest')
"""


_RELEASE = """
UPDATE alert_deliveries d SET attempts = d.attempts - 1, next_attempt_at = to_timestamp(u.n)
FROM unnest(%s::text[], %s::text[], %s::float8[]) AS u(t, c, n)
WHERE d.transaction_id = u.t AND d.channel = u.c AND d.status IN ('pending', 'digest')
"""


@dataclass(slots=True)
class NewDelivery:
    alert: Alert
    channel: str
    status: str  # 'pending' or 'digest'
    due_at: float  # Unix seconds
    digest_id: str | None = None


@dataclass(slots=True)
class Claimed:
    alert: Alert
    attempts: int  # including the attempt this claim is for


@dataclass(slots=True)
class Outcome:
    channel: str
    transaction_id: str
    delivered: bool
    error: str | None = None
    retry_at: float | None = None  # None with delivered False: given up
    digest_id: str | None = None
    released: bool = False  # claimed but never attempted (the channel was paused, or the worker stops)


class DeliveryLog:
    """A small async pool of connections to the schema holding ``alert_deliveries``."""

    def __init__(self, postgres_url: str, pg_schema: str, max_size: int = 4) -> None:
        self.pool = AsyncConnectionPool(postgres_url, min_size=1, max_size=max_size, open=False, timeout=10,
                                        kwargs={"options": f"-c search_path={pg_schema}", "connect_timeout": 5})

    async def open(self) -> None:
        await self.pool.open(wait=False)

    async def close(self) -> None:
        await self.pool.close()

    async def add(self, rows: list[NewDelivery]) -> None:
        """Record new deliveries; rows already there (a redelivered stream entry) are left as they are."""
        if not rows:
            return
        async with self.pool.connection() as conn:
            await conn.execute(_INSERT, (
                [r.alert.transaction_id for r in rows], [r.channel for r in rows], [r.status for r in rows],
                [r.alert.stream_id for r in rows], [r.alert.body.decode() for r in rows], [r.due_at for r in rows],
                [r.digest_id for r in rows]))

    async def claim(self, channel: str, status: str, limit: int, lease_s: float) -> list[Claimed]:
        async with self.pool.connection() as conn:
            cursor = await conn.execute(_CLAIM, {"channel": channel, "status": status, "limit": limit, "lease": lease_s})
            rows = await cursor.fetchall()
        claimed = []
        for txid, stream_id, text, attempts in rows:
            body = text.encode()
            claimed.append(Claimed(Alert(txid, stream_id, body, orjson.loads(body)), attempts))
        return claimed

    async def record(self, outcomes: list[Outcome]) -> None:
        """Write a round of outcomes in one transaction."""
        delivered = [o for o in outcomes if o.delivered]
        released = [o for o in outcomes if o.released]
        retry = [o for o in outcomes if not o.delivered and not o.released and o.retry_at is not None]
        failed = [o for o in outcomes if not o.delivered and not o.released and o.retry_at is None]
        async with self.pool.connection() as conn, conn.transaction():
            if released:
                await conn.execute(_RELEASE, ([o.transaction_id for o in released], [o.channel for o in released],
                                              [o.retry_at for o in released]))
            if delivered:
                await conn.execute(_DELIVERED, ([o.transaction_id for o in delivered], [o.channel for o in delivered],
                                                [o.digest_id for o in delivered]))
            if retry:
                await conn.execute(_RETRY, ([o.transaction_id for o in retry], [o.channel for o in retry],
                                            [o.error for o in retry], [o.retry_at for o in retry]))
            if failed:
                await conn.execute(_FAILED, ([o.transaction_id for o in failed], [o.channel for o in failed],
                                             [o.error for o in failed]))

    async def backlog(self) -> int:
        """Deliveries still to make, due or not (the service's queue beyond the stream)."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute("SELECT count(*) FROM alert_deliveries WHERE status IN ('pending', 'digest')")
            return int((await cursor.fetchone())[0])
