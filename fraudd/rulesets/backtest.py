"""What a rule set would have decided on the stored decisions, against what was decided.

Every stored decision carries the feature vector it was made from (``scoring/vectors.py``), so a
candidate set is evaluated on them directly: no replay of the stream, no Redis, one vectorised pass
per chunk with the rules code the workers run. The rows are read with one binary COPY of
fixed-width records that numpy reads as they arrive, so a million rows cost the transfer and little
else. They are counted a chunk at a time (``Tally``) and let go: a window of 30 days at production
rates is gigabytes of records, which the console's process must never hold at once.

The same comparison serves a set in shadow (``fraudd rules report``), whose would-be decisions the
workers stored beside the live ones.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from psycopg import sql

from fraudd.schema import connect, one_row
from fraudd.scoring import vectors
from fraudd.scoring.rules import DECISIONS, REVIEW, Rules, decide

TXID_BYTES = 64  # the longest transaction id the decoder accepts
_HEADER = 19  # PGCOPY signature, flags, header extension length
_TRAILER = 2  # the field count -1 that ends the COPY
_FIELDS = (("txid", f"S{TXID_BYTES}"), ("event_ms", ">i8"), ("amount", ">f8"), ("decision", ">i2"), ("label", ">i2"))
_RECORD = np.dtype(
    [("fields", ">i2")]
    + [item for name, kind in _FIELDS for item in ((f"{name}_length", ">i4"), (name, kind))]
    + [("shadow_length", ">i4"), ("shadow", ">i2"), ("vector_length", ">i4"), ("vector", f"V{vectors.VECTOR_BYTES}")]
)
RECORD_BYTES = _RECORD.itemsize  # one decision as the COPY sends it
_DECISION_CODE = "CASE {column} WHEN 'approve' THEN 0 WHEN 'review' THEN 1 WHEN 'decline' THEN 2 ELSE -1 END::int2"
CHUNK_ROWS = 16_384  # records read and evaluated at once per part: a few MB, whatever the window
PARTS = 2  # time ranges read at once, over as many connections: one per core
SAMPLES = 5  # transaction ids shown per change of decision
TOP_RULES = 10
_N = len(DECISIONS)
# The high half of the advisory lock key of a store's backtest turn; the low half is the oid of the
# store's ``transactions``, so stores in other schemas of the database never wait on each other.
_TURN = 0x62746573  # "btes"


@dataclass(slots=True)
class Stored:
    """A chunk of stored decisions, column-wise, in the order the COPY sent them."""

    transaction_id: np.ndarray  # S64, NUL-padded UTF-8
    event_ms: np.ndarray  # int64
    amount: np.ndarray  # float64
    decision: np.ndarray  # int8: what was decided (the live set of its time)
    label: np.ndarray  # int8: 1 fraud, 0 legit, -1 not labelled
    shadow: np.ndarray  # int8: the shadow set's decision, -1 where none ran
    vectors: np.ndarray  # float32 (n, len(VECTOR_COLUMNS))

    def __len__(self) -> int:
        return len(self.decision)


def _zeros(rules: int = 0) -> np.ndarray:
    return np.zeros(rules, dtype=np.int64)


@dataclass(slots=True)
class Tally:
    """What a report is made of, counted chunk by chunk: counts and a few sample ids, never rows."""

    # Rows per (label + 1, live decision, candidate decision): every count of the report is a sum of these.
    outcomes: np.ndarray = field(default_factory=lambda: np.zeros((3, _N, _N), dtype=np.int64))
    first_ms: int = int(np.iinfo(np.int64).max)
    last_ms: int = int(np.iinfo(np.int64).min)
    # Per change of decision (live * _N + candidate): its first transaction ids, in read order.
    samples: dict[int, list[str]] = field(default_factory=dict)
    # Per rule of the candidate, where its rules are counted (``of_rules``): rows it fired on, of
    # them the labelled ones, and of those the ones labelled fraud.
    hits: np.ndarray = field(default_factory=_zeros)
    labelled_hits: np.ndarray = field(default_factory=_zeros)
    true_hits: np.ndarray = field(default_factory=_zeros)

    @classmethod
    def of_rules(cls, rules: int) -> Tally:
        return cls(hits=_zeros(rules), labelled_hits=_zeros(rules), true_hits=_zeros(rules))

    def add(self, stored: Stored, candidate: np.ndarray, fired: np.ndarray | None = None) -> None:
        """Count ``stored`` as decided ``candidate`` (``fired``: which rule fired on which row)."""
        if not len(stored):
            return
        self.first_ms = min(self.first_ms, int(stored.event_ms.min()))
        self.last_ms = max(self.last_ms, int(stored.event_ms.max()))
        pairs = stored.decision.astype(np.intp) * _N + candidate
        cells = (stored.label.astype(np.intp) + 1) * _N * _N + pairs
        self.outcomes += np.bincount(cells, minlength=self.outcomes.size).reshape(self.outcomes.shape)
        for pair in np.unique(pairs).tolist():
            taken = self.samples.setdefault(pair, [])
            if pair % (_N + 1) and len(taken) < SAMPLES:  # a change (live != candidate) still short of samples
                rows = np.flatnonzero(pairs == pair)[: SAMPLES - len(taken)]
                taken += [txid.rstrip(b"\0").decode() for txid in stored.transaction_id[rows].tolist()]
        if fired is not None:
            labelled, fraud = stored.label >= 0, stored.label == 1
            self.hits += fired.sum(axis=0)
            self.labelled_hits += (fired & labelled[:, None]).sum(axis=0)
            self.true_hits += (fired & fraud[:, None]).sum(axis=0)

    def then(self, later: Tally) -> Tally:
        """This tally followed by ``later``'s rows (read after these: its samples come second)."""
        return Tally(
            self.outcomes + later.outcomes,
            min(self.first_ms, later.first_ms),
            max(self.last_ms, later.last_ms),
            {
                pair: (self.samples.get(pair, []) + later.samples.get(pair, []))[:SAMPLES]
                for pair in self.samples.keys() | later.samples.keys()
            },
            self.hits + later.hits,
            self.labelled_hits + later.labelled_hits,
            self.true_hits + later.true_hits,
        )

    def report(self, minutes_per_case: float, rules: Rules | None = None) -> dict[str, Any]:
        """The report: decisions changing by pair, extra cases (reviews) per day and the analyst
        hours they mean, recall and precision against the labels for both sets, the rules that fire
        most (with their precision once labelled: given ``rules``, the ones counted) and sample
        transactions per change."""
        n = int(self.outcomes.sum())
        span_days = max(float(self.last_ms - self.first_ms) / 86_400_000 if n else 0.0, 1.0)
        pairs = self.outcomes.sum(axis=0)  # (live, candidate)
        changed: dict[str, int] = {}
        sample_ids: dict[str, list[str]] = {}
        for pair in np.flatnonzero(pairs).tolist():
            before, after = divmod(pair, _N)
            if before == after:
                continue
            name = f"{DECISIONS[before]}->{DECISIONS[after]}"
            changed[name] = int(pairs.flat[pair])
            sample_ids[name] = self.samples[pair]
        live, candidate = pairs.sum(axis=1), pairs.sum(axis=0)
        extra_per_day = (int(candidate[REVIEW]) - int(live[REVIEW])) / span_days
        labelled = int(self.outcomes[1:].sum())
        report = {
            "transactions": n,
            "days": round(span_days, 3),
            "changed": changed,
            "extra_cases_per_day": round(extra_per_day, 3),
            "analyst_hours_per_day": round(extra_per_day * minutes_per_case / 60.0, 3),
            "minutes_per_case": minutes_per_case,
            "decisions": {"live": dict(zip(DECISIONS, live.tolist())), "candidate": dict(zip(DECISIONS, candidate.tolist()))},
            "labelled": labelled,
            "samples": sample_ids,
        }
        if labelled:
            # (live, candidate) counts of the rows labelled fraud and of all labelled ones; flagged
            # (review or decline) by the live set is [1:], by the candidate [:, 1:].
            fraud, judged = self.outcomes[2], self.outcomes[1:].sum(axis=0)
            frauds = fraud.sum()
            report["recall"] = {"live": _share(fraud[1:].sum(), frauds), "candidate": _share(fraud[:, 1:].sum(), frauds)}
            report["precision"] = {
                "live": _share(fraud[1:].sum(), judged[1:].sum()),
                "candidate": _share(fraud[:, 1:].sum(), judged[:, 1:].sum()),
            }
        if rules is not None and len(self.hits):
            order = np.argsort(-self.hits, kind="stable")[:TOP_RULES]
            report["top_rules"] = [
                {
                    "rule": rules.rules[i].code,
                    "hits": int(self.hits[i]),
                    "precision": round(float(self.true_hits[i] / self.labelled_hits[i]), 4) if self.labelled_hits[i] else None,
                }
                for i in order.tolist()
                if self.hits[i]
            ]
        return report


def _share(part: int, whole: int) -> float | None:
    return round(int(part) / int(whole), 4) if whole else None


class Busy(Exception):
    """Another backtest holds the store's turn."""


@contextmanager
def turn(url: str, pg_schema: str) -> Iterator[None]:
    """Hold the one backtest turn of the store, or raise ``Busy`` at once. A backtest reads the whole
    window from PostgreSQL: anyone signed in to the console may ask for one, and each asked for
    again while one runs would be another full scan, so the console runs one at a time, across its
    processes, and refuses the rest rather than queueing them. The lock is the session's: a process
    that dies gives it back with its connection."""
    with connect(url, pg_schema, connect_timeout=5, autocommit=True) as conn:  # closed: the lock given back
        key = one_row(conn.execute("SELECT (%s::int8 << 32) | 'transactions'::regclass::oid::int8", (_TURN,)))[0]
        if not one_row(conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)))[0]:
            raise Busy("A backtest is running; try again when it has finished.")
        yield


def test(url: str, pg_schema: str, candidate: Rules, since_s: float, minutes_per_case: float) -> dict[str, Any]:
    """The report of ``fraudd rules test`` (and of the console's Run test): ``candidate`` evaluated
    on the decisions of the last ``since_s`` seconds, against what was decided."""

    def count(tally: Tally, stored: Stored) -> None:
        tally.add(stored, *evaluate(stored, candidate))

    tally = scan(url, pg_schema, since_s, lambda: Tally.of_rules(len(candidate.rules)), count)
    report = tally.report(minutes_per_case, candidate)
    report["candidate"] = candidate.version
    return report


def shadow_report(url: str, pg_schema: str, since_s: float, version: int, minutes_per_case: float) -> dict[str, Any]:
    """The report of ``fraudd rules report``: what set ``version`` decided in shadow over the last
    ``since_s`` seconds, against what the live set decided."""
    tally = scan(url, pg_schema, since_s, Tally, lambda tally, stored: tally.add(stored, stored.shadow), str(version))
    report = tally.report(minutes_per_case)
    report["candidate"] = str(version)
    return report


def evaluate(stored: Stored, candidate: Rules) -> tuple[np.ndarray, np.ndarray]:
    """(decisions, fired): what ``candidate`` decides on each stored row, and which of its rules fired."""
    features, by_model = vectors.unpack(stored.vectors, stored.amount)
    fired = candidate.fired(features)
    return decide(by_model, candidate.actions(fired)), fired


def scan(
    url: str,
    pg_schema: str,
    since_s: float,
    start: Callable[[], Tally],
    count: Callable[[Tally, Stored], None],
    shadow_version: str | None = None,
) -> Tally:
    """Every chunk of the decisions of the last ``since_s`` seconds that have a feature vector, of
    today's layout or an earlier one (a prefix of today's, read with the columns it predates as 0:
    ``vectors``), and, given ``shadow_version``, only those that set decided in shadow, ``count``-ed.

    A COPY runs in one server process, whose encoding of the rows is most of the cost: the window is
    cut into ``PARTS`` time ranges read at once over as many connections, each counted into a tally
    of its own (``start``) and joined in time order at the end, so the rows are counted in the order
    one read of the whole window would meet them, however they are chunked."""
    now = time.time()
    bounds = [*np.linspace(now - since_s, now, PARTS + 1).tolist()[:-1], float("inf")]  # the last part: to the end

    def part(i: int) -> Tally:
        tally = start()
        for stored in chunks(url, pg_schema, bounds[i], bounds[i + 1], shadow_version):
            count(tally, stored)
        return tally

    with ThreadPoolExecutor(PARTS) as pool:
        return functools.reduce(Tally.then, pool.map(part, range(PARTS)))


def chunks(url: str, pg_schema: str, start_s: float, end_s: float, shadow_version: str | None = None) -> Iterator[Stored]:
    """The records of event times in [start_s, end_s), by one binary COPY, ``CHUNK_ROWS`` at a time
    as they arrive: the server streams them, so no more than a chunk is held here."""
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
    chunk_bytes = CHUNK_ROWS * RECORD_BYTES
    pending = bytearray()
    skip = _HEADER  # the COPY's header, ahead of the first record
    with connect(url, pg_schema, connect_timeout=5) as conn, conn.cursor() as cur, cur.copy(query) as copy:
        for data in copy:
            pending += data
            while len(pending) >= skip + chunk_bytes:
                yield _stored(bytes(pending[skip : skip + chunk_bytes]))
                del pending[: skip + chunk_bytes]
                skip = 0
    if len(pending) > skip + _TRAILER:
        yield _stored(bytes(pending[skip : len(pending) - _TRAILER]))


def _stored(records: bytes) -> Stored:
    """Whole fixed-width records as columns."""
    array = np.frombuffer(records, dtype=_RECORD)
    return Stored(
        transaction_id=array["txid"],
        event_ms=array["event_ms"].astype(np.int64),
        amount=array["amount"].astype(np.float64),
        decision=array["decision"].astype(np.int8),
        label=array["label"].astype(np.int8),
        shadow=array["shadow"].astype(np.int8),
        vectors=np.frombuffer(array["vector"].tobytes(), dtype="<f4").reshape(len(array), len(vectors.VECTOR_COLUMNS)),
    )
