"""The behaviour state of a shard this worker owns through a lease (``--shards`` > 1).

Nobody else writes the shard's users, so their states are kept in memory (the most recent
MAX_STATES_IN_MEMORY), and per batch: one read (``fraudd_owned_read_v6`` of ``features.lua``) of
the states not in memory, of which transactions were counted before and of the blocklists, the
arithmetic, then the states and markers written once, in one MULTI/EXEC of plain commands under
WATCH of the lease (the same HSETs cost Redis about twice as much called from Lua), applied only
while the lease holds this worker's token.
"""

from __future__ import annotations

import itertools

import numpy as np
import redis
from redis.cluster import RedisCluster

from fraudd.keys import Keys
from fraudd.runtime.redis_clients import node_client, on_node
from fraudd.runtime.redis_wire import Command, transaction_while
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
    compute_features,
    current_period,
    interleave,
    period_key,
    split_states,
    state_periods,
)
from fraudd.scoring.leases import Fenced, Lease

# The states of a shard's recent users kept in memory, up to this many per owned shard (≈ 0.5 KB
# each: ≈ 25 MB per shard; a worker owns about S / workers shards).
MAX_STATES_IN_MEMORY = 50_000
# A commit is tried again when the lease changed between its check and the EXEC: a renewal by this
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
        # The states as last committed, newest last (the oldest go first past the cap).
        self._states: dict[str, bytes | None] = {}
        # The latest state period that held any state this store read; writes go there when this
        # host's clock is behind the previous owner's.
        self._latest_period = -1
        self._confirmed = ConfirmedFraud(redis_client, keys)

    def compute(self, batch: DecodedBatch) -> Features:
        return compute_features(batch, self._keys, self._confirmed, self._behaviour)

    def _behaviour(self, p: Prepared, transaction_ids: list[str], also: Command) -> tuple[np.ndarray, list[bytes], object]:
        """One read (states not in memory, markers, blocklists, and ``also``), the arithmetic, one
        fenced commit; returns the behaviour columns, blocklist flags and the reply of ``also``."""
        node = node_client(self._calls.client, self._keys.stream)
        if node is not self._calls.node:
            # Replication is asynchronous: a failover may have taken this owner's last commits
            # with the old master while its lease survived, and their entries come back pending.
            # Start again from what the node serving the shard now holds (after a slot move too).
            self._states.clear()
            self._calls.node = node
        tx, names = p.tx, p.names
        candidates = Markers.of(np.flatnonzero(tx.new), tx.t_ms)
        missing = [name for name in names if name not in self._states]
        now = current_period()
        keys = [*state_periods(self._keys, now), *candidates.keys(self._keys), *self._calls.blocklist_keys]
        args = [
            len(missing),
            len(candidates.bucket_ids),
            candidates.counts(),
            *p.blocklist_values(),
            *missing,
            *candidates.ids(transaction_ids),
        ]
        (latest, stored, seen, *blocklist_hits), also_reply = self._calls.fcall(READ_FUNCTION, keys, args, also)
        if latest:
            self._latest_period = max(self._latest_period, now + latest - 2)
        for name, blob in zip(missing, stored):
            self._states[name] = blob
        candidates.found(seen, tx)
        p.copies_take_their_originals_time()
        states = behaviour.decode([self._states[name] for name in names])
        behaviour_columns = behaviour.compute(states, tx)
        self._commit(states, p, transaction_ids, now)
        if len(self._states) > MAX_STATES_IN_MEMORY:
            for name in list(itertools.islice(self._states, len(self._states) - MAX_STATES_IN_MEMORY)):
                del self._states[name]
        return behaviour_columns, blocklist_hits, also_reply

    def _commit(self, states: behaviour.States, p: Prepared, transaction_ids: list[str], now: int) -> None:
        """Write the new transactions' users and markers, fenced; then keep the states written."""
        tx, names = p.tx, p.names
        new = np.flatnonzero(tx.new)
        writers = np.unique(tx.user[new])
        if not len(writers):
            return
        written = split_states(behaviour.encode(states, writers))
        writer_names = [names[w] for w in writers.tolist()]
        markers = Markers.of(new, tx.t_ms)
        pairs = markers.pairs(transaction_ids)
        period = period_key(self._keys, max(now, self._latest_period))
        commands: list[Command] = [("HSET", period, *interleave(writer_names, written)), ("PEXPIRE", period, STATE_TTL_MS)]
        start = 0
        for bucket, count in zip(markers.bucket_ids, markers.bucket_counts.tolist()):
            key = self._keys.seen_bucket(bucket)
            commands += [("HSET", key, *pairs[start : start + 2 * count]), ("PEXPIRE", key, self._dedup_window_ms)]
            start += 2 * count
        try:
            on_node(self._calls.client, self._keys.stream, lambda client: self._send_fenced(client, commands))
        except BaseException:
            # The commit may have reached Redis all the same (a lost reply): start again from
            # what Redis holds rather than from states that may be behind it.
            self._states.clear()
            raise
        for name, blob in zip(writer_names, written):
            self._states.pop(name, None)
            self._states[name] = blob

    def _send_fenced(self, client: redis.Redis, commands: list[Command]) -> None:
        """``commands`` in one MULTI/EXEC, applied only while the shard's lease holds this worker's
        token (raises ``Fenced`` otherwise); tried again when the lease changed in between."""
        token = self._lease.token.encode()
        for _ in range(MAX_COMMIT_ATTEMPTS):
            applied = transaction_while(client, self._lease.key, token, commands)
            if applied is False:
                raise Fenced(f"lease on {self._keys.stream} lost")
            if applied:
                return
        raise CommitConflictError(f"lease on {self._keys.stream} changed under {MAX_COMMIT_ATTEMPTS} commits")
