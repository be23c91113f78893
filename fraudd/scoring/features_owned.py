"""The behaviour state of shards this worker owns through leases (``--shards`` > 1).

Nobody else writes a shard's users, so their states are kept in memory (the most recent
MAX_STATES_IN_MEMORY per shard), and per read, for every owned shard the read spans at once
(``compute_owned``): one round trip with each shard's read (plain HMGETs of the states not in
memory and of which transactions were counted before, ``fraudd_owned_read_v6`` of ``features.lua``
for the blocklists) and its lease, watched; the arithmetic; then every shard's states and markers written
in one MULTI/EXEC of plain commands (the same HSETs cost Redis about twice as much called from
Lua), applied only while no lease written for changed since it was read as this worker's token.

A lost lease fences only its own shard: its part is left out before anything is written, and the
others commit. A lease found changed at the EXEC (a renewal by this worker's lease thread, or a
new owner) refuses the whole transaction, nothing written; the leases are read again and the
transaction sent again without the parts whose lease another owner now holds. Refusing the whole
rather than half is what MULTI/EXEC gives, and it is what keeps it exactly once: a transaction is
either all written or not at all, so sending it again never writes a marker twice.

On a Redis Cluster, which refuses a transaction across slots (each shard is a slot), each shard is
read and committed on its own, in the same two round trips.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import redis
from redis.cluster import RedisCluster

from fraudd.keys import Keys
from fraudd.runtime.redis_clients import FUNCTION_NOT_FOUND, node_client, on_node, redis_error_code
from fraudd.runtime.redis_wire import Command, Watch
from fraudd.scoring import behaviour
from fraudd.scoring.confirmed import ConfirmedFraud
from fraudd.scoring.decode import DecodedBatch
from fraudd.scoring.features import (
    READ_FUNCTION,
    STATE_TTL_MS,
    CommitConflictError,
    Features,
    Markers,
    Prepared,
    ShardCalls,
    assemble,
    current_period,
    empty_features,
    interleave,
    load_library,
    newest_states,
    period_key,
    prepare,
    split_states,
    state_periods,
    versions_command,
)
from fraudd.scoring.leases import Fenced, Lease

# The states of a shard's recent users kept in memory, up to this many per owned shard (≈ 0.5 KB
# each: ≈ 25 MB per shard; a worker owns about S / workers shards).
MAX_STATES_IN_MEMORY = 50_000
# A commit is sent again when a lease changed between its read and the EXEC: a renewal by this
# worker's own lease thread does that about once per thousand batches, so a handful suffice.
MAX_COMMIT_ATTEMPTS = 20


class OwnedFeatureStore:
    """Computes features for a batch of an owned shard and records it in the behaviour state,
    exactly once: the markers are checked before computing, and the commit is written once,
    fenced by the lease token. ``compute`` raises ``Fenced`` when the lease was lost; nothing was
    written then."""

    def __init__(self, redis_client: redis.Redis | RedisCluster, keys: Keys, dedup_window_ms: int, lease: Lease) -> None:
        self._calls = ShardCalls(redis_client, keys)
        self._keys = keys
        self._dedup_window_ms = int(dedup_window_ms)
        self._lease = lease
        self._token = lease.token.encode()
        # The states as last committed, newest last (the oldest go first past the cap).
        self._states: dict[str, bytes | None] = {}
        # The latest state period that held any state this store read; writes go there when this
        # host's clock is behind the previous owner's.
        self._latest_period = -1
        self._confirmed = ConfirmedFraud(redis_client, keys)

    def compute(self, batch: DecodedBatch) -> Features:
        (features,) = compute_owned([(self, batch)])
        if isinstance(features, Fenced):
            raise features
        return features

    def _served_by(self, node: redis.Redis) -> None:
        """Replication is asynchronous: a failover may have taken this owner's last commits with
        the old master while its lease survived, and their entries come back pending. So when the
        node serving the shard changed (after a slot move too), start again from what it holds."""
        if node is not self._calls.node:
            self._states.clear()
            self._calls.node = node

    def _read(self, p: Prepared, transaction_ids: list[str], now: int) -> _Read:
        """The read of a batch: states not in memory, markers already stored, blocklists.

        States and markers are read with plain HMGETs, not inside the read Function: an argument a
        Function passes on costs Redis a Lua string and a second command argument, more than the
        HMGET itself (``python -m bench redis-instructions``: the read's ≈ 8,700 instructions of
        Redis per transaction at 8 shards became ≈ 2,500). The Function is called without users or
        markers, for the blocklists alone (a few arguments per batch: an empty list costs one
        SCARD)."""
        candidates = Markers.of(np.flatnonzero(p.tx.new), p.tx.t_ms)
        missing = [name for name in p.names if name not in self._states]
        periods: list[Command] = [("HMGET", key, *missing) for key in reversed(state_periods(self._keys, now))] if missing else []
        ids = candidates.ids(transaction_ids)
        markers: list[Command] = [
            ("HMGET", key, *ids[start:end]) for key, (start, end) in zip(candidates.keys(self._keys), candidates.spans())
        ]
        keys = [*state_periods(self._keys, now), *self._calls.blocklist_keys]
        blocklists: Command = ("FCALL", READ_FUNCTION, len(keys), *keys, 0, 0, b"", *p.blocklist_values())
        return _Read(p, candidates, missing, [*periods, *markers, blocklists])

    def _take_in(self, read: _Read, replies: list[Any], now: int) -> list[bytes]:
        """The read's replies taken in: states into memory, the transactions found counted before
        marked seen (at their original's time, copies too); returns the blocklist flags."""
        p = read.prepared
        periods = replies[: len(state_periods(self._keys, now))] if read.missing else []
        markers = replies[len(periods) : -1]
        _latest, _states, _seen, *blocklist_hits = replies[-1]
        # The newest period holding any of the states: 1, 0 or -1 from this host's.
        latest = next((1 - j for j, stored in enumerate(periods) if any(state is not None for state in stored)), None)
        if latest is not None:
            self._latest_period = max(self._latest_period, now + latest)
        for name, blob in zip(read.missing, newest_states(periods)):
            self._states[name] = blob
        seen = [
            value
            for number, offset in enumerate(itertools.chain.from_iterable(markers), 1)
            if offset is not None
            for value in (number, offset)
        ]
        read.candidates.found(seen, p.tx)
        p.copies_take_their_originals_time()
        return cast(list[bytes], blocklist_hits)

    def _writes(self, p: Prepared, written: dict[str, bytes], transaction_ids: list[str], now: int) -> list[Command]:
        """The commands writing the states ``written`` (the users with new transactions) and the
        new transactions' markers."""
        if not written:
            return []
        period = period_key(self._keys, max(now, self._latest_period))
        markers = Markers.of(np.flatnonzero(p.tx.new), p.tx.t_ms)
        return [
            ("HSET", period, *interleave(list(written), list(written.values()))),
            ("PEXPIRE", period, STATE_TTL_MS),
            *markers.writes(self._keys, transaction_ids, self._dedup_window_ms),
        ]

    def _remember(self, written: dict[str, bytes]) -> None:
        """Keep the states just committed, newest last, up to MAX_STATES_IN_MEMORY."""
        for name, blob in written.items():
            self._states.pop(name, None)
            self._states[name] = blob
        if len(self._states) > MAX_STATES_IN_MEMORY:
            for name in list(itertools.islice(self._states, len(self._states) - MAX_STATES_IN_MEMORY)):
                del self._states[name]

    def _fenced(self) -> Fenced:
        return Fenced(f"lease on {self._keys.stream} lost")


@dataclass(slots=True)
class _Read:
    """A batch prepared, with what its read asks Redis for."""

    prepared: Prepared
    candidates: Markers  # the markers of the batch's new transactions, to look up
    missing: list[str]  # the users whose state is not in memory
    commands: list[Command]


@dataclass(slots=True)
class _Commit:
    """What a shard's part writes: the commands, and the states they write (kept once written)."""

    commands: list[Command]
    written: dict[str, bytes]


def compute_owned(parts: Sequence[tuple[OwnedFeatureStore, DecodedBatch]]) -> list[Features | Fenced]:
    """The features of the batches of one read, each of an owned shard (its store): each store's
    ``compute``, but together, the shards on one Redis read in one round trip and committed in one
    MULTI/EXEC fenced by each lease (module docstring). ``Fenced`` in place of a shard whose lease
    was lost: nothing was written for it."""
    if not parts:
        return []
    client = parts[0][0]._calls.client
    groups = [list(parts)] if not isinstance(client, RedisCluster) else [[part] for part in parts]
    return [features for group in groups for features in _on_one_node(client, group)]


def _on_one_node(
    client: redis.Redis | RedisCluster, parts: list[tuple[OwnedFeatureStore, DecodedBatch]]
) -> list[Features | Fenced]:
    stream = parts[0][0]._keys.stream
    node = node_client(client, stream)
    return on_node(client, stream, lambda served: _together(client, served, parts), node)


def _together(
    client: redis.Redis | RedisCluster, node: redis.Redis, parts: list[tuple[OwnedFeatureStore, DecodedBatch]]
) -> list[Features | Fenced]:
    results: list[Features | Fenced] = [empty_features()] * len(parts)
    busy = [i for i, (_store, batch) in enumerate(parts) if len(batch)]
    if not busy:
        return results
    stores = [parts[i][0] for i in busy]
    for store in stores:
        store._served_by(node)
    now = current_period()
    reads = [store._read(prepare(parts[i][1]), parts[i][1].transaction_id, now) for i, store in zip(busy, stores)]
    commands = [
        c for store, read in zip(stores, reads) for c in (*read.commands, versions_command(store._keys, store._confirmed))
    ]
    ends = np.cumsum([len(read.commands) + 1 for read in reads]).tolist()
    try:
        with Watch(node) as watch:
            leases, replies = _read_watched(client, watch, [store._lease.key for store in stores], commands)
            # Per shard, its read's replies, then its versions_command's.
            of_read = [replies[end - len(read.commands) - 1 : end] for read, end in zip(reads, ends)]
            live = [k for k, (store, lease) in enumerate(zip(stores, leases)) if lease == store._token]
            for k in set(range(len(stores))) - set(live):
                results[busy[k]] = stores[k]._fenced()
            if live:
                hits = [stores[k]._take_in(reads[k], of_read[k][:-1], now) for k in live]
                columns, written = _behaviour([stores[k] for k in live], [reads[k].prepared for k in live])
                commits: list[tuple[int, OwnedFeatureStore, _Commit]] = []
                for j, k in enumerate(live):
                    i, store, batch, p = busy[k], stores[k], parts[busy[k]][1], reads[k].prepared
                    results[i] = assemble(batch, p, columns[j], hits[j], of_read[k][-1], store._confirmed)
                    commits.append((i, store, _Commit(store._writes(p, written[j], batch.transaction_id, now), written[j])))
                for i, store in _commit(watch, commits):
                    results[i] = store._fenced()
    except BaseException:
        # The commit may have reached Redis all the same (a lost reply): start again from what
        # Redis holds rather than from states that may be behind it.
        for store in stores:
            store._states.clear()
        raise
    return results


def _behaviour(stores: list[OwnedFeatureStore], prepared: list[Prepared]) -> tuple[list[np.ndarray], list[dict[str, bytes]]]:
    """Per shard, the behaviour columns of its batch and the new states of its users with new
    transactions. A user lives on one shard, so the shards' batches are computed as one: the
    arithmetic's cost is mostly per call, not per row, and one pass costs what one shard's does."""
    names = [name for p in prepared for name in p.names]
    users_at = np.cumsum([0] + [len(p.names) for p in prepared])
    rows_at = np.cumsum([0] + [len(p.tx.user) for p in prepared])
    joined = {
        field.name: np.concatenate([getattr(p.tx, field.name) for p in prepared])
        for field in dataclasses.fields(behaviour.Transactions)
    }
    joined["user"] = np.concatenate([p.tx.user + first for p, first in zip(prepared, users_at.tolist())])
    tx = behaviour.Transactions(**joined)
    states = behaviour.decode([store._states[name] for store, p in zip(stores, prepared) for name in p.names])
    columns = behaviour.compute(states, tx)
    writers = np.unique(tx.user[tx.new])
    shard_of_writer = np.searchsorted(users_at, writers, side="right") - 1
    written: list[dict[str, bytes]] = [{} for _ in prepared]
    for writer, shard, blob in zip(writers.tolist(), shard_of_writer.tolist(), split_states(behaviour.encode(states, writers))):
        written[shard][names[writer]] = blob
    return [columns[rows_at[j] : rows_at[j + 1]] for j in range(len(prepared))], written


def _read_watched(
    client: redis.Redis | RedisCluster, watch: Watch, leases: list[str], commands: list[Command]
) -> tuple[list[Any], list[Any]]:
    """``watch.read``; after a restarted Redis without persistence, or FUNCTION FLUSH, dropped the
    library, once more with it loaded again."""
    try:
        return watch.read(leases, commands)
    except redis.ResponseError as exc:
        if redis_error_code(exc) != FUNCTION_NOT_FOUND:
            raise
    load_library(client)
    return watch.read(leases, commands)


def _commit(watch: Watch, commits: list[tuple[int, OwnedFeatureStore, _Commit]]) -> list[tuple[int, OwnedFeatureStore]]:
    """Every part's commands in one MULTI/EXEC while the watched leases are unchanged; a changed one
    refuses the whole, and the transaction goes again without the parts whose lease another owner
    now holds. Returns those parts (nothing written for them)."""
    lost: list[tuple[int, OwnedFeatureStore]] = []
    for _ in range(MAX_COMMIT_ATTEMPTS):
        pending = [(i, store, commit) for i, store, commit in commits if commit.commands]
        if not pending:
            return lost
        if watch.execute([c for _i, _store, commit in pending for c in commit.commands]):
            for _i, store, commit in pending:
                store._remember(commit.written)
            return lost
        leases, _ = watch.read([store._lease.key for _i, store, _commit in pending])
        commits = []
        for (i, store, commit), lease in zip(pending, leases):
            if lease == store._token:
                commits.append((i, store, commit))
            else:
                lost.append((i, store))
    raise CommitConflictError(f"a lease changed under {MAX_COMMIT_ATTEMPTS} commits of {len(commits)} shards")
