"""SQL of linked customers: who was seen on each device, IP address and card (``entity_customers``).

The housekeeping folds the transactions scored since its last pass into the table (``sync``):
first and last time each customer was seen on each entity, so reading a pass twice changes
nothing. A case page then asks which other customers share its transaction's entities
(``linked``) and how their transactions are labelled.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import psycopg

from ..schema import one_row

# Each pass over new transactions (here and ``cases.sync``) re-reads this much before its
# watermark: a batch whose COPY began before another's may commit after it.
OVERLAP = timedelta(seconds=30)
# A console started on a store with history reads this last period, not every year.
FIRST_SYNC = timedelta(days=7)
WINDOW = timedelta(days=30)
LINKED = 20


def sync(conn: psycopg.Connection) -> int:
    """Fold the transactions scored since the last pass into ``entity_customers``; returns how many
    (entity, customer) pairs were new or moved."""
    since = one_row(
        conn.execute(
            "SELECT coalesce((SELECT scored_at FROM console_watermarks WHERE name = 'links') - %s, clock_timestamp() - %s)",
            (OVERLAP, FIRST_SYNC),
        )
    )[0]
    row = one_row(
        conn.execute(
            """WITH fresh AS MATERIALIZED (
               SELECT t.user_id, t.event_time, t.scored_at, e.entity
               FROM transactions t
               CROSS JOIN LATERAL unnest(ARRAY['device:' || t.device_id, 'ip:' || t.ip, 'card:' || t.card_id]) AS e(entity)
               WHERE t.scored_at > %(since)s AND e.entity IS NOT NULL),
           folded AS (
               INSERT INTO entity_customers (entity, user_id, first_seen, last_seen)
               SELECT entity, user_id, min(event_time), max(event_time) FROM fresh GROUP BY entity, user_id
               ON CONFLICT (entity, user_id) DO UPDATE
               SET first_seen = least(entity_customers.first_seen, EXCLUDED.first_seen),
                   last_seen = greatest(entity_customers.last_seen, EXCLUDED.last_seen)
               WHERE EXCLUDED.first_seen < entity_customers.first_seen OR EXCLUDED.last_seen > entity_customers.last_seen
               RETURNING 1)
           SELECT (SELECT count(*) FROM folded), (SELECT max(scored_at) FROM fresh)""",
            {"since": since},
        )
    )
    if row[1] is not None:
        conn.execute(
            """INSERT INTO console_watermarks (name, scored_at) VALUES ('links', %s)
               ON CONFLICT (name) DO UPDATE SET scored_at = greatest(console_watermarks.scored_at, EXCLUDED.scored_at)""",
            (row[1],),
        )
    return row[0]


def linked(conn: psycopg.Connection, transaction: dict, at: datetime) -> list[dict]:
    """Other customers seen on this transaction's device, IP or card within 30 days of ``at``: per
    customer, what they share, when they were first and last seen on it, and how many of their
    transactions in that period are labelled fraud and legit."""
    kinds = (("device", "device_id"), ("ip", "ip"), ("card", "card_id"))
    mine = [f"{kind}:{transaction[column]}" for kind, column in kinds if transaction.get(column)]
    if not mine:
        return []
    cursor = conn.execute(
        """SELECT user_id, array_agg(entity ORDER BY entity), min(first_seen), max(last_seen)
           FROM entity_customers
           WHERE entity = ANY(%(mine)s) AND user_id <> %(user)s AND last_seen > %(since)s AND first_seen <= %(until)s
           GROUP BY user_id ORDER BY count(*) DESC, max(last_seen) DESC LIMIT %(limit)s""",
        {"mine": mine, "user": transaction["user_id"], "since": at - WINDOW, "until": at + WINDOW, "limit": LINKED},
    )
    customers = [
        {"user_id": user, "shared": shared, "first_seen": first, "last_seen": last, "fraud": 0, "legit": 0}
        for user, shared, first, last in cursor.fetchall()
    ]
    if customers:
        labelled = conn.execute(
            """SELECT t.user_id, count(*) FILTER (WHERE l.label = 'fraud'), count(*) FILTER (WHERE l.label = 'legit')
               FROM transactions t JOIN labels l USING (transaction_id)
               WHERE t.user_id = ANY(%s) AND t.event_time > %s AND t.event_time <= %s GROUP BY t.user_id""",
            ([c["user_id"] for c in customers], at - WINDOW, at + WINDOW),
        ).fetchall()
        counts = {user: (fraud, legit) for user, fraud, legit in labelled}
        for customer in customers:
            customer["fraud"], customer["legit"] = counts.get(customer["user_id"], (0, 0))
    return customers
