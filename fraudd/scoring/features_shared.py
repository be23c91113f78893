"""The behaviour state shared by every worker of the group (one shard, the default).

Any worker may write any user, so per batch: one pipelined read (HMGET of the users' states), the
arithmetic in the worker (``behaviour.py``), then one atomic commit call (``fraudd_commit_v6`` of
``features.lua``) that writes each user's state only if it is unchanged since the read, together
with its transactions' dedup markers and the blocklist lookups. A conflict (another worker wrote
the user, or a transaction was already counted) is re-read and recomputed for the users
concerned only, so idempotency costs extra only when a duplicate or a race actually happens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import redis
from redis.cluster import RedisCluster

from fraudd.keys import Keys
from fraudd.runtime.redis_wire import Command, sharing_tail
from fraudd.scoring import behaviour
from fraudd.scoring.behaviour import BEHAVIOUR_FEATURES
from fraudd.scoring.confirmed import ConfirmedFraud
from fraudd.scoring.decode import DecodedBatch
from fraudd.scoring.features import (
    BLOCKLIST_KINDS,
    FUNCTION_NAME,
    STATE_TTL_MS,
    CommitConflictError,
    Features,
    Markers,
    Prepared,
    ShardCalls,
    compute_features,
    interleave,
    newest_states,
    split_states,
    state_periods,
)

# Each round of conflicts settles at least one racing writer or teaches every already-counted
# transaction of the users concerned, so a handful suffice; more means something is wrong.
MAX_COMMIT_ATTEMPTS = 20
# The commit compares only a state's first bytes, its version stamp (newest event time and the
# count of transactions applied, which grows with every commit: see features.lua); all zero when
# the user had no state.
STAMP_SIZE = 12
_ABSENT = bytes(STAMP_SIZE)
assert behaviour.STATE.names is not None and behaviour.STATE.fields is not None
assert behaviour.STATE.names[:2] == ("head_ms", "n") and behaviour.STATE.fields["n"][1] + 4 == STAMP_SIZE


class SharedFeatureStore:
    """Computes features for a batch and records it in the shared behaviour state, exactly once: a
    compare-and-set commit, retried for the users that changed meanwhile."""

    def __init__(self, redis_client: redis.Redis | RedisCluster, keys: Keys, dedup_window_ms: int) -> None:
        self._calls = ShardCalls(redis_client, keys)
        self._keys = keys
        self._dedup_window_ms = int(dedup_window_ms)
        self._confirmed = ConfirmedFraud(redis_client, keys)

    def compute(self, batch: DecodedBatch) -> Features:
        return compute_features(batch, self._keys, self._confirmed, self._behaviour)

    def _behaviour(self, p: Prepared, transaction_ids: list[str], also: Command) -> tuple[np.ndarray, list[bytes], object]:
        """Behaviour columns, blocklist flags and the reply of ``also`` (sent with the first read)."""
        tx, names = p.tx, p.names
        behaviour_columns = np.empty((len(tx.user), len(BEHAVIOUR_FEATURES)))
        pending = np.arange(len(names))
        blocklist_hits: list[bytes] = []
        also_reply: object = None
        values = p.blocklist_values()
        held = self._calls.held_back(values)
        for attempt in range(MAX_COMMIT_ATTEMPTS):
            if attempt == 0:
                blobs, (also_reply, *probed) = self._read(names, also, *self._calls.probe(held))
                # A kind whose blocklist was empty is looked up again only once its set exists.
                if held and not probed[0]:
                    values = [b"" if k in held else value for k, value in enumerate(values)]
                    looked_up = [k for k in range(len(values)) if k not in held]
                else:
                    looked_up = list(range(len(values)))
            else:
                blobs, _ = self._read([names[i] for i in pending])
            # Copies take their original's event time, which a commit conflict may have corrected.
            p.copies_take_their_originals_time()
            local = np.full(len(names), -1, np.intp)
            local[pending] = np.arange(len(pending))
            rows = np.flatnonzero(local[tx.user] >= 0)
            sub = _subset(tx, local, rows)
            states = behaviour.decode(blobs)
            behaviour_columns[rows] = behaviour.compute(states, sub)
            # Blocklists are looked up once, in the first commit call.
            joined = [] if blocklist_hits else values
            pending, hits = self._commit(states, sub, rows, blobs, pending, names, transaction_ids, tx, joined)
            if hits and not blocklist_hits:
                self._calls.learn(values, hits, looked_up)
            blocklist_hits = blocklist_hits or hits
            if len(pending) == 0:
                return behaviour_columns, blocklist_hits, also_reply
        raise CommitConflictError(
            f"behaviour state of {len(pending)} users still conflicting after {MAX_COMMIT_ATTEMPTS} attempts"
        )

    def _read(self, names: list[str], *also: Command) -> tuple[list[bytes | None], list[Any]]:
        """The users' latest states as stored (None = absent), and the replies of the commands
        ``also``: one round trip, no Lua. The next period's hash exists only when another host's
        clock is ahead: its HMGET is a few nils."""
        periods = sharing_tail([("HMGET", key) for key in reversed(state_periods(self._keys))], names) if names else []
        replies = self._calls.round_trip([*periods, *also]) if periods or also else []
        return newest_states(replies[: len(periods)]), replies[len(periods) :]

    def _commit(
        self,
        states: behaviour.States,
        sub: behaviour.Transactions,
        rows: np.ndarray,
        blobs: list[bytes | None],
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
        markers = Markers.of(rows[new], tx.t_ms)
        owner = owner[markers.order]
        keys = [*state_periods(self._keys), *markers.keys([self._keys]), *self._calls.blocklist_keys]
        args = [
            self._dedup_window_ms,
            STATE_TTL_MS,
            len(writers),
            len(markers.bucket_ids),
            b"".join([(blobs[w] or _ABSENT)[:STAMP_SIZE] for w in writers.tolist()]),
            markers.counts(),
            (owner + 1).astype(">u4").tobytes(),
            *(blocklist_values or [b""] * len(BLOCKLIST_KINDS)),
            *interleave([names[i] for i in pending[writers].tolist()], split_states(behaviour.encode(states, writers))),
            *markers.pairs(transaction_ids),
        ]
        (stale, seen, *flags), _ = self._calls.fcall(FUNCTION_NAME, keys, args)
        conflicted = {int(w) - 1 for w in stale}
        conflicted.update(int(owner[marker]) for marker in markers.found(seen, tx))
        return pending[writers[sorted(conflicted)]], flags


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
