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

from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, NamedTuple, cast

import numpy as np
import orjson
import psycopg
import redis
from redis.cluster import RedisCluster

from ..keys import Keys
from ..runtime.deadletters import Rejected, kept_field_pairs
from ..runtime.redis_clients import ReplicaWait, redis_error_code
from ..runtime.redis_wire import HeldConnection, round_trip
from ..schema import connect
from . import pgbinary, vectors
from .decode import DecodedBatch
from .dedup import buckets, entry_bucket
from .leases import Fenced, Lease
from .rules import DECISIONS

# In the order of the binary COPY payload (_copy_binary): the fixed-width columns first, as one
# piece per row (the feature vector too: its width is the same in every row of a batch).
COLUMNS = (
    "amount",
    "event_time",
    "scored_at",
    "score",
    "lat",
    "lon",
    "features",
    "transaction_id",
    "user_id",
    "currency",
    "merchant",
    "mcc",
    "country",
    "card_id",
    "device_id",
    "ip",
    "channel",
    "stream_id",
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
)
_COLUMN_LIST = ", ".join(COLUMNS)
_DECISION_BYTES = [d.encode() for d in DECISIONS]
_JSONB_VERSION = b"\x01"


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
    _explained: dict[int, bytes] | None = field(default=None, repr=False, compare=False)  # explained()

    def __len__(self) -> int:
        return len(self.batch)

    @property
    def entry_ids(self) -> list[str]:
        return self.batch.entry_ids

    def take(self, rows: range, batch: DecodedBatch | None = None) -> ScoredBatch:
        """The sub-batch of the given row positions (to bisect a batch that fails to store, or to
        split a read's batch back into its shards' parts); ``batch``: those rows, decoded apart."""
        index = np.asarray(rows, dtype=np.intp)
        cut = slice(rows.start, rows.stop, rows.step)
        return ScoredBatch(
            self.batch.take(rows) if batch is None else batch,
            self.event_ms[index],
            self.seen[index],
            self.score[index],
            self.decision[index],
            self.reasons[cut],
            self.explanations[cut],
            self.model_version,
            self.scored_at_ms,
            self.rules_version,
            self.vectors[index],
            None if self.shadow is None else self.shadow.take(index),
            None if self.shadow_rules is None else self.shadow_rules.take(index),
        )

    def rows(self, index: list[int]) -> list[dict[str, Any]]:
        """Rows ``index`` as the JSON documents the alert stream carries (the ``transactions`` rows),
        made a column at a time: numpy converts a column's values of those rows in one call, where
        a value read alone costs a numpy scalar and its conversion."""
        b = self.batch
        at = np.asarray(index, dtype=np.intp)
        scored_at = self.scored_at_ms / 1000.0
        return [
            {
                "transaction_id": b.transaction_id[i],
                "user_id": b.user_id[i],
                "amount": amount,
                "currency": b.currency[i],
                "merchant": b.merchant[i],
                "mcc": b.mcc[i],
                "country": b.country[i],
                "card_id": b.card_id[i],
                "device_id": b.device_id[i],
                "ip": b.ip[i],
                "channel": b.channel[i],
                "lat": lat,
                "lon": lon,
                "event_time": event_time,
                "stream_id": b.entry_ids[i],
                "scored_at": scored_at,
                "score": score,
                "decision": decision,
                "reasons": self.reasons[i],
                "model_version": self.model_version,
                "rules_version": self.rules_version,
                "explanation": explanation,
            }
            for i, amount, lat, lon, event_time, score, decision, explanation in zip(
                index,
                b.amount[at].tolist(),
                _none_for_nan(b.lat[at]),
                _none_for_nan(b.lon[at]),
                (self.event_ms[at] / 1000.0).tolist(),
                self.scores(at),
                self.decisions(at),
                self.explanation_fragments(index),
            )
        ]

    def scores(self, at: np.ndarray) -> list[float]:
        """The scores of rows ``at`` as documents carry them: rounded to 6 decimals."""
        return list(map(round, self.score[at].tolist(), repeat(6)))

    def decisions(self, at: np.ndarray) -> list[str]:
        return list(map(DECISIONS.__getitem__, self.decision[at].tolist()))

    def explained(self) -> dict[int, bytes]:
        """Row -> JSON of its explanation, of the rows explained (the flagged ones: a few in a
        hundred): made once for the COPY, the alerts and the decision replies, which all carry it."""
        if self._explained is None:
            self._explained = {i: orjson.dumps(self.explanations[i]) for i in pgbinary.present(self.explanations)}
        return self._explained

    def explanation_fragments(self, index: list[int]) -> list[orjson.Fragment | None]:
        """The explanations of rows ``index``, to be put in documents as their JSON already made."""
        explained = self.explained()
        return [None if (json := explained.get(i)) is None else orjson.Fragment(json) for i in index]

    def adopt(self, i: int, score: float, decision: str, reasons: list[str], explanation: dict[str, Any] | None) -> None:
        """Row ``i`` as PostgreSQL holds it (stored by an earlier delivery)."""
        self.score[i] = score
        self.decision[i] = DECISIONS.index(decision)
        self.reasons[i] = reasons
        self.explanations[i] = explanation
        self._explained = None


def _none_for_nan(values: np.ndarray) -> list[float | None]:
    """``values`` as Python floats, NaN (absent) as None."""
    out: list[float | None] = values.tolist()
    for j in np.flatnonzero(np.isnan(values)).tolist():
        out[j] = None
    return out


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
        self.store_all([scored])

    def store_all(self, batches: list[ScoredBatch]) -> None:
        """``store`` of several batches (a read's shards) in one COPY."""
        batches = [scored for scored in batches if len(scored)]
        if not batches:
            return
        conn = self.connect()
        # psycopg writes a payload in slices of 128 KiB: of a memoryview, without copying them.
        data = memoryview(_copy_binary(batches))
        if any(scored.seen.any() for scored in batches):
            self._store_idempotent(conn, batches, data)
            return
        try:
            with conn.cursor().copy(f"COPY transactions ({_COLUMN_LIST}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(data)
        except psycopg.errors.UniqueViolation:
            # Stored before although Redis had no dedup marker (the marker expired, or Redis lost
            # it): the COPY wrote nothing; take the idempotent path for this batch.
            self._store_idempotent(conn, batches, data)

    def _store_idempotent(self, conn: psycopg.Connection, batches: list[ScoredBatch], data: memoryview) -> None:
        # One transaction: the staging table empties itself at its commit.
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(f"COPY fraudd_staging ({_COLUMN_LIST}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(data)
            # Of the copies of one transaction in the batch, the first in stream order is stored:
            # the one its alert is built from (``alert_documents``). The staging table is emptied at
            # every commit, so its rows' physical order (ctid) is the COPY's, the batch's order.
            cur.execute(
                f"""INSERT INTO transactions ({_COLUMN_LIST})
                    SELECT DISTINCT ON (transaction_id, event_time) {_COLUMN_LIST} FROM fraudd_staging
                    ORDER BY transaction_id, event_time, ctid
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
        for scored in batches:
            _adopt_stored(scored, stored)


def _adopt_stored(scored: ScoredBatch, stored: dict[str, tuple[Any, ...]]) -> None:
    for i, txid in enumerate(scored.batch.transaction_id):
        if txid in stored:
            score, decision, reasons, explanation = stored[txid]
            scored.adopt(i, score, decision, list(reasons), explanation)


def _copy_binary(batches: list[ScoredBatch]) -> bytes:
    """The batches as one binary COPY payload, in the order of COLUMNS, built a column at a time."""
    return pgbinary.payload(map(_copy_rows, batches))


def _copy_rows(scored: ScoredBatch) -> pgbinary.Pieces:
    b = scored.batch
    n = len(b)
    fixed = (
        pgbinary.Record(n)
        .int16(len(COLUMNS))
        .float8(b.amount)
        .timestamptz(scored.event_ms)
        .timestamptz(scored.scored_at_ms)
        .float4(scored.score)
        .nullable_float8(b.lat)
        .nullable_float8(b.lon)
        .bytea(vectors.stored(scored.vectors))
        .pieces()
    )
    return pgbinary.rows(
        n,
        [
            [fixed],
            pgbinary.text(b.transaction_id),
            pgbinary.text(b.user_id),
            pgbinary.categorical(b.currency),
            pgbinary.text(b.merchant),
            pgbinary.categorical(b.mcc),
            pgbinary.categorical(b.country),
            pgbinary.text(b.card_id),
            pgbinary.text(b.device_id),
            pgbinary.text(b.ip),
            pgbinary.categorical(b.channel),
            pgbinary.text(b.entry_ids),
            pgbinary.by_code(scored.decision, _DECISION_BYTES),
            pgbinary.memoized(scored.reasons, tuple, pgbinary.text_array),
            *_version_and_shadow_columns(scored.model_version, scored.shadow, n),
            pgbinary.sparse(n, _explanations(scored)),
            *_rules_columns(scored.rules_version, scored.shadow_rules, n),
        ],
    )


def _version_and_shadow_columns(model_version: str, shadow: Shadow | None, n: int) -> list[pgbinary.Column]:
    if shadow is None:
        return [pgbinary.constant(n, model_version.encode(), None, None, None)]
    return [
        pgbinary.constant(n, model_version.encode()),
        [pgbinary.Record(n).float4(shadow.score).pieces()],
        pgbinary.by_code(shadow.decision, _DECISION_BYTES),
        pgbinary.constant(n, shadow.model_version.encode()),
    ]


def _rules_columns(rules_version: str, shadow: ShadowRules | None, n: int) -> list[pgbinary.Column]:
    if shadow is None:
        return [pgbinary.constant(n, rules_version.encode(), None, None)]
    return [
        pgbinary.constant(n, rules_version.encode(), shadow.version.encode()),
        pgbinary.by_code(shadow.decision, _DECISION_BYTES),
    ]


def _explanations(scored: ScoredBatch) -> dict[int, bytes]:
    """Row -> jsonb bytes of the rows explained."""
    return {i: _JSONB_VERSION + json for i, json in scored.explained().items()}


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
        # A shard's settles run one at a time (in the batch loop, or in its settling thread).
        self._connection = HeldConnection()
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
        try:
            if self._split:
                acked, alerts_written, dead_written = self._script(keys=self._fenced_keys(keys, args), args=args)
            else:
                acked, alerts_written, dead_written = self._evalsha(self._command(keys, args))
        except redis.ResponseError as exc:
            raise self._fenced(exc) from None
        return acked, alerts_written, dead_written

    def _fenced_keys(self, keys: list[str], args: list[Any]) -> list[str]:
        """``keys`` and, for a fenced call, the lease's, which the script checks."""
        return [*keys, self._lease.key] if args[7] and self._lease is not None else keys

    def _command(self, keys: list[str], args: list[Any]) -> tuple[Any, ...]:
        keys = self._fenced_keys(keys, args)
        return ("EVALSHA", self._script.sha, len(keys), *keys, *args)

    def _evalsha(self, command: tuple[Any, ...]) -> Any:
        """The script's call packed by hiredis (``redis_wire``): redis-py's own packing inspects each
        argument in Python, and the call has one or more per entry. Redis that lost the script (a
        restart, SCRIPT FLUSH) ran nothing: it is loaded again and the call sent once more."""
        client = cast(redis.Redis, self._client)
        try:
            return self._connection.round_trip(client, [command])[0]
        except redis.exceptions.NoScriptError:
            client.script_load(SETTLE_SCRIPT)
        return self._connection.round_trip(client, [command])[0]

    def _fenced(self, exc: redis.ResponseError) -> Fenced | redis.ResponseError:
        """What the script's error means: ``Fenced`` for a lost lease, else the error itself."""
        return Fenced(f"lease on {self._keys.stream} lost") if redis_error_code(exc) == "FENCED" else exc

    def command(
        self, ack_ids: list[str], alerts: list[AlertDocument], dead: list[Rejected], replies: dict[str, bytes]
    ) -> tuple[Any, ...]:
        """``settle`` on one Redis as an EVALSHA to send along with other shards' (``settle_together``)."""
        keys = [self._keys.stream, self._keys.fraud_stream, self._keys.dlq_stream]
        return self._command(keys, self.arguments(ack_ids, alerts, dead, replies))

    def outcome(self, reply: object) -> Settled | Fenced | redis.ResponseError:
        """The reply to ``command``: what was settled, ``Fenced``, or an error to settle alone after."""
        if isinstance(reply, redis.ResponseError):
            return self._fenced(reply)
        acked, alerts_written, dead_written = cast(list[int], reply)
        return Settled(acked, alerts_written, dead_written)

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


def settle_together(
    client: redis.Redis, calls: list[tuple[Settler, list[str], list[AlertDocument], list[Rejected], dict[str, bytes]]]
) -> list[Settled | Fenced | redis.ResponseError]:
    """Several shards' settles (settler, ack ids, alerts, dead letters, replies) in one round trip
    on one Redis. Each is its own atomic script call fenced by its own shard's lease, so a shard
    lost leaves the others settled. A ``ResponseError`` outcome (the script or a consumer group
    lost with Redis's data) is to be settled alone, which restores what is missing."""
    commands = [settler.command(ack_ids, alerts, dead, replies) for settler, ack_ids, alerts, dead, replies in calls]
    return [call[0].outcome(reply) for call, reply in zip(calls, round_trip(client, commands, errors_as_replies=True))]


class AlertDocument(NamedTuple):
    """One non-approved decision for the alert stream, with the bucket of its alerted marker."""

    transaction_id: str
    bucket: int  # event-time bucket (dedup.py), the same for every copy of the transaction
    document: bytes  # the JSON row


def alert_documents(scored: ScoredBatch) -> list[AlertDocument]:
    """The alerts of every non-approved decision, once per id within the batch (its first row)."""
    flagged = np.flatnonzero(scored.decision > 0).tolist()
    txids = scored.batch.transaction_id
    first = sorted({txids[i]: i for i in reversed(flagged)}.values())
    at = np.asarray(first, dtype=np.intp)
    return [
        AlertDocument(row["transaction_id"], bucket, orjson.dumps(row))
        for row, bucket in zip(scored.rows(first), buckets(scored.event_ms[at]).tolist())
    ]


def decision_replies(stored: list[ScoredBatch], reply_to: dict[str, str]) -> dict[str, bytes]:
    """Per decisions channel, the JSON array of the stored decisions of the entries that named it
    (``reply_to``: entry id -> channel, the ``reply`` field that ``/v1/score`` entries carry): what
    the waiting requests answer. Only those rows are visited (found by C-level calls); a batch
    without any costs nothing."""
    if not reply_to:
        return {}
    replies: dict[str, list[dict[str, Any]]] = {}
    for scored in stored:
        b = scored.batch
        channels = list(map(reply_to.get, b.entry_ids))
        index = pgbinary.present(channels)
        at = np.asarray(index, dtype=np.intp)
        for i, decision, score, explanation in zip(
            index, scored.decisions(at), scored.scores(at), scored.explanation_fragments(index)
        ):
            replies.setdefault(cast(str, channels[i]), []).append(
                {
                    "transaction_id": b.transaction_id[i],
                    "id": b.entry_ids[i],
                    "decision": decision,
                    "score": score,
                    "reasons": scored.reasons[i],
                    "model_version": scored.model_version,
                    "explanation": explanation,
                }
            )
    return {channel: orjson.dumps(decisions) for channel, decisions in replies.items()}
