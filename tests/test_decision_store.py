"""``DecisionStore`` on the real PostgreSQL: what a batch's binary COPY stores is what was decided."""

from __future__ import annotations

import time

import numpy as np
import orjson

from fraudd.scoring import vectors
from fraudd.scoring.decode import decode_batch
from fraudd.scoring.sinks import DecisionStore, ScoredBatch, Shadow, ShadowRules, alert_documents

from .conftest import Namespace

NOW_MS = int(time.time()) * 1000
PAYLOADS = [
    b'{"transaction_id": "plain", "user_id": "u1", "amount": 12.5, "merchant": "Shell", "timestamp": %d}' % (NOW_MS // 1000),
    b'{"transaction_id": "caf\\u00e9 \\\\ slash", "user_id": "\\u00fcser", "amount": 0.01,'
    b' "merchant": "M\\u00fcnchen \\u2603 \\\\ back",'
    b' "timestamp": %d, "mcc": "5411", "country": "DE", "card_id": "c", "device_id": "d", "ip": "10.0.0.1", "channel": "web",'
    b' "lat": 48.1, "lon": -11.5}' % (NOW_MS // 1000 - 60),
    b'{"transaction_id": "lat only", "user_id": "u3", "amount": 1e6, "merchant": "x", "timestamp": %d,'
    b' "lat": 1.5, "currency": "EUR"}' % (NOW_MS // 1000 - 7),
]


def scored_batch(shadow: bool) -> ScoredBatch:
    batch = decode_batch([f"{NOW_MS}-{i}" for i in range(len(PAYLOADS))], PAYLOADS)
    assert len(batch) == len(PAYLOADS), batch.rejected
    explanation = {"base": -3.5, "contributions": {"amount": 1.25}, "values": {"amount": 1e6, "note": "ünï"}}
    return ScoredBatch(
        batch,
        (batch.timestamp * 1000).astype(np.int64),
        np.zeros(len(batch), dtype=bool),
        np.array([0.125, 0.5, 0.99], dtype=np.float32),
        np.array([0, 1, 2], dtype=np.int8),
        [[], ["velocity"], ["blocklist", "amount_high"]],
        [None, None, explanation],
        "gbm-7",
        NOW_MS + 123,
        "rules-3",
        np.arange(len(batch) * len(vectors.VECTOR_COLUMNS), dtype=np.float32).reshape(len(batch), -1) / 7,
        Shadow(np.array([0.25, 0.75, 0.5], dtype=np.float32), np.array([0, 2, 1], dtype=np.int8), "gbm-8") if shadow else None,
        ShadowRules(np.array([2, 0, 1], dtype=np.int8), "rules-4") if shadow else None,
    )


def stored_rows(ns: Namespace) -> list[tuple]:
    return ns.sql(
        """SELECT transaction_id, user_id, amount, currency, merchant, mcc, country, card_id, device_id, ip, channel, lat, lon,
                  extract(epoch FROM event_time)::numeric, stream_id, extract(epoch FROM scored_at)::numeric, score, decision,
                  reasons, model_version, shadow_score, shadow_decision, shadow_model_version, explanation,
                  rules_version, shadow_rules_version, shadow_rules_decision, features
           FROM transactions ORDER BY stream_id"""
    )


def expected_rows(scored: ScoredBatch) -> list[tuple]:
    b = scored.batch
    rows = []
    for i, document in enumerate(scored.rows(list(range(len(b))))):
        row = orjson.loads(orjson.dumps(document))  # the row as the alert stream carries it
        shadow = scored.shadow
        rows.append(
            (
                *(row[c] for c in ("transaction_id", "user_id", "amount", "currency", "merchant", "mcc", "country")),
                *(row[c] for c in ("card_id", "device_id", "ip", "channel", "lat", "lon")),
                row["event_time"],
                row["stream_id"],
                row["scored_at"],
                float(str(scored.score[i])),  # real reads back at its own precision
                row["decision"],
                row["reasons"],
                row["model_version"],
                None if shadow is None else float(str(shadow.score[i])),
                None if shadow is None else ("approve", "review", "decline")[shadow.decision[i]],
                None if shadow is None else shadow.model_version,
                row["explanation"],
                scored.rules_version,
                None if scored.shadow_rules is None else scored.shadow_rules.version,
                None if scored.shadow_rules is None else ("approve", "review", "decline")[scored.shadow_rules.decision[i]],
                scored.vectors[i].astype("<f4").tobytes(),
            )
        )
    return rows


def normalised(rows: list[tuple]) -> list[tuple]:
    return [
        tuple(float(v) if v.__class__.__name__ == "Decimal" else bytes(v) if isinstance(v, memoryview) else v for v in row)
        for row in rows
    ]


def test_binary_copy_stores_every_value_as_decided(ns: Namespace) -> None:
    store = DecisionStore(ns.postgres_url, ns.schema)
    try:
        for shadow in (False, True):
            scored = scored_batch(shadow)
            store.store(scored)
            assert normalised(stored_rows(ns)) == expected_rows(scored)
            ns.sql("DELETE FROM transactions RETURNING 1")
    finally:
        store.close()


def test_binary_copy_through_staging_keeps_the_stored_decision(ns: Namespace) -> None:
    store = DecisionStore(ns.postgres_url, ns.schema)
    try:
        store.store(scored_batch(shadow=True))
        again = scored_batch(shadow=False)
        again.seen[:] = True
        again.decision[:] = 0
        again.explanations[:] = [None] * len(again)
        store.store(again)
        assert again.decision.tolist() == [0, 1, 2]
        # The alerts carry the stored explanation, not the one the COPY was made with.
        alerted = [orjson.loads(alert.document)["explanation"] for alert in alert_documents(again)]
        assert alerted == [None, scored_batch(shadow=True).explanations[2]]
        assert ns.sql("SELECT count(*) FROM transactions") == [(3,)]
        assert normalised(stored_rows(ns)) == expected_rows(scored_batch(shadow=True))
    finally:
        store.close()


def test_a_transaction_twice_in_one_batch_is_stored_as_its_first_copy_the_one_alerted(ns: Namespace) -> None:
    """Copies of one transaction in one batch (same id, same minute) may differ in content; the
    stored row is the first in stream order, the copy the alert stream carries, whatever the
    server's sort does with the rest."""
    ids, copies = 300, 3
    rng = np.random.default_rng(7)
    order = np.concatenate([rng.permutation(ids) for _ in range(copies)])  # every id's copies spread over the batch
    payloads = [
        orjson.dumps(
            {
                "transaction_id": f"dup_{t}",
                "user_id": f"u{t}",
                "amount": 10.0 + k,
                "merchant": f"copy_{k}",
                "timestamp": NOW_MS // 1000,
            }
        )
        for k, t in enumerate(order.tolist())
    ]
    batch = decode_batch([f"{NOW_MS}-{k}" for k in range(len(payloads))], payloads)
    n = len(batch)
    scored = ScoredBatch(
        batch,
        np.full(n, NOW_MS, dtype=np.int64),
        np.ones(n, dtype=bool),
        np.full(n, 0.5, dtype=np.float32),
        np.ones(n, dtype=np.int8),
        [["velocity"] for _ in range(n)],
        [None] * n,
        "gbm-7",
        NOW_MS + 123,
        "rules-3",
        np.zeros((n, len(vectors.VECTOR_COLUMNS)), dtype=np.float32),
    )
    store = DecisionStore(ns.postgres_url, ns.schema)
    try:
        store.store(scored)
    finally:
        store.close()
    first = {}
    for k, t in enumerate(order.tolist()):
        first.setdefault(f"dup_{t}", (f"{NOW_MS}-{k}", f"copy_{k}", 10.0 + k))
    alerted = {doc.transaction_id: orjson.loads(doc.document) for doc in alert_documents(scored)}
    assert {txid: (a["stream_id"], a["merchant"], a["amount"]) for txid, a in alerted.items()} == first
    stored = {
        txid: (stream_id, merchant, amount)
        for txid, stream_id, merchant, amount in ns.sql("SELECT transaction_id, stream_id, merchant, amount FROM transactions")
    }
    assert stored == first
