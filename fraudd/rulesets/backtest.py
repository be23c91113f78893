"""What a rule set would have decided on the stored decisions, against what was decided.

Every stored decision carries the feature vector it was made from (``scoring/vectors.py``), so a
candidate set is evaluated on them directly: no replay of the stream, no Redis, one vectorised pass
with the rules code the workers run. The rows are read with one binary COPY of fixed-width records
that numpy reads as they arrive, so a million rows cost the transfer and little else.

The same comparison serves a set in shadow (``fraudd rules report``), whose would-be decisions the
workers stored beside the live ones.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from psycopg import sql

from fraudd.schema import connect
from fraudd.scoring import vectors
from fraudd.scoring.rules import DECISIONS, REVIEW, Rules, decide

TXID_BYTES = 64  # the longest transaction id the decoder accepts
_HEADER = 19  # PGCOPY signature, flags, header extension length
_FIELDS = (("txid", f"S{TXID_BYTES}"), ("event_ms", ">i8"), ("amount", ">f8"), ("decision", ">i2"), ("label", ">i2"))
_RECORD = np.dtype(
    [("fields", ">i2")]
    + [item for name, kind in _FIELDS for item in ((f"{name}_length", ">i4"), (name, kind))]
    + [("shadow_length", ">i4"), ("shadow", ">i2"), ("vector_length", ">i4"), ("vector", f"V{vectors.VECTOR_BYTES}")]
)
_DECISION_CODE = "CASE {column} WHEN 'approve' THEN 0 WHEN 'review' THEN 1 WHEN 'decline' THEN 2 ELSE -1 END::int2"


@dataclass(slots=True)
class Stored:
    """Stored decisions, column-wise, oldest first is not promised."""

    transaction_id: np.ndarray  # S64, NUL-padded UTF-8
    event_ms: np.ndarray  # int64
    amount: np.ndarray  # float64
    decision: np.ndarray  # int8: what was decided (the live set of its time)
    label: np.ndarray  # int8: 1 fraud, 0 legit, -1 not labelled
    shadow: np.ndarray  # int8: the shadow set's decision, -1 where none ran
    vectors: np.ndarray  # float32 (n, len(VECTOR_COLUMNS))

    def __len__(self) -> int:
        return len(self.decision)


def load(url: str, pg_schema: str, since_s: float, shadow_version: str | None = None, parts: int = 2) -> Stored:
    """The decisions of the last ``since_s`` seconds that have a feature vector, of today's layout or
    an earlier one (a prefix of today's, read with the columns it predates as 0: ``vectors``), and,
    given ``shadow_version``, only those that set decided in shadow.

    A COPY runs in one server process, whose encoding of the rows is most of the cost: the window is
    cut into ``parts`` time ranges read at once over as many connections, one per core."""
    now = time.time()
    bounds = [*np.linspace(now - since_s, now, parts + 1).tolist()[:-1], float("inf")]  # the last part: to the end
    with ThreadPoolExecutor(parts) as pool:
        chunks = list(pool.map(lambda i: _copy_out(url, pg_schema, bounds[i], bounds[i + 1], shadow_version), range(parts)))
    records = np.concatenate(chunks) if chunks else np.empty(0, dtype=_RECORD)
    return Stored(
        transaction_id=records["txid"],
        event_ms=records["event_ms"].astype(np.int64),
        amount=records["amount"].astype(np.float64),
        decision=records["decision"].astype(np.int8),
        label=records["label"].astype(np.int8),
        shadow=records["shadow"].astype(np.int8),
        vectors=np.frombuffer(records["vector"].tobytes(), dtype="<f4").reshape(len(records), len(vectors.VECTOR_COLUMNS)),
    )


def _copy_out(url: str, pg_schema: str, start_s: float, end_s: float, shadow_version: str | None) -> np.ndarray:
    """The records of event times in [start_s, end_s), by one binary COPY."""
    shadow_filter = sql.SQL("") if shadow_version is None else sql.SQL("AND t.shadow_rules_version = {}").format(shadow_version)
    query = sql.SQL(
        """COPY (SELECT substring(convert_to(t.transaction_id, 'UTF8') || {pad} FROM 1 FOR {width}),
                        (extract(epoch FROM t.event_time) * 1000)::int8, t.amount, {decision},
                        coalesce(CASE l.label WHEN 'fraud' THEN 1 WHEN 'legit' THEN 0 END, -1)::int2,
                        {shadow}, substring(t.features || {zeros} FROM 1 FOR {size})
                 FROM transactions t LEFT JOIN labels l USING (transaction_id)
                 WHERE t.event_time >= to_timestamp({start}) AND t.event_time < to_timestamp({end})
                   AND octet_length(t.features) IN ({layouts}) {shadow_filter})
           TO STDOUT (FORMAT binary)"""
    ).format(
        pad=sql.Literal(bytes(TXID_BYTES)),
        width=sql.Literal(TXID_BYTES),
        decision=sql.SQL(_DECISION_CODE.format(column="t.decision")),
        shadow=sql.SQL(_DECISION_CODE.format(column="t.shadow_rules_decision")),
        start=sql.Literal(start_s),
        end=sql.Literal(end_s),
        size=sql.Literal(vectors.VECTOR_BYTES),
        zeros=sql.Literal(bytes(vectors.VECTOR_BYTES)),
        layouts=sql.SQL(", ").join(map(sql.Literal, vectors.LAYOUT_BYTES)),
        shadow_filter=shadow_filter,
    )
    data = bytearray()
    with connect(url, pg_schema, connect_timeout=5) as conn, conn.cursor() as cur, cur.copy(query) as copy:
        for chunk in copy:
            data += chunk
    return np.frombuffer(memoryview(data)[_HEADER : len(data) - 2], dtype=_RECORD) if data else np.empty(0, dtype=_RECORD)


def test(url: str, pg_schema: str, candidate: Rules, since_s: float, minutes_per_case: float) -> dict[str, Any]:
    """The report of ``fraudd rules test`` (and of the console's Run test): ``candidate`` evaluated
    on the decisions of the last ``since_s`` seconds, against what was decided."""
    stored = load(url, pg_schema, since_s)
    decisions, fired = evaluate(stored, candidate)
    report = compare(stored, decisions, minutes_per_case, fired, candidate)
    report["candidate"] = candidate.version
    return report


def evaluate(stored: Stored, candidate: Rules) -> tuple[np.ndarray, np.ndarray]:
    """(decisions, fired): what ``candidate`` decides on each stored row, and which of its rules fired."""
    features, by_model = vectors.unpack(stored.vectors, stored.amount)
    fired = candidate.fired(features)
    return decide(by_model, candidate.actions(fired)), fired


def compare(
    stored: Stored,
    candidate: np.ndarray,
    minutes_per_case: float,
    fired: np.ndarray | None = None,
    rules: Rules | None = None,
    samples: int = 5,
    top: int = 10,
) -> dict[str, Any]:
    """The report: decisions changing by pair, extra cases (reviews) per day and the analyst hours
    they mean, recall and precision against the labels for both sets, the rules that fire most
    (with their precision once labelled) and sample transactions per change."""
    n = len(stored)
    live = stored.decision
    span_days = max(float(stored.event_ms.max() - stored.event_ms.min()) / 86_400_000 if n else 0.0, 1.0)
    pairs = live.astype(np.intp) * len(DECISIONS) + candidate
    counts = np.bincount(pairs, minlength=len(DECISIONS) ** 2)
    changed: dict[str, int] = {}
    sample_ids: dict[str, list[str]] = {}
    for pair in np.flatnonzero(counts).tolist():
        before, after = divmod(pair, len(DECISIONS))
        if before == after:
            continue
        name = f"{DECISIONS[before]}->{DECISIONS[after]}"
        changed[name] = int(counts[pair])
        rows = np.flatnonzero(pairs == pair)[:samples]
        sample_ids[name] = [txid.rstrip(b"\0").decode() for txid in stored.transaction_id[rows].tolist()]
    extra_cases = int((candidate == REVIEW).sum()) - int((live == REVIEW).sum())
    extra_per_day = extra_cases / span_days
    report = {
        "transactions": n,
        "days": round(span_days, 3),
        "changed": changed,
        "extra_cases_per_day": round(extra_per_day, 3),
        "analyst_hours_per_day": round(extra_per_day * minutes_per_case / 60.0, 3),
        "minutes_per_case": minutes_per_case,
        "decisions": {
            "live": _by_decision(live),
            "candidate": _by_decision(candidate),
        },
        "labelled": int((stored.label >= 0).sum()),
        "samples": sample_ids,
    }
    fraud, labelled = stored.label == 1, stored.label >= 0
    if labelled.any():
        report["recall"] = {"live": _recall(live, fraud), "candidate": _recall(candidate, fraud)}
        report["precision"] = {"live": _precision(live, fraud, labelled), "candidate": _precision(candidate, fraud, labelled)}
    if fired is not None and rules is not None and fired.shape[1]:
        hits = fired.sum(axis=0)
        true_hits = (fired & fraud[:, None]).sum(axis=0)
        labelled_hits = (fired & labelled[:, None]).sum(axis=0)
        order = np.argsort(-hits, kind="stable")[:top]
        report["top_rules"] = [
            {
                "rule": rules.rules[i].code,
                "hits": int(hits[i]),
                "precision": round(float(true_hits[i] / labelled_hits[i]), 4) if labelled_hits[i] else None,
            }
            for i in order.tolist()
            if hits[i]
        ]
    return report


def _by_decision(decision: np.ndarray) -> dict[str, int]:
    counts = np.bincount(decision.astype(np.intp), minlength=len(DECISIONS))
    return dict(zip(DECISIONS, counts.tolist()))


def _recall(decision: np.ndarray, fraud: np.ndarray) -> float | None:
    frauds = int(fraud.sum())
    return round(int((fraud & (decision > 0)).sum()) / frauds, 4) if frauds else None


def _precision(decision: np.ndarray, fraud: np.ndarray, labelled: np.ndarray) -> float | None:
    flagged = (decision > 0) & labelled
    return round(int((flagged & fraud).sum()) / int(flagged.sum()), 4) if flagged.any() else None
