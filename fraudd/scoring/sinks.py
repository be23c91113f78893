"""Where a batch's results go, in the order that makes them safe: PostgreSQL first, Redis last.

``DecisionStore`` writes every decision of a batch to ``transactions`` with one COPY. It is
idempotent: a batch holding a transaction that may already be stored (a redelivery, a producer
retry) goes through a staging table and ``ON CONFLICT DO NOTHING``, and the stored row's decision
wins, so the alert stream always carries the decision PostgreSQL holds. Batches with nothing seen
before take the plain COPY, which costs half the server time.

``settle`` then does the Redis side in one atomic script call: alerts for non-approved
transactions, dead letters, the XACK of every entry, and the decisions of ``/v1/score`` entries
sent to the ingest instances waiting for them (one sharded-pub/sub message per instance and batch).
Atomic means a crash leaves either all of it or none of it, and an entry is acked only after its
row is durable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import numpy as np
import orjson
import psycopg
import redis
from redis.cluster import RedisCluster

from ..keys import Keys
from ..runtime.deadletters import Rejected, kept_field_pairs
from ..runtime.redis_clients import ReplicaWait, redis_error_code
from ..schema import connect
from . import vectors
from .decode import DecodedBatch
from .dedup import buckets, entry_bucket
from .leases import Fenced, Lease
from .rules import DECISIONS

COLUMNS = (
    "transaction_id",
    "user_id",
    "amount",
    "currency",
    "merchant",
    "mcc",
    "country",
    "card_id",
    "device_id",
    "ip",
    "channel",
    "lat",
    "lon",
    "event_time",
    "stream_id",
    "scored_at",
    "score",
    "decision",
    "reasons",
    "model_version",
    "shadow_score",
    "shadow_decision",
    "shadow_model_version",
    "explanation",
    "rules_version",
    "shadow_rules_version",
    "shadow_rules_decision",
    "features",
)
_COLUMN_LIST = ", ".join(COLUMNS)
_TEXT_SPECIALS = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_NULL = "\\N"


@dataclass(slots=True)
class Shadow:
    """A challenger model's scores and decisions for a batch: stored, never acted on."""

    score: np.ndarray  # float32
    decision: np.ndarray  # int8 index into DECISIONS
    model_version: str

    def take(self, index: np.ndarray) -> Shadow:
        return Shadow(self.score[index], self.decision[index], self.model_version)


@dataclass(slots=True)
class ShadowRules:
    """What the rule set in shadow would have decided for a batch: stored, never acted on."""

    decision: np.ndarray  # int8 index into DECISIONS
    version: str

    def take(self, index: np.ndarray) -> ShadowRules:
        return ShadowRules(self.decision[index], self.version)


@dataclass(slots=True)
class ScoredBatch:
    """A decoded batch with its outcome; ``decision``/``score``/``reasons`` are final after storing."""

    batch: DecodedBatch
    event_ms: np.ndarray  # int64: first occurrence's event time, the partition key
    seen: np.ndarray  # bool: may already be stored
    score: np.ndarray  # float32
    decision: np.ndarray  # int8 index into DECISIONS
    reasons: list[list[str]]
    explanations: list[dict[str, Any] | None]  # the model's explanation of each non-approved row
    model_version: str
    scored_at_ms: int
    rules_version: str
    vectors: np.ndarray  # float32 (n, len(vectors.VECTOR_COLUMNS)): what each decision was made from
    shadow: Shadow | None = None  # the challenger's view of the batch (--shadow-model)
    shadow_rules: ShadowRules | None = None  # the rule set in shadow's view of the batch

    def __len__(self) -> int:
        return len(self.batch)

    @property
    def entry_ids(self) -> list[str]:
        return self.batch.entry_ids

    def take(self, rows: range) -> ScoredBatch:
        """The sub-batch of the given row positions (to bisect a batch that fails to store)."""
        index = np.asarray(rows, dtype=np.intp)
        return ScoredBatch(
            self.batch.take(rows),
            self.event_ms[index],
            self.seen[index],
            self.score[index],
            self.decision[index],
            [self.reasons[i] for i in rows],
            [self.explanations[i] for i in rows],
            self.model_version,
            self.scored_at_ms,
            self.rules_version,
            self.vectors[index],
            None if self.shadow is None else self.shadow.take(index),
            None if self.shadow_rules is None else self.shadow_rules.take(index),
        )

    def row(self, i: int) -> dict[str, Any]:
        """Row ``i`` as the JSON document the alert stream carries (the ``transactions`` row)."""
        b = self.batch
        lat, lon = float(b.lat[i]), float(b.lon[i])
        return {
            "transaction_id": b.transaction_id[i],
            "user_id": b.user_id[i],
            "amount": float(b.amount[i]),
            "currency": b.currency[i],
            "merchant": b.merchant[i],
            "mcc": b.mcc[i],
            "country": b.country[i],
            "card_id": b.card_id[i],
            "device_id": b.device_id[i],
            "ip": b.ip[i],
            "channel": b.channel[i],
            "lat": None if math.isnan(lat) else lat,
            "lon": None if math.isnan(lon) else lon,
            "event_time": int(self.event_ms[i]) / 1000.0,
            "stream_id": b.entry_ids[i],
            "scored_at": self.scored_at_ms / 1000.0,
            "score": round(float(self.score[i]), 6),
            "decision": DECISIONS[self.decision[i]],
            "reasons": self.reasons[i],
            "model_version": self.model_version,
            "rules_version": self.rules_version,
            "explanation": self.explanations[i],
        }


class DecisionStore:
    """Writes decisions to PostgreSQL; one connection, owned by one worker."""

    def __init__(self, url: str, pg_schema: str, timeout_ms: int = 0) -> None:
        """``timeout_ms`` (0: none): how long a statement or an open transaction may last. An owner of
        a shard paused in the middle of a COPY holds row locks its successor would wait on for as long
        as the pause; PostgreSQL ends such a session after this time instead."""
        self._url = url
        self._schema = pg_schema
        self._timeout_ms = timeout_ms
        self._conn: psycopg.Connection | None = None

    def connect(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            # Autocommit: a batch with nothing seen before is one COPY statement, atomic on its own,
            # without a BEGIN and a COMMIT round trip around it (two of the four a batch paid).
            conn = connect(self._url, self._schema, connect_timeout=5, application_name="fraudd-worker", autocommit=True)
            conn.execute("SET TIME ZONE 'UTC'")
            if self._timeout_ms:
                conn.execute(f"SET statement_timeout = {int(self._timeout_ms)}")
                conn.execute(f"SET idle_in_transaction_session_timeout = {int(self._timeout_ms)}")
            conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS fraudd_staging (LIKE transactions INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def store(self, scored: ScoredBatch) -> None:
        """Make every decision of the batch durable; afterwards ``scored`` holds the stored decisions.

        Raises psycopg errors as they come: the caller retries the batch on connection trouble.
        """
        if len(scored.batch) == 0:
            return
        conn = self.connect()
        data = _copy_text(scored)
        if scored.seen.any():
            self._store_idempotent(conn, scored, data)
            return
        try:
            with conn.cursor().copy(f"COPY transactions ({_COLUMN_LIST}) FROM STDIN") as copy:
                copy.write(data)
        except psycopg.errors.UniqueViolation:
            # Stored before although Redis had no dedup marker (the marker expired, or Redis lost
            # it): the COPY wrote nothing; take the idempotent path for this batch.
            self._store_idempotent(conn, scored, data)

    def _store_idempotent(self, conn: psycopg.Connection, scored: ScoredBatch, data: bytes) -> None:
        # One transaction: the staging table empties itself at its commit.
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(f"COPY fraudd_staging ({_COLUMN_LIST}) FROM STDIN") as copy:
                copy.write(data)
            cur.execute(
                f"""INSERT INTO transactions ({_COLUMN_LIST})
                    SELECT DISTINCT ON (transaction_id, event_time) {_COLUMN_LIST} FROM fraudd_staging
                    ON CONFLICT DO NOTHING"""
            )
            # Every id of the batch now has exactly one row; read them back so the alerts carry
            # what PostgreSQL holds, including decisions an earlier delivery stored. The batch's
            # time bounds let the server skip other partitions and, in a compressed TimescaleDB
            # chunk, decompress only the batches of that time range instead of the whole chunk.
            cur.execute(
                """SELECT t.transaction_id, t.score, t.decision, t.reasons, t.explanation
                   FROM transactions t JOIN fraudd_staging s USING (transaction_id, event_time)
                   WHERE t.event_time BETWEEN (SELECT min(event_time) FROM fraudd_staging)
                                          AND (SELECT max(event_time) FROM fraudd_staging)"""
            )
            stored = {row[0]: row[1:] for row in cur.fetchall()}
        _adopt_stored(scored, stored)


def _adopt_stored(scored: ScoredBatch, stored: dict[str, tuple[Any, ...]]) -> None:
    decision_index = {name: i for i, name in enumerate(DECISIONS)}
    for i, txid in enumerate(scored.batch.transaction_id):
        if txid in stored:
            score, decision, reasons, explanation = stored[txid]
            scored.score[i] = score
            scored.decision[i] = decision_index[decision]
            scored.reasons[i] = list(reasons)
            scored.explanations[i] = explanation


def _copy_text(scored: ScoredBatch) -> bytes:
    """The batch in COPY text format, built column-wise: a few joins, not a formatter per value."""
    b = scored.batch
    n = len(b)
    event_time = _timestamps(scored.event_ms)
    scored_at = _timestamps(np.array([scored.scored_at_ms], dtype=np.int64))[0]
    columns = [
        _text_column(b.transaction_id),
        _text_column(b.user_id),
        list(map(repr, b.amount.tolist())),
        _text_column(b.currency),
        _text_column(b.merchant),
        _text_column(b.mcc),
        _text_column(b.country),
        _text_column(b.card_id),
        _text_column(b.device_id),
        _text_column(b.ip),
        _text_column(b.channel),
        _float_column(b.lat),
        _float_column(b.lon),
        event_time,
        b.entry_ids,
        [scored_at] * n,
        list(map(repr, scored.score.tolist())),
        [DECISIONS[d] for d in scored.decision.tolist()],
        ["{" + ",".join(r) + "}" for r in scored.reasons],
        [scored.model_version] * n,
        *_shadow_columns(scored.shadow, n),
        _text_column([None if e is None else orjson.dumps(e).decode() for e in scored.explanations]),
        [scored.rules_version] * n,
        *_shadow_rules_columns(scored.shadow_rules, n),
        vectors.copy_text(scored.vectors),
    ]
    return ("\n".join(map("\t".join, zip(*columns))) + "\n").encode()


def _shadow_columns(shadow: Shadow | None, n: int) -> list[list[str]]:
    if shadow is None:
        return [[_NULL] * n] * 3
    return [list(map(repr, shadow.score.tolist())), [DECISIONS[d] for d in shadow.decision.tolist()], [shadow.model_version] * n]


def _shadow_rules_columns(shadow: ShadowRules | None, n: int) -> list[list[str]]:
    if shadow is None:
        return [[_NULL] * n] * 2
    return [_text_column([shadow.version] * n), [DECISIONS[d] for d in shadow.decision.tolist()]]


def _timestamps(ms: np.ndarray) -> list[str]:
    # The session runs in UTC, so an ISO timestamp without offset is read as UTC.
    texts: list[str] = np.datetime_as_string(ms.astype("datetime64[ms]"), unit="ms").tolist()
    return texts


def _text_column(values: Sequence[str | None]) -> list[str]:
    # Without a None the column is used as it is, not copied.
    texts = [_NULL if v is None else v for v in values] if None in values else cast(list[str], values)
    joined = "".join(texts)
    if "\\" in joined or "\t" in joined or "\n" in joined or "\r" in joined:
        # Only columns that hold a special character pay for per-value escaping.
        texts = [v if v is _NULL else v.translate(_TEXT_SPECIALS) for v in texts]
    return texts


def _float_column(values: np.ndarray) -> list[str]:
    return [_NULL if v != v else repr(v) for v in values.tolist()]


# Alerts, dead letters and acks of one batch, atomically. Alerts and dead letters are guarded by a
# marker per transaction / entry, kept like the dedup markers (dedup.py): a set per minute of event
# time (of entry time for dead letters), living as long as the dedup window after its last
# addition. A redelivered entry or a producer duplicate never alerts twice, and an entry reclaimed
# from a slow worker is never dead-lettered twice.
SETTLE_SCRIPT = """
local stream, fraud, dlq = KEYS[1], KEYS[2], KEYS[3]
local group, window_ms = ARGV[1], ARGV[2]
local alerted, dead = ARGV[3], ARGV[4]
local n_alerts, n_dead, n_replies = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local source = ARGV[9]  -- the shard's input stream, named in each dead letter for `fraudd dlq replay`
-- An owned shard's settle writes only while the lease (KEYS[4]) still holds the token (ARGV[8]).
if ARGV[8] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[8] then
  return redis.error_reply('FENCED the shard lease has another owner')
end
local touched = {}
local i = 10
local alerts_written, dead_written = 0, 0
for _ = 1, n_alerts do
  local key = alerted .. ARGV[i + 1]
  touched[key] = true
  if redis.call('SADD', key, ARGV[i]) == 1 then
    redis.call('XADD', fraud, '*', 'data', ARGV[i + 2])
    alerts_written = alerts_written + 1
  end
  i = i + 3
end
for _ = 1, n_dead do
  local key = dead .. ARGV[i + 1]
  local kept = tonumber(ARGV[i + 7])  -- field pairs kept of an entry without data
  touched[key] = true
  if redis.call('SADD', key, ARGV[i]) == 1 then
    redis.call('XADD', dlq, '*', 'data', ARGV[i + 2], 'reason', ARGV[i + 3], 'detail', ARGV[i + 4],
               'source_id', ARGV[i], 'source_stream', source, 'consumer', ARGV[i + 5], 'deliveries', ARGV[i + 6],
               unpack(ARGV, i + 8, i + 7 + 2 * kept))
    dead_written = dead_written + 1
  end
  i = i + 8 + 2 * kept
end
for key in pairs(touched) do redis.call('PEXPIRE', key, window_ms) end
local replies = i
i = i + 2 * n_replies
local acked = 0
while i <= #ARGV do
  local last = math.min(i + 3999, #ARGV)
  acked = acked + redis.call('XACK', stream, group, unpack(ARGV, i, last))
  i = last + 1
end
-- Decisions go out with the ack: a waiting request learns a decision only once it is durable.
for r = replies, replies + 2 * n_replies - 1, 2 do
  redis.call('SPUBLISH', ARGV[r], ARGV[r + 1])
end
return {acked, alerts_written, dead_written}
"""


@dataclass(frozen=True, slots=True)
class Settled:
    acked: int
    alerts: int
    dead_letters: int


class Settler:
    """The Redis side of a batch, one round trip on one Redis; the script re-loads itself after a Redis restart.

    On a Redis Cluster the fraud and DLQ streams hash to other slots than the shard, so one atomic
    call cannot hold them all: the alerts are written first in the fraud stream's slot, the dead
    letters in the DLQ's, each with its markers in the same slot (so each stays written exactly
    once however often it is retried), each waited for until a replica has it (``WAIT``); the
    fenced ack in the shard's slot comes last. Durable first, ack last, as on one Redis. A worker
    fenced out after its COPY may still write an alert the new owner would have written: the
    marker lets only one of them through, and both carry what PostgreSQL stored.
    """

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        keys: Keys,
        group: str,
        consumer: str,
        dedup_window_ms: int,
        lease: Lease | None = None,
    ) -> None:
        self._client = client
        self._keys = keys
        self._lease = lease
        self._group = group
        self._consumer = consumer
        self._window_ms = dedup_window_ms
        self._script = client.register_script(SETTLE_SCRIPT)
        self._split = isinstance(client, RedisCluster)
        self._replicas = ReplicaWait()
        # Alerted markers live with the fraud stream, whatever the shard count: a transaction re-sent
        # after --shards changed lands on another shard and must still find its marker. Dead letters'
        # are per shard (in the DLQ's slot when split), as entry ids are.
        self._alerted_prefix = Keys(keys.fraud_stream, keys.fraud_stream, keys.dlq_stream).alerted_prefix
        self._dead_prefix = (
            f"{Keys(keys.dlq_stream, keys.fraud_stream, keys.dlq_stream).dead_prefix}{keys.stream}:"
            if self._split
            else keys.dead_prefix
        )

    def settle(
        self, ack_ids: list[str], alerts: list[AlertDocument], dead: list[Rejected], replies: dict[str, bytes] | None = None
    ) -> Settled:
        """``replies``: per decisions channel, the message of decisions for it (``decision_replies``)."""
        if self._split:
            return self._settle_split(ack_ids, alerts, dead, replies)
        keys = [self._keys.stream, self._keys.fraud_stream, self._keys.dlq_stream]
        return Settled(*self._call(keys, self.arguments(ack_ids, alerts, dead, replies)))

    def _settle_split(
        self, ack_ids: list[str], alerts: list[AlertDocument], dead: list[Rejected], replies: dict[str, bytes] | None
    ) -> Settled:
        alerts_written = dead_written = 0
        if alerts:
            fraud = self._keys.fraud_stream
            _, alerts_written, _ = self._call([fraud] * 3, self.arguments([], alerts, [], None, fenced=False))
            self._replicas.wait(self._client, fraud)
        if dead:
            dlq = self._keys.dlq_stream
            _, _, dead_written = self._call([dlq] * 3, self.arguments([], [], dead, None, fenced=False))
            self._replicas.wait(self._client, dlq)
        stream = self._keys.stream
        acked, _, _ = self._call([stream] * 3, self.arguments(ack_ids, [], [], replies))
        return Settled(acked, alerts_written, dead_written)

    def _call(self, keys: list[str], args: list[Any]) -> tuple[int, int, int]:
        if args[7] and self._lease is not None:  # fenced: the lease is checked in the call
            keys = [*keys, self._lease.key]
        try:
            acked, alerts_written, dead_written = self._script(keys=keys, args=args)
        except redis.ResponseError as exc:
            if redis_error_code(exc) == "FENCED":
                raise Fenced(f"lease on {self._keys.stream} lost") from None
            raise
        return acked, alerts_written, dead_written

    def arguments(
        self,
        ack_ids: list[str],
        alerts: list[AlertDocument],
        dead: list[Rejected],
        replies: dict[str, bytes] | None = None,
        fenced: bool = True,
    ) -> list[Any]:
        """The script's ARGV for one settle (apart so its encoding cost can be measured alone)."""
        replies = replies or {}
        token = self._lease.token if self._lease is not None and fenced else ""
        args: list[Any] = [
            self._group,
            self._window_ms,
            self._alerted_prefix,
            self._dead_prefix,
            len(alerts),
            len(dead),
            len(replies),
            token,
            self._keys.stream,
        ]
        for alert in alerts:
            args += alert
        for r in dead:
            args += (r.entry_id, entry_bucket(r.entry_id), r.payload, r.reason, r.detail, self._consumer, r.deliveries)
            args += (len(r.kept), *kept_field_pairs(r.kept))
        for channel, message in replies.items():
            args += (channel, message)
        args += ack_ids
        return args


class AlertDocument(NamedTuple):
    """One non-approved decision for the alert stream, with the bucket of its alerted marker."""

    transaction_id: str
    bucket: int  # event-time bucket (dedup.py), the same for every copy of the transaction
    document: bytes  # the JSON row


def alert_documents(scored: ScoredBatch) -> list[AlertDocument]:
    """The alerts of every non-approved decision, once per id within the batch."""
    flagged = np.flatnonzero(scored.decision > 0)
    bucket_of = buckets(scored.event_ms[flagged]).tolist()
    documents: dict[str, AlertDocument] = {}
    for i, bucket in zip(flagged.tolist(), bucket_of):
        txid = scored.batch.transaction_id[i]
        if txid not in documents:
            documents[txid] = AlertDocument(txid, bucket, orjson.dumps(scored.row(i)))
    return list(documents.values())


def decision_replies(stored: list[ScoredBatch], reply_to: dict[str, str]) -> dict[str, bytes]:
    """Per decisions channel, the JSON array of the stored decisions of the entries that named it
    (``reply_to``: entry id -> channel, the ``reply`` field that ``/v1/score`` entries carry): what
    the waiting requests answer. Only those rows are visited; a batch without any costs nothing."""
    if not reply_to:
        return {}
    replies: dict[str, list[dict[str, Any]]] = {}
    for scored in stored:
        b = scored.batch
        for i, entry_id in enumerate(b.entry_ids):
            channel = reply_to.get(entry_id)
            if channel is not None:
                replies.setdefault(channel, []).append(
                    {
                        "transaction_id": b.transaction_id[i],
                        "id": entry_id,
                        "decision": DECISIONS[scored.decision[i]],
                        "score": round(float(scored.score[i]), 6),
                        "reasons": scored.reasons[i],
                        "model_version": scored.model_version,
                        "explanation": scored.explanations[i],
                    }
                )
    return {channel: orjson.dumps(decisions) for channel, decisions in replies.items()}
