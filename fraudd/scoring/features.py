"""Model input features for a whole batch: message columns and behaviour, both with numpy.

Behaviour state is shared by every worker and must count each transaction once however often it
is delivered, so it lives in Redis; but Redis is the one single-threaded process all workers
share, so it only stores it. Per batch: one pipelined read (HMGET of the users' states), the
arithmetic in the worker (``behaviour.py``), then one atomic commit call that writes each user's
state only if it is unchanged since the read, together with its transactions' dedup markers and
the blocklist lookups. A conflict (another worker wrote the user, or a transaction was already counted)
is re-read and recomputed for the users concerned only, so idempotency costs extra only when a
duplicate or a race actually happens. Training computes features through the same
``FeatureStore.compute`` on a scratch key prefix, so offline features are the live ones.
"""

from __future__ import annotations

import itertools
import time
import zlib
from dataclasses import dataclass, field

import hiredis
import numpy as np
import redis
from redis.cluster import RedisCluster

from fraudd.keys import Keys
from fraudd.runtime.redis_clients import node_client, on_node
from fraudd.scoring import behaviour, dedup
from fraudd.scoring.behaviour import BEHAVIOUR_FEATURES, SECONDS_SINCE_PREV_CAP
from fraudd.scoring.confirmed import CONFIRMED_COLUMNS, ConfirmedFraud
from fraudd.scoring.decode import DecodedBatch
from fraudd.settings import packaged

__all__ = [
    "BEHAVIOUR_FEATURES",
    "BLOCKLIST_KINDS",
    "EXTRA_COLUMNS",
    "FEATURE_NAMES",
    "MESSAGE_FEATURES",
    "SECONDS_SINCE_PREV_CAP",
    "FeatureStore",
    "Features",
    "Fenced",
    "Lease",
    "message_columns",
]

# Columns derivable from the message alone; the "no history" baseline model is trained on these.
MESSAGE_FEATURES: tuple[str, ...] = (
    "log_amount",
    "hour_utc",
    "mcc_high_risk",
    "channel",
    "has_device",
    "has_card",
)
FEATURE_NAMES: tuple[str, ...] = MESSAGE_FEATURES + BEHAVIOUR_FEATURES
# Not model inputs, but rules may test them too.
EXTRA_COLUMNS: tuple[str, ...] = ("amount", *CONFIRMED_COLUMNS)
BLOCKLIST_KINDS: tuple[str, ...] = ("merchant", "device", "ip", "country")

# 24 h windows plus an hour of slack for late events.
STATE_TTL_MS = 25 * 3600 * 1000
# States live in one hash per period of wall-clock time (a key per user with its own TTL cost
# Redis ≈ 2-3 µs per transaction in the commit, one HSET of the batch's states ≈ 1): a period's hash
# lives STATE_TTL_MS after its last write, readers look in the periods before, of and after their
# clock (so clocks of several hosts may differ by anything short of a period) and take the latest
# copy. A user idle for a period or more starts afresh; one idle less than that keeps its state,
# which stays readable between STATE_TTL_MS and twice that after its last write.
STATE_PERIOD_MS = STATE_TTL_MS
# Quasi-cash, wire transfers, gambling, dating, digital goods and other MCCs card schemes and
# acquirers classify as high risk.
HIGH_RISK_MCC = frozenset(
    (
        "4829",
        "5816",
        "5933",
        "5944",
        "5962",
        "5966",
        "5967",
        "6010",
        "6011",
        "6012",
        "6051",
        "6211",
        "6540",
        "7273",
        "7801",
        "7802",
        "7995",
    )
)
_CHANNEL_CODES = {"pos": 1.0, "ecom": 2.0, "atm": 3.0}

# Library and function are named after their calling convention, so during a rolling upgrade the
# old and the new workers each keep their own loaded side by side instead of replacing each other's.
LIBRARY_NAME = "fraudd_v5"
FUNCTION_NAME = "fraudd_commit_v5"
READ_FUNCTION = "fraudd_owned_read_v5"
LEASE_FUNCTION = "fraudd_lease_v5"
# Owned mode keeps the states of a shard's recent users in memory, up to this many per owned shard
# (≈ 0.5 KB each: ≈ 25 MB per shard; a worker owns about S / workers shards).
MAX_STATES_IN_MEMORY = 50_000
_LIBRARY = packaged("fraudd.scoring", "features.lua").read_text()
# Key names carry a layout version, so a changed packing starts fresh instead of misreading.
_STATES_INFIX = "u3:"
# Each round of conflicts settles at least one racing writer or teaches every already-counted
# transaction of the users concerned, so a handful suffice; more means something is wrong.
MAX_COMMIT_ATTEMPTS = 20
# The commit compares only a state's first bytes, its version stamp (newest event time and the
# count of transactions applied, which grows with every commit: see features.lua); all zero when
# the user had no state.
STAMP_SIZE = 12
_ABSENT = bytes(STAMP_SIZE)
assert behaviour.STATE.names[:2] == ("head_ms", "n") and behaviour.STATE.fields["n"][1] + 4 == STAMP_SIZE


class CommitConflictError(RuntimeError):
    """The behaviour state of some users kept changing under us for MAX_COMMIT_ATTEMPTS reads."""


@dataclass(slots=True)
class Features:
    """The batch's feature matrix plus what the pipeline needs beside the model inputs."""

    matrix: np.ndarray  # float32 (n, len(FEATURE_NAMES))
    seen: np.ndarray  # bool (n,): already counted earlier (redelivery or producer retry)
    event_ms: np.ndarray  # int64 (n,): the first occurrence's event time (the row's partition key)
    blocked: dict[str, np.ndarray]  # bool (n,) per BLOCKLIST_KINDS entry
    amount: np.ndarray  # float64 (n,)
    confirmed: dict[str, np.ndarray] = field(default_factory=dict)  # CONFIRMED_COLUMNS, from labels

    def __len__(self) -> int:
        return len(self.seen)

    def column(self, name: str) -> np.ndarray:
        """One feature (or extra) column by name."""
        if name == "amount":
            return self.amount
        if name in CONFIRMED_COLUMNS:
            return self.confirmed.get(name, np.zeros(len(self.seen), dtype=np.float32))
        return self.matrix[:, FEATURE_NAMES.index(name)]


def message_columns(batch: DecodedBatch) -> np.ndarray:
    """The MESSAGE_FEATURES columns, float32 (n, len(MESSAGE_FEATURES))."""
    out = np.empty((len(batch), len(MESSAGE_FEATURES)), dtype=np.float32)
    out[:, 0] = np.log1p(batch.amount)
    out[:, 1] = np.floor(batch.timestamp / 3600.0) % 24
    out[:, 2] = [mcc in HIGH_RISK_MCC for mcc in batch.mcc]
    out[:, 3] = [_CHANNEL_CODES.get(channel, 0.0) for channel in batch.channel]
    out[:, 4] = [device is not None for device in batch.device_id]
    out[:, 5] = [card is not None for card in batch.card_id]
    return out


def state_periods(keys: Keys, period: int | None = None) -> list[str]:
    """The keys of the state periods before, of and after ``period`` (default: this host's clock's)."""
    period = _current_period() if period is None else period
    return [_period_key(keys, p) for p in (period - 1, period, period + 1)]


def _current_period() -> int:
    return int(time.time() * 1000) // STATE_PERIOD_MS


def _period_key(keys: Keys, period: int) -> str:
    return f"{keys.prefix}{_STATES_INFIX}{period}"


def stored_states(client: redis.Redis | RedisCluster, keys: Keys, users: list[str]) -> list[bytes | None]:
    """The behaviour states of ``users`` of the shard as Redis holds them (``behaviour.STATE``, None
    when absent): what operators and tests inspect, without knowing the layout."""
    if not users:
        return []
    pipe = client.pipeline(transaction=False)
    for key in reversed(state_periods(keys)):
        pipe.hmget(key, users)
    return [next((s for s in states if s is not None), None) for states in zip(*pipe.execute())]


def load_library(client: redis.Redis) -> None:
    """(Re)install the Function library; REPLACE makes it safe to call from every worker."""
    client.function_load(_LIBRARY, replace=True)


class Fenced(RuntimeError):
    """This worker's lease on the shard is gone (expired or taken over): it must not write for it."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A shard owned through a lease (``shards.py``): its key in Redis and the token it must still hold."""

    key: str
    token: str


@dataclass(slots=True)
class _Prepared:
    """A batch's columns as the behaviour arithmetic takes them, with its users and their keys."""

    tx: behaviour.Transactions
    copy: np.ndarray  # bool: a later copy of a transaction earlier in the batch
    original: np.ndarray  # intp: each row's first occurrence in the batch
    names: list[str]  # users in order of first appearance
    distinct: list[list[str]]  # per BLOCKLIST_KINDS, the batch's values to look up


class FeatureStore:
    """Computes features for a batch and records it in the behaviour state, exactly once.

    Shared (no ``lease``): every worker of the group may write any user, so the commit is a
    compare-and-set retried for the users that changed meanwhile. Owned (``lease``, one worker per
    shard): nobody else writes the shard's users, so their states are kept in memory, the markers
    are checked before computing, and the commit is written once, fenced by the lease token.
    """

    def __init__(self, redis_client: redis.Redis, keys: Keys, dedup_window_ms: int, lease: Lease | None = None) -> None:
        # States are binary blobs parsed with numpy; a decoding client would mangle them.
        if redis_client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("FeatureStore needs a Redis client with decode_responses=False")
        self._redis = redis_client
        self._keys = keys
        self._dedup_window_ms = int(dedup_window_ms)
        self._blocklist_keys = [keys.blocklist(kind) for kind in BLOCKLIST_KINDS]
        self._lease = lease
        # Owned mode: the states as last committed, newest last (the oldest go first past the cap).
        self._states: dict[str, bytes] = {}
        # Owned mode: the node (client) whose contents ``_states`` mirror; a batch's calls all go to it.
        self._node: redis.Redis | None = None
        # Owned mode: the latest state period that held any state this store read; writes go there
        # when this host's clock is behind the previous owner's.
        self._latest_period = -1
        self._confirmed = ConfirmedFraud(redis_client, keys)
        self.load_library()

    def load_library(self) -> None:
        load_library(self._redis)

    def compute(self, batch: DecodedBatch) -> Features:
        """Features of every transaction of ``batch``; new ones are added to the state, once.

        The first occurrence of a transaction id in batch order is the original; later copies in
        the batch, and transactions whose dedup marker already exists, are ``seen``: scored at the
        original's event time against the state that already holds it, and not added again.
        Owned mode raises ``Fenced`` when the lease was lost; nothing was written then.
        """
        n = len(batch)
        if n == 0:
            return _empty()
        p = _prepare(batch)
        # The confirmed-fraud version rides on the batch's first round trip rather than its own.
        version = ("GET", self._confirmed.version_key)
        if self._lease is None:
            behaviour_columns, blocklist_hits, confirmed_version = self._compute_shared(p, batch.transaction_id, version)
        else:
            behaviour_columns, blocklist_hits, confirmed_version = self._compute_owned(p, batch.transaction_id, version)
        tx = p.tx
        # A copy whose original belongs to another user is only corrected here.
        tx.t_ms[p.copy] = tx.t_ms[p.original[p.copy]]

        matrix = np.empty((n, len(FEATURE_NAMES)), dtype=np.float32)
        matrix[:, : len(MESSAGE_FEATURES)] = message_columns(batch)
        matrix[:, len(MESSAGE_FEATURES) :] = behaviour_columns
        columns = (batch.merchant, batch.device_id, batch.ip, batch.country)
        blocked = {
            kind: _flags(column, values, flags)
            for kind, column, values, flags in zip(BLOCKLIST_KINDS, columns, p.distinct, blocklist_hits)
        }
        event_ms = tx.t_ms.astype(np.int64)
        return Features(
            matrix=matrix,
            seen=~tx.new,
            event_ms=event_ms,
            blocked=blocked,
            amount=batch.amount,
            confirmed=self._confirmed.counts(
                (batch.merchant, batch.device_id, batch.ip, batch.card_id), event_ms, confirmed_version
            ),
        )

    def _compute_shared(self, p: _Prepared, transaction_ids: list[str], also: tuple) -> tuple[np.ndarray, list[bytes], object]:
        """Behaviour columns, blocklist flags and the reply of ``also`` (sent with the first read)."""
        tx, copy, original, names = p.tx, p.copy, p.original, p.names
        behaviour_columns = np.empty((len(tx.user), len(BEHAVIOUR_FEATURES)))
        pending = np.arange(len(names))
        blocklist_hits: list[bytes] = []
        for attempt in range(MAX_COMMIT_ATTEMPTS):
            if attempt == 0:
                blobs, also_reply = self._read(names, also)
            else:
                blobs, _ = self._read([names[i] for i in pending])
            # Copies take their original's event time, which a commit conflict may have corrected.
            tx.t_ms[copy] = tx.t_ms[original[copy]]
            local = np.full(len(names), -1, np.intp)
            local[pending] = np.arange(len(pending))
            rows = np.flatnonzero(local[tx.user] >= 0)
            sub = _subset(tx, local, rows)
            states = behaviour.decode(blobs)
            behaviour_columns[rows] = behaviour.compute(states, sub)
            # Blocklists are looked up once, in the first commit call.
            joined = [] if blocklist_hits else ["\0".join(values).encode() for values in p.distinct]
            pending, hits = self._commit(states, sub, rows, blobs, pending, names, transaction_ids, tx, joined)
            blocklist_hits = blocklist_hits or hits
            if len(pending) == 0:
                return behaviour_columns, blocklist_hits, also_reply
        raise CommitConflictError(
            f"behaviour state of {len(pending)} users still conflicting after {MAX_COMMIT_ATTEMPTS} attempts"
        )

    def _compute_owned(self, p: _Prepared, transaction_ids: list[str], also: tuple) -> tuple[np.ndarray, list[bytes], object]:
        """One read (states not in memory, markers, blocklists, and ``also``), the arithmetic, one
        fenced commit; returns the behaviour columns, blocklist flags and the reply of ``also``."""
        node = node_client(self._redis, self._keys.stream)
        if node is not self._node:
            # Replication is asynchronous: a failover may have taken this owner's last commits
            # with the old master while its lease survived, and their entries come back pending.
            # Start again from what the node serving the shard now holds (after a slot move too).
            self._states.clear()
            self._node = node
        tx, names = p.tx, p.names
        candidates = np.flatnonzero(tx.new)
        t_ms = tx.t_ms[candidates].astype(np.int64)
        order = np.argsort(dedup.buckets(t_ms), kind="stable")
        candidates, t_ms = candidates[order], t_ms[order]
        bucket = dedup.buckets(t_ms)
        bucket_ids, bucket_counts = np.unique(bucket, return_counts=True)
        missing = [name for name in names if name not in self._states]
        now = _current_period()
        keys = [*state_periods(self._keys, now), *[self._keys.seen_bucket(b) for b in bucket_ids.tolist()], *self._blocklist_keys]
        args = [
            len(missing),
            len(bucket_ids),
            bucket_counts.astype(">u4").tobytes(),
            *["\0".join(values).encode() for values in p.distinct],
            *missing,
            *[transaction_ids[i] for i in candidates.tolist()],
        ]
        (latest, stored, seen, *blocklist_hits), also_reply = self._fcall(READ_FUNCTION, keys, args, also)
        if latest:
            self._latest_period = max(self._latest_period, now + latest - 2)
        for name, blob in zip(missing, stored):
            self._states[name] = blob
        for j in range(0, len(seen), 2):
            marker = int(seen[j]) - 1
            row = candidates[marker]
            tx.new[row] = False
            tx.t_ms[row] = float(bucket[marker] * dedup.BUCKET_MS + int(seen[j + 1]))
        tx.t_ms[p.copy] = tx.t_ms[p.original[p.copy]]
        blobs = [self._states[name] for name in names]
        states = behaviour.decode(blobs)
        behaviour_columns = behaviour.compute(states, tx)

        new = np.flatnonzero(tx.new)
        writers = np.unique(tx.user[new])
        if len(writers):
            news = behaviour.encode(states, writers)
            size = behaviour.STATE.itemsize
            written = [news[i : i + size] for i in range(0, len(news), size)]
            writer_names = [names[w] for w in writers.tolist()]
            states_pairs: list = [None] * (2 * len(written))
            states_pairs[0::2], states_pairs[1::2] = writer_names, written
            new_ms = tx.t_ms[new].astype(np.int64)
            marker_order = np.argsort(dedup.buckets(new_ms), kind="stable")
            new, new_ms = new[marker_order], new_ms[marker_order]
            marker_bucket = dedup.buckets(new_ms)
            ids, counts = np.unique(marker_bucket, return_counts=True)
            pairs: list = [None] * (2 * len(new))
            pairs[0::2] = [transaction_ids[i] for i in new.tolist()]
            pairs[1::2] = (new_ms - marker_bucket * dedup.BUCKET_MS).tolist()
            period = _period_key(self._keys, max(now, self._latest_period))
            commands = [("HSET", period, *states_pairs), ("PEXPIRE", period, STATE_TTL_MS)]
            start = 0
            for bucket, count in zip(ids.tolist(), counts.tolist()):
                key = self._keys.seen_bucket(bucket)
                commands += [("HSET", key, *pairs[start : start + 2 * count]), ("PEXPIRE", key, self._dedup_window_ms)]
                start += 2 * count
            try:
                self._round_trip_fenced(commands)
            except BaseException:
                # The commit may have reached Redis all the same (a lost reply): start again from
                # what Redis holds rather than from states that may be behind it.
                self._states.clear()
                raise
            for name, blob in zip(writer_names, written):
                self._states.pop(name, None)
                self._states[name] = blob
        if len(self._states) > MAX_STATES_IN_MEMORY:
            for name in list(itertools.islice(self._states, len(self._states) - MAX_STATES_IN_MEMORY)):
                del self._states[name]
        return behaviour_columns, blocklist_hits, also_reply

    def _read(self, names: list[str], *also: tuple) -> tuple[list[bytes | None], object]:
        """The users' latest states as stored (None = absent), and the reply of the command
        ``also`` if any: one round trip, no Lua. The next period's hash exists only when another
        host's clock is ahead: its HMGET is a few nils."""
        periods = [("HMGET", key, *names) for key in reversed(state_periods(self._keys))] if names else []
        replies = self._round_trip([*periods, *also]) if periods or also else []
        states = [next((state for state in found if state is not None), None) for found in zip(*replies[: len(periods)])]
        return states, replies[-1] if also else None

    def _round_trip(self, commands: list[tuple]) -> list:
        """The replies of ``commands``, sent in one round trip, each packed by hiredis in one call:
        redis-py's own packing inspects every argument in Python, ≈ 3 µs per transaction with the
        one-per-user and one-per-transaction arguments of the read and the commit. No response
        callbacks apply to HMGET and FCALL.

        Every key of a call carries the shard's hash tag, so on a Redis Cluster the call goes as
        is to the node serving the shard's slot; when that node failed or the slot moved, the slot
        map is learnt again and the error is an outage for the caller to wait out and retry."""
        return on_node(
            self._redis,
            self._keys.stream,
            lambda client: self._send(client, commands),
            None if self._lease is None else self._node,
        )

    @staticmethod
    def _send(client: redis.Redis, commands: list[tuple]) -> list:
        if client.connection is None:  # pooled (a single-connection client takes redis-py's path)
            pool = client.connection_pool
            conn = pool.get_connection()
            try:
                conn.send_packed_command([hiredis.pack_command(c) for c in commands], check_health=False)
                replies, error = [], None
                for _ in commands:
                    # Every reply is read, so an error reply leaves no other in the connection.
                    try:
                        replies.append(conn.read_response())
                    except redis.ResponseError as exc:
                        error = error or exc
                if error is not None:
                    raise error
                return replies
            except (redis.ConnectionError, redis.TimeoutError):
                # redis-py's own path reconnects and retries as the client is configured to.
                conn.disconnect()
            finally:
                pool.release(conn)
        return [client.execute_command(*c) for c in commands]

    def _round_trip_fenced(self, commands: list[tuple]) -> None:
        """``commands`` in one MULTI/EXEC, applied only while the shard's lease holds this worker's
        token (raises ``Fenced`` otherwise): the lease is WATCHed and read first, so EXEC writes
        nothing if it changed in between (then both round trips are tried again; a renewal by this
        worker's own lease thread does that about once per thousand batches)."""
        on_node(self._redis, self._keys.stream, lambda client: self._send_fenced(client, commands))

    def _send_fenced(self, client: redis.Redis, commands: list[tuple]) -> None:
        lease, token = self._lease.key, self._lease.token.encode()
        transaction = [hiredis.pack_command(("MULTI",)), *map(hiredis.pack_command, commands), hiredis.pack_command(("EXEC",))]
        pool = client.connection_pool
        conn = pool.get_connection()
        try:
            for _ in range(MAX_COMMIT_ATTEMPTS):
                conn.send_packed_command(
                    [hiredis.pack_command(("WATCH", lease)), hiredis.pack_command(("GET", lease))], check_health=False
                )
                conn.read_response()
                if conn.read_response() != token:
                    raise Fenced(f"lease on {self._keys.stream} lost")
                conn.send_packed_command(transaction, check_health=False)
                applied = [conn.read_response() for _ in transaction][-1]
                if applied is not None:
                    failed = [reply for reply in applied if isinstance(reply, redis.ResponseError)]
                    if failed:
                        raise failed[0]
                    return
            raise CommitConflictError(f"lease on {self._keys.stream} changed under {MAX_COMMIT_ATTEMPTS} commits")
        except BaseException:
            # Whatever broke off may have left a WATCH or an open MULTI on the connection.
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def _commit(
        self,
        states: behaviour.States,
        sub: behaviour.Transactions,
        rows: np.ndarray,
        blobs: list,
        pending: np.ndarray,
        names: list[str],
        transaction_ids: list[str],
        tx: behaviour.Transactions,
        blocklist_values: list[bytes],
    ) -> tuple[np.ndarray, list[bytes]]:
        """Writes the users that have new transactions; returns the users to read again and the
        blocklist flags (when ``blocklist_values`` asked for them).

        A user whose transaction turns out to be counted already is left unchanged, and those
        transactions become ``seen`` (at their stored original event time) for the next attempt.
        """
        new = np.flatnonzero(sub.new)
        writers, owner = np.unique(sub.user[new], return_inverse=True)
        if len(writers) == 0 and not blocklist_values:
            return pending[:0], []
        t_ms = tx.t_ms[rows[new]].astype(np.int64)
        bucket = dedup.buckets(t_ms)
        # Markers grouped by bucket: one HMGET and one HSET per bucket in the call.
        order = np.argsort(bucket, kind="stable")
        marker_rows, bucket, owner = rows[new][order], bucket[order], owner[order]
        bucket_ids, bucket_counts = np.unique(bucket, return_counts=True)
        pairs: list = [None] * (2 * len(marker_rows))
        pairs[0::2] = [transaction_ids[i] for i in marker_rows.tolist()]
        pairs[1::2] = (t_ms[order] - bucket * dedup.BUCKET_MS).tolist()
        size = behaviour.STATE.itemsize
        news = behaviour.encode(states, writers)
        keys = [*state_periods(self._keys), *[self._keys.seen_bucket(b) for b in bucket_ids.tolist()], *self._blocklist_keys]
        states_pairs: list = [None] * (2 * len(writers))
        states_pairs[0::2] = [names[i] for i in pending[writers].tolist()]
        states_pairs[1::2] = [news[i : i + size] for i in range(0, len(news), size)]
        args = [
            self._dedup_window_ms,
            STATE_TTL_MS,
            len(writers),
            len(bucket_ids),
            b"".join([(blobs[w] or _ABSENT)[:STAMP_SIZE] for w in writers.tolist()]),
            bucket_counts.astype(">u4").tobytes(),
            (owner + 1).astype(">u4").tobytes(),
            *(blocklist_values or [b""] * 4),
            *states_pairs,
            *pairs,
        ]
        (stale, seen, *flags), _ = self._fcall(FUNCTION_NAME, keys, args)
        conflicted = {int(w) - 1 for w in stale}
        for j in range(0, len(seen), 2):
            marker = int(seen[j]) - 1
            row = marker_rows[marker]
            conflicted.add(int(owner[marker]))
            tx.new[row] = False
            tx.t_ms[row] = float(bucket[marker] * dedup.BUCKET_MS + int(seen[j + 1]))
        return pending[writers[sorted(conflicted)]], flags

    def _fcall(self, function: str, keys: list[str], args: list, *also: tuple) -> tuple[list, object]:
        """The function's reply, and the reply of the command ``also`` if any, in one round trip."""
        commands = [("FCALL", function, len(keys), *keys, *args), *also]
        try:
            replies = self._round_trip(commands)
        except redis.ResponseError as exc:
            # A restarted Redis without persistence, or FUNCTION FLUSH, drops the library.
            if "function not found" not in str(exc).lower():
                raise
            self.load_library()
            replies = self._round_trip(commands)
        return replies[0], replies[-1] if also else None


def _prepare(batch: DecodedBatch) -> _Prepared:
    n = len(batch)
    distinct_merchants, distinct_devices = dict.fromkeys(batch.merchant), dict.fromkeys(batch.device_id)
    # Users numbered in order of first appearance; each row's original (first in batch order).
    users = {u: i for i, u in enumerate(dict.fromkeys(batch.user_id))}
    user = np.fromiter(map(users.__getitem__, batch.user_id), np.intp, n)
    ids = batch.transaction_id
    firsts = dict(zip(reversed(ids), range(n - 1, -1, -1)))  # the first occurrence is set last
    original = np.arange(n) if len(firsts) == n else np.fromiter(map(firsts.__getitem__, ids), np.intp, n)
    copy = original != np.arange(n)
    tx = behaviour.Transactions(
        user=user,
        t_ms=np.round(batch.timestamp * 1000.0),
        new=~copy,
        amount=batch.amount,
        merchant=_hashes(batch.merchant, distinct_merchants),
        country=_country_codes(batch.country),
        device=_hashes(batch.device_id, distinct_devices),
        card=_hashes(batch.card_id),
    )
    names = list(users)
    distinct = [
        _distinct(distinct_merchants),
        _distinct(distinct_devices),
        _distinct(dict.fromkeys(batch.ip)),
        _distinct(dict.fromkeys(batch.country)),
    ]
    return _Prepared(tx, copy, original, names, distinct)


def _subset(tx: behaviour.Transactions, local: np.ndarray, rows: np.ndarray) -> behaviour.Transactions:
    """The transactions of ``rows``, their users renumbered by ``local``."""
    return behaviour.Transactions(
        local[tx.user[rows]],
        tx.t_ms[rows],
        tx.new[rows],
        tx.amount[rows],
        tx.merchant[rows],
        tx.country[rows],
        tx.device[rows],
        tx.card[rows],
    )


def _fixed_width(numbers: np.ndarray, width: int) -> bytes:
    """Decimal numbers, zero-padded to ``width`` characters each, as one string."""
    if len(numbers) == 0:
        return b""
    return np.char.zfill(numbers.astype(f"S{width}"), width).tobytes()


def _hashes(values: list[str | None], distinct: dict | None = None) -> np.ndarray:
    """Stable 32-bit ids (crc32; 0 means absent, so a real 0 becomes 1) for the state's lists.

    ``distinct``: the values' ``dict.fromkeys`` when the caller has it already."""
    ids = dict.fromkeys(values) if distinct is None else dict(distinct)
    ids.pop(None, None)
    ids = dict(zip(ids, [h or 1 for h in map(zlib.crc32, map(str.encode, ids))]))
    ids[None] = 0
    return np.fromiter(map(ids.__getitem__, values), np.int64, len(values))


def _country_codes(countries: list[str | None]) -> np.ndarray:
    """Alpha-2 codes as 16 bits (both letters), 0 when absent."""
    codes = {c: (ord(c[0]) << 8) | ord(c[1]) for c in set(countries) if c is not None}
    codes[None] = 0
    return np.fromiter((codes[c] for c in countries), np.int64, len(countries))


def _distinct(values: dict) -> list[str]:
    """The column's distinct values (its ``dict.fromkeys``), in order, that can be looked up."""
    # NUL separates the values inside the call; a value holding one can't be blocklisted anyway.
    return [v for v in values if v is not None and "\0" not in v]


def _flags(column: list[str | None], values: list[str], flags: bytes) -> np.ndarray:
    if b"1" not in flags:
        return np.zeros(len(column), dtype=bool)
    hit = {v for v, f in zip(values, flags.decode()) if f == "1"}
    return np.fromiter((v in hit for v in column), bool, len(column))


def _empty() -> Features:
    return Features(
        matrix=np.empty((0, len(FEATURE_NAMES)), dtype=np.float32),
        seen=np.empty(0, dtype=bool),
        event_ms=np.empty(0, dtype=np.int64),
        blocked={kind: np.empty(0, dtype=bool) for kind in BLOCKLIST_KINDS},
        amount=np.empty(0, dtype=np.float64),
    )
