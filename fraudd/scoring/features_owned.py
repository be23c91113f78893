"""The behaviour state of shards this worker owns through leases (``--shards`` > 1).

Nobody else writes a shard's users, so their states are kept in memory (the most recent
MAX_STATES_IN_MEMORY per shard), and per read, for every owned shard the read spans at once
(``compute_owned``): the parts prepared as one batch (one ``prepare``, one set of markers, one
arithmetic, one assembly, each part's features a slice of the read's: a read's cost in the worker
does not grow with its shards); one round trip with each shard's read (plain HMGETs of the states
not in memory and of which transactions were counted before, ``fraudd_owned_read_v6`` of
``features.lua`` for the blocklists in use, an EXISTS of those found empty before), one MGET of
every shard's versions and one of the leases, watched; the arithmetic; then every shard's states
and markers written in one MULTI/EXEC of plain commands (the same HSETs cost Redis about twice as
much called from Lua), applied only while no lease written for changed since it was read as this
worker's token.

A lost lease fences only its own shard. One found another owner's at the read leaves its part out
before anything is taken in or written: the read goes again without it (one more round trip, once
per shard lost), and the others commit. A lease found changed at the EXEC (a renewal by this
worker's lease thread, or a new owner) refuses the whole transaction, nothing written; the leases
are read again and the transaction sent again without the parts whose lease another owner now
holds. Refusing the whole rather than half is what MULTI/EXEC gives, and it is what keeps it
exactly once: a transaction is either all written or not at all, so sending it again never writes
a marker twice. One MULTI/EXEC per shard, pipelined on the connection, would not do: EXEC
forgets every WATCH of its connection, so each after the first would be unfenced, or fenced only
from a WATCH sent after the read.

On a Redis Cluster, which refuses a transaction across slots (each shard is a slot), each shard is
read and committed on its own, in the same two round trips.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import redis
from redis.cluster import RedisCluster

from fraudd.keys import Keys
from fraudd.runtime.redis_clients import FUNCTION_NOT_FOUND, node_client, on_node, redis_error_code
from fraudd.runtime.redis_wire import Command, Outgoing, Watch, sharing_tail
from fraudd.scoring import behaviour, joined
from fraudd.scoring.confirmed import ConfirmedFraud
from fraudd.scoring.decode import DecodedBatch
from fraudd.scoring.features import (
    READ_FUNCTION,
    STATE_TTL_MS,
    CommitConflictError,
    Features,
    Markers,
    PartReplies,
    Prepared,
    ShardCalls,
    assemble,
    current_period,
    empty_features,
    interleave,
    load_library,
    newest_states,
    part_of_rows,
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
    """A read's parts prepared as one batch, with what it asks their shards for."""

    batch: DecodedBatch  # the parts' rows one after the other
    prepared: Prepared
    part: np.ndarray | None  # each row's part (None: one part)
    candidates: Markers  # the markers of the read's new transactions, to look up
    missing: list[list[str]]  # per part, its users whose state is not in memory
    values: list[list[bytes]]  # per part, per BLOCKLIST_KINDS, its values to look up (NUL-joined)
    held: list[list[int]]  # per part, the kinds whose values the read holds back (blocklist unused)
    called: list[bool]  # per part, whether the read calls the Function for its blocklists
    commands: list[Outgoing]


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
    for i in busy:
        parts[i][0]._served_by(node)
    while busy:
        stores = [parts[i][0] for i in busy]
        now = current_period()
        read = _read_of(stores, [parts[i][1] for i in busy], now)
        try:
            with Watch(node) as watch:
                leases, replies = _read_watched(client, watch, [store._lease.key for store in stores], read.commands)
                live = [lease == store._token for store, lease in zip(stores, leases)]
                if not all(live):
                    # Nothing of the read taken in yet: read again without the parts fenced out.
                    for i, store, held in zip(busy, stores, live):
                        if not held:
                            results[i] = store._fenced()
                    busy = [i for i, held in zip(busy, live) if held]
                    continue
                looked_up = _take_in(stores, read, replies, now)
                columns, written = _behaviour(stores, read.prepared)
                commits = [
                    (i, store, _Commit(commands, states))
                    for i, store, commands, states in zip(busy, stores, _writes(stores, read, written, now), written)
                ]
                for j, features in enumerate(assemble(read.batch, read.prepared, columns, looked_up)):
                    results[busy[j]] = features
                for i, store in _commit(watch, commits):
                    results[i] = store._fenced()
        except BaseException:
            # The commit may have reached Redis all the same (a lost reply): start again from what
            # Redis holds rather than from states that may be behind it.
            for store in stores:
                store._states.clear()
            raise
        break
    return results


def _read_of(stores: list[OwnedFeatureStore], batches: list[DecodedBatch], now: int) -> _Read:
    """The read of the parts, prepared once for all: each shard's states not in memory, the markers
    already stored, the blocklists, and every shard's versions in one MGET.

    States and markers are read with plain HMGETs, not inside the read Function: an argument a
    Function passes on costs Redis a Lua string and a second command argument, more than the
    HMGET itself (``python -m bench redis-instructions``: the read's ≈ 8,700 instructions of
    Redis per transaction at 8 shards became ≈ 2,500). The Function is called without users or
    markers, for the blocklists alone, and without the values of a kind whose blocklist was empty
    at the shard's last read (``ShardCalls.held_back``): those kinds are probed with one EXISTS,
    a shard with no other values to look up calls no Function, and one found filled since is
    looked up in one more round trip (``_blocklist_hits``)."""
    batch = joined.batches(batches)
    bounds = list(itertools.accumulate(map(len, batches), initial=0))
    p = prepare(batch, bounds)
    part = part_of_rows(bounds) if len(batches) > 1 else None
    candidates = Markers.of(np.flatnonzero(p.tx.new), p.tx.t_ms, part)
    missing: list[list[str]] = []
    values = [p.blocklist_values(j) for j in range(len(stores))]
    held: list[list[int]] = []
    called: list[bool] = []
    periods: list[Outgoing] = []
    blocklists: list[Command] = []
    probes: list[Command] = []
    for j, store in enumerate(stores):
        absent = [name for name in p.names[p.user_bounds[j] : p.user_bounds[j + 1]] if name not in store._states]
        missing.append(absent)
        periods += sharing_tail([("HMGET", key) for key in reversed(state_periods(store._keys, now))], absent) if absent else []
        held.append(store._calls.held_back(values[j]))
        probes += store._calls.probe(held[j])
        sent = [b"" if k in held[j] else value for k, value in enumerate(values[j])]
        called.append(any(sent))
        if called[j]:
            keys, args = _blocklist_read(store, now, sent)
            blocklists.append(("FCALL", READ_FUNCTION, len(keys), *keys, *args))
    ids = candidates.ids(batch.transaction_id)
    markers: list[Command] = [
        ("HMGET", key, *ids[start:end])
        for key, (start, end) in zip(candidates.keys([store._keys for store in stores]), candidates.spans())
    ]
    versions = versions_command([(store._keys, store._confirmed) for store in stores])
    return _Read(batch, p, part, candidates, missing, values, held, called, [*periods, *markers, *blocklists, *probes, versions])


def _blocklist_read(store: OwnedFeatureStore, now: int, values: list[bytes]) -> tuple[list[str], list[Any]]:
    """The keys and arguments of the read Function called for the blocklists alone: per
    BLOCKLIST_KINDS, ``values`` to look up (NUL-joined; empty: none)."""
    return [*state_periods(store._keys, now), *store._calls.blocklist_keys], [0, 0, b"", *values]


def _take_in(stores: list[OwnedFeatureStore], read: _Read, replies: list[Any], now: int) -> list[PartReplies]:
    """The read's replies taken in: states into memory, the transactions found counted before
    marked seen (at their original's time, copies too); returns what each shard answered."""
    at = 0
    for store, missing in zip(stores, read.missing):
        if not missing:
            continue
        periods = replies[at : at + len(state_periods(store._keys, now))]
        at += len(periods)
        # The newest period holding any of the states: 1, 0 or -1 from this host's.
        latest = next((1 - j for j, stored in enumerate(periods) if any(state is not None for state in stored)), None)
        if latest is not None:
            store._latest_period = max(store._latest_period, now + latest)
        for name, blob in zip(missing, newest_states(periods)):
            store._states[name] = blob
    markers = replies[at : at + len(read.candidates.bucket_ids)]
    at += len(markers)
    blocklists = iter(replies[at : at + sum(read.called)])
    probes = iter(replies[at + sum(read.called) : -1])
    seen = [
        value
        for number, offset in enumerate(itertools.chain.from_iterable(markers), 1)
        if offset is not None
        for value in (number, offset)
    ]
    read.candidates.found(seen, read.prepared.tx)
    read.prepared.copies_take_their_originals_time()
    versions = replies[-1]
    return [
        PartReplies(
            _blocklist_hits(
                store,
                now,
                values,
                next(blocklists)[3:] if called else [b""] * len(values),
                held,
                bool(held) and next(probes) > 0,
            ),
            versions[2 * j : 2 * j + 2],
            store._confirmed,
        )
        for j, (store, values, held, called) in enumerate(zip(stores, read.values, read.held, read.called))
    ]


def _blocklist_hits(
    store: OwnedFeatureStore, now: int, values: list[bytes], flags: list[bytes], held: list[int], filled: bool
) -> list[bytes]:
    """Per BLOCKLIST_KINDS, the flags of the part's values: the read's, and of the kinds it held back
    (``held``), when the EXISTS found any of their blocklists filled (``filled``), those of one more
    call with their values. Remembers which blocklists were empty for the shard's next read: one
    answers no flags to values looked up only when empty."""
    if filled:
        reply, _ = store._calls.fcall(
            READ_FUNCTION, *_blocklist_read(store, now, [value if k in held else b"" for k, value in enumerate(values)])
        )
        flags = [cast(list[bytes], reply)[3 + k] if k in held else hits for k, hits in enumerate(flags)]
    store._calls.learn(values, flags, (k for k in range(len(values)) if filled or k not in held))
    return flags


def _behaviour(stores: list[OwnedFeatureStore], p: Prepared) -> tuple[np.ndarray, list[dict[str, bytes]]]:
    """The behaviour columns of the read and, per shard, the new states of its users with new
    transactions. A user lives on one shard (``prepare`` keeps the parts apart), so the shards'
    batches are computed as one: the arithmetic's cost is mostly per call, not per row, and one
    pass costs what one shard's does."""
    ends = p.user_bounds
    states = behaviour.decode([store._states[name] for j, store in enumerate(stores) for name in p.names[ends[j] : ends[j + 1]]])
    columns = behaviour.compute(states, p.tx)
    writers = np.unique(p.tx.user[p.tx.new])
    shard_of_writer = np.searchsorted(ends, writers, side="right") - 1
    written: list[dict[str, bytes]] = [{} for _ in stores]
    for writer, shard, blob in zip(writers.tolist(), shard_of_writer.tolist(), split_states(behaviour.encode(states, writers))):
        written[shard][p.names[writer]] = blob
    return columns, written


def _writes(stores: list[OwnedFeatureStore], read: _Read, written: list[dict[str, bytes]], now: int) -> list[list[Command]]:
    """Per shard, the commands writing the states ``written`` (its users with new transactions) and
    its new transactions' markers."""
    p = read.prepared
    markers = Markers.of(np.flatnonzero(p.tx.new), p.tx.t_ms, read.part).writes(
        [store._keys for store in stores], read.batch.transaction_id, [store._dedup_window_ms for store in stores]
    )
    commands: list[list[Command]] = []
    for store, states, marker_writes in zip(stores, written, markers):
        period = period_key(store._keys, max(now, store._latest_period))
        commands.append(
            [
                ("HSET", period, *interleave(list(states), list(states.values()))),
                ("PEXPIRE", period, STATE_TTL_MS),
                *marker_writes,
            ]
            if states
            else []
        )
    return commands


def _read_watched(
    client: redis.Redis | RedisCluster, watch: Watch, leases: list[str], commands: list[Outgoing]
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
