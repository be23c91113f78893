"""Behaviour-state arithmetic for a whole batch, in numpy: decode, apply, evaluate, encode.

Why in the worker: Redis is the one single-threaded process every worker shares, and doing this
arithmetic in Lua made it most of Redis's cost per transaction. Workers scale with processes, and
numpy does each step for all of a batch's users at once. Redis only stores the fixed-size blobs
this module packs (``features.py`` commits them with a compare-and-set, exactly once).

A user's state is one fixed-size blob whatever the rate, so memory stays bounded: bucketed counts
and amount sums, a few exact recent transactions, a few remembered merchants, countries, devices
and cards. Transactions are applied in rounds — round k applies the k-th new transaction of every
user of the batch, in event-time order — so the vector width is the number of users, and each
transaction is evaluated right after it is applied, at its own event time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BEHAVIOUR_FEATURES: tuple[str, ...] = (
    "count_1m",
    "count_1h",
    "count_24h",
    "amount_sum_24h",
    "amount_to_mean",
    "distinct_merchants_1h",
    "distinct_merchants_24h",
    "distinct_countries_1h",
    "distinct_countries_24h",
    "seconds_since_prev",
    "new_device",
    "new_country",
    "new_merchant",
    "card_count_1m",
    "card_count_1h",
    "card_count_24h",
)
# "No previous transaction" and "long ago" are the same thing to the model; a cap keeps the
# column's scale bounded for the training set.
SECONDS_SINCE_PREV_CAP = 86400.0

# Time buckets. The 1 h window is the current 10-minute slot and the 5 before it, the 24 h window
# the current 2-hour slot and the 11 before it.
S1H, N1H = 600_000, 6
S24, N24 = 7_200_000, 12
MINUTE_MS = 60_000
# Recent transactions kept exactly (1-minute count, seconds since previous, and to take later
# transactions back out of a slot when features are computed at an earlier event time).
KR, KRC = 6, 4
# Entities kept per user (least recently seen is evicted): merchants, countries, devices, cards.
KM, KC, KD, KCARD = 4, 3, 3, 2
_COUNT_CAP = 65535.0
# Recent times are stored as offsets back from the head so they fit 32 bits; this means "empty".
_EMPTY = 0xFFFFFFFF

# The stored layout. The first two fields are read by the recovery and chaos tests (``<dI``: head,
# count of transactions applied). Card counters live in the card owner's state (one field per user,
# not two): the rings share the user's head, which is their validity horizon.
STATE = np.dtype(
    [
        ("head_ms", "<f8"),
        ("n", "<u4"),
        ("mean", "<f8"),
        ("recent_ago", "<u4", (KR,)),
        ("recent_amount", "<f4", (KR,)),
        ("count_1h", "<u2", (N1H,)),
        ("count_24h", "<u2", (N24,)),
        ("sum_24h", "<f4", (N24,)),
        ("merchant", "<u4", (KM,)),
        ("merchant_first", "<u4", (KM,)),
        ("merchant_last", "<u4", (KM,)),
        ("country", "<u2", (KC,)),
        ("country_first", "<u4", (KC,)),
        ("country_last", "<u4", (KC,)),
        ("device", "<u4", (KD,)),
        ("device_first", "<u4", (KD,)),
        ("device_last", "<u4", (KD,)),
        ("card", "<u4", (KCARD,)),
        ("card_recent_ago", "<u4", (KCARD, KRC)),
        ("card_count_1h", "<u2", (KCARD, N1H)),
        ("card_count_24h", "<u2", (KCARD, N24)),
    ]
)


def _empty_state() -> bytes:
    rec = np.zeros(1, dtype=STATE)
    rec["head_ms"] = -1.0
    rec["recent_ago"] = _EMPTY
    rec["card_recent_ago"] = _EMPTY
    return rec.tobytes()


# What ``decode`` reads for a user without a stored state.
_EMPTY_STATE = _empty_state()


@dataclass(slots=True)
class Entities:
    """Remembered (id, first seen, last seen) per user; id 0 = empty slot, times in Unix seconds."""

    ids: np.ndarray  # int64 (U, K)
    first: np.ndarray  # float64 (U, K)
    last: np.ndarray  # float64 (U, K)


@dataclass(slots=True)
class States:
    """Decoded states of U users, as float64 work arrays (times absolute ms, -1 = none)."""

    head: np.ndarray  # (U,) newest event time applied
    n: np.ndarray  # (U,)
    mean: np.ndarray  # (U,) running mean amount
    recent: np.ndarray  # (U, KR)
    recent_amount: np.ndarray  # (U, KR)
    count_1h: np.ndarray  # (U, N1H) ring indexed by absolute slot number mod N1H
    count_24h: np.ndarray  # (U, N24)
    sum_24h: np.ndarray  # (U, N24)
    merchants: Entities
    countries: Entities
    devices: Entities
    card: np.ndarray  # int64 (U, KCARD) card hash, 0 = empty
    card_recent: np.ndarray  # (U, KCARD, KRC)
    card_count_1h: np.ndarray  # (U, KCARD, N1H)
    card_count_24h: np.ndarray  # (U, KCARD, N24)


@dataclass(slots=True)
class Transactions:
    """The rows to compute. ``user`` indexes States; ``new`` rows are applied, the others only
    evaluated (already counted: ``t_ms`` is then the original's event time)."""

    user: np.ndarray  # intp
    t_ms: np.ndarray  # float64
    new: np.ndarray  # bool
    amount: np.ndarray  # float64
    merchant: np.ndarray  # int64 hash, never 0
    country: np.ndarray  # int64 code, 0 = absent
    device: np.ndarray  # int64 hash, 0 = absent
    card: np.ndarray  # int64 hash, 0 = absent


def decode(blobs: list[bytes | None]) -> States:
    """States from stored blobs; a missing one (new or idle user) is the empty state."""
    rec = np.frombuffer(b"".join([_EMPTY_STATE if b is None else b for b in blobs]), dtype=STATE)
    head = rec["head_ms"].astype(np.float64)
    return States(
        head=head,
        n=rec["n"].astype(np.float64),
        mean=rec["mean"].astype(np.float64),
        recent=_times(head, rec["recent_ago"], 1),
        recent_amount=rec["recent_amount"].astype(np.float64),
        count_1h=rec["count_1h"].astype(np.float64),
        count_24h=rec["count_24h"].astype(np.float64),
        sum_24h=rec["sum_24h"].astype(np.float64),
        merchants=_entities(rec, "merchant"),
        countries=_entities(rec, "country"),
        devices=_entities(rec, "device"),
        card=rec["card"].astype(np.int64),
        card_recent=_times(head, rec["card_recent_ago"], 2),
        card_count_1h=rec["card_count_1h"].astype(np.float64),
        card_count_24h=rec["card_count_24h"].astype(np.float64),
    )


def encode(s: States, rows: np.ndarray) -> bytes:
    """The given users' states, concatenated (fixed size each), with one ``tobytes``."""
    rec = np.empty(len(rows), dtype=STATE)
    head = s.head[rows]
    rec["head_ms"] = head
    rec["n"] = s.n[rows]
    rec["mean"] = s.mean[rows]
    rec["recent_ago"] = _offsets(head, s.recent[rows], 1)
    rec["recent_amount"] = s.recent_amount[rows]
    rec["count_1h"] = s.count_1h[rows]
    rec["count_24h"] = s.count_24h[rows]
    rec["sum_24h"] = s.sum_24h[rows]
    for name, ent in (("merchant", s.merchants), ("country", s.countries), ("device", s.devices)):
        rec[name] = ent.ids[rows]
        rec[name + "_first"] = ent.first[rows]
        rec[name + "_last"] = ent.last[rows]
    rec["card"] = s.card[rows]
    rec["card_recent_ago"] = _offsets(head, s.card_recent[rows], 2)
    rec["card_count_1h"] = s.card_count_1h[rows]
    rec["card_count_24h"] = s.card_count_24h[rows]
    return rec.tobytes()


def compute(s: States, tx: Transactions) -> np.ndarray:
    """BEHAVIOUR_FEATURES of every row (float64 (m, 16)); new rows are applied to ``s`` in place.

    New rows are applied per user in (event time, row) order, each evaluated right after its own
    application; already-counted rows are evaluated last, against the final state, at their
    original event time — so a copy later in the batch than its original still sees it.
    """
    out = np.empty((len(tx.user), len(BEHAVIOUR_FEATURES)))
    new = np.flatnonzero(tx.new)
    order = new[np.lexsort((new, tx.t_ms[new], tx.user[new]))]
    if len(order):
        users = tx.user[order]
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
        rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        by_rank = order[np.argsort(rank, kind="stable")]
        for rows in np.split(by_rank, np.cumsum(np.bincount(rank))[:-1]):
            _apply(s, tx, rows)
            out[rows] = _evaluate(s, tx, rows)
    old = np.flatnonzero(~tx.new)
    if len(old):
        out[old] = _evaluate(s, tx, old)
    return out


def _times(head: np.ndarray, ago: np.ndarray, extra_dims: int) -> np.ndarray:
    h = head.reshape(head.shape + (1,) * extra_dims)
    return np.where(ago == _EMPTY, -1.0, h - ago)


def _offsets(head: np.ndarray, times: np.ndarray, extra_dims: int) -> np.ndarray:
    ago = head.reshape(head.shape + (1,) * extra_dims) - times
    return np.where(times < 0, _EMPTY, np.minimum(ago, _EMPTY - 1)).astype(np.uint32)


def _entities(rec: np.ndarray, name: str) -> Entities:
    return Entities(rec[name].astype(np.int64), rec[name + "_first"].astype(np.float64), rec[name + "_last"].astype(np.float64))


def _cleared(head: np.ndarray, slot: np.ndarray, moved: np.ndarray, size: int, n: int) -> np.ndarray:
    """(R, n) mask of the ring slots a head moving from ``head`` to the event of absolute slot
    ``slot`` passes (to be zeroed); ``moved``: the event is later than the head.

    Slot j is passed when some absolute slot in (h, s] maps to it; a gap of a whole ring or more
    clears everything, so a long silence resets the window."""
    h = np.floor(head / size)
    d = np.mod(np.arange(n)[None, :] - h[:, None] - 1, n)
    return moved[:, None] & (d < (slot - h)[:, None])


def _ring_index(
    index: tuple[np.ndarray, ...], head: np.ndarray, slot: np.ndarray, size: int, n: int
) -> tuple[tuple[np.ndarray, ...], np.ndarray | None]:
    """Where events of absolute ``slot`` go in a ring, leaving out those older than its reach from
    ``head``; and the mask of the events kept, None when all are (events in order: no selection)."""
    ok = slot > np.floor(head / size) - n
    if ok.all():
        return (*index, np.mod(slot, n).astype(np.intp)), None
    return (*(i[ok] for i in index), np.mod(slot[ok], n).astype(np.intp)), ok


def _add(ring: np.ndarray, at: tuple[tuple[np.ndarray, ...], np.ndarray | None], x: np.ndarray | float, cap: float) -> None:
    """Adds x to the slots ``_ring_index`` found (the events it kept)."""
    idx, ok = at
    if ok is not None and isinstance(x, np.ndarray):
        x = x[ok]
    ring[idx] = np.minimum(ring[idx] + x, cap)


def _remember(recent: np.ndarray, amounts: np.ndarray | None, ts: np.ndarray, amount: np.ndarray | None) -> None:
    """Recent event times (R, K), unsorted: a new one replaces the oldest if it is newer."""
    r = np.arange(len(ts))
    oldest = np.argmin(recent, axis=1)
    take = ts > recent[r, oldest]
    recent[r[take], oldest[take]] = ts[take]
    if amounts is not None and amount is not None:
        amounts[r[take], oldest[take]] = amount[take]


def _slot(ids: np.ndarray, last: np.ndarray, want: np.ndarray, now: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where an entity goes: its own slot, else the first empty one, else the least recently seen
    (taken only by an observation newer than that one's last). Returns (slot, found, write)."""
    match = ids == want[:, None]
    found = match.any(axis=1)
    empty = ids == 0
    any_empty = empty.any(axis=1)
    slot = np.where(found, match.argmax(axis=1), np.where(any_empty, empty.argmax(axis=1), last.argmin(axis=1)))
    write = found | any_empty | (now > last[np.arange(len(want)), slot])
    return slot, found, write


def _observe(ent: Entities, users: np.ndarray, ids: np.ndarray, tsec: np.ndarray) -> None:
    keep = ids > 0
    if not keep.all():
        users, ids, tsec = users[keep], ids[keep], tsec[keep]
    slot, found, write = _slot(ent.ids[users], ent.last[users], ids, tsec)
    if not write.all():
        users, slot, found, tsec, ids = users[write], slot[write], found[write], tsec[write], ids[write]
    at = (users, slot)
    ent.first[at] = np.where(found, np.minimum(ent.first[at], tsec), tsec)
    ent.last[at] = np.where(found, np.maximum(ent.last[at], tsec), tsec)
    ent.ids[at] = ids


def _apply(s: States, tx: Transactions, rows: np.ndarray) -> None:
    """Adds one transaction to each user's state (each user at most once in ``rows``)."""
    u, ts, amount = tx.user[rows], tx.t_ms[rows], tx.amount[rows]
    head = s.head[u]
    moved = ts > head
    slot_1h, slot_24 = np.floor(ts / S1H), np.floor(ts / S24)
    if moved.any():
        for slot, size, n, user_rings, card_rings in (
            (slot_1h, S1H, N1H, (s.count_1h,), s.card_count_1h),
            (slot_24, S24, N24, (s.count_24h, s.sum_24h), s.card_count_24h),
        ):
            clear = _cleared(head, slot, moved, size, n)
            if clear.any():
                for ring in user_rings:
                    ring[u] = np.where(clear, 0.0, ring[u])
                card_rings[u] = np.where(clear[:, None, :], 0.0, card_rings[u])
        head = np.maximum(head, ts)
        s.head[u] = head
    _add(s.count_1h, _ring_index((u,), head, slot_1h, S1H, N1H), 1.0, _COUNT_CAP)
    at_24 = _ring_index((u,), head, slot_24, S24, N24)
    _add(s.count_24h, at_24, 1.0, _COUNT_CAP)
    _add(s.sum_24h, at_24, amount, np.inf)
    recent, amounts = s.recent[u], s.recent_amount[u]
    _remember(recent, amounts, ts, amount)
    s.recent[u], s.recent_amount[u] = recent, amounts
    n = s.n[u] + 1
    s.n[u] = n
    mean = s.mean[u]
    s.mean[u] = mean + (amount - mean) / n
    tsec = np.floor(ts / 1000)
    _observe(s.merchants, u, tx.merchant[rows], tsec)
    _observe(s.countries, u, tx.country[rows], tsec)
    _observe(s.devices, u, tx.device[rows], tsec)

    card = tx.card[rows]
    with_card = np.flatnonzero(card > 0)
    if len(with_card) == 0:
        return
    u, ts, head, card = u[with_card], ts[with_card], head[with_card], card[with_card]
    slot_1h, slot_24 = slot_1h[with_card], slot_24[with_card]
    slot, found, write = _slot(s.card[u], s.card_recent[u].max(axis=2), card, ts)
    if not write.all():
        u, ts, head, slot, card, found = u[write], ts[write], head[write], slot[write], card[write], found[write]
        slot_1h, slot_24 = slot_1h[write], slot_24[write]
    fresh = ~found
    if fresh.any():
        # A card taking over a slot starts with an empty history.
        taken = (u[fresh], slot[fresh])
        s.card_recent[taken] = -1.0
        s.card_count_1h[taken] = 0.0
        s.card_count_24h[taken] = 0.0
    s.card[u, slot] = card
    _add(s.card_count_1h, _ring_index((u, slot), head, slot_1h, S1H, N1H), 1.0, _COUNT_CAP)
    _add(s.card_count_24h, _ring_index((u, slot), head, slot_24, S24, N24), 1.0, _COUNT_CAP)
    recent = s.card_recent[u, slot]
    _remember(recent, None, ts, None)
    s.card_recent[u, slot] = recent


class _Window:
    """The slots of a ring that make the window ending at each event time t, for every ring of one
    slot size read at the same (head, t): computed once, applied to each ring."""

    __slots__ = ("before_head", "inside", "size", "slot", "t")

    def __init__(self, size: int, n: int, head: np.ndarray, t: np.ndarray) -> None:
        s, h = np.floor(t / size), np.floor(head / size)
        lo = np.maximum(s, h) - n + 1
        hi = np.minimum(s, h)
        absolute = hi[:, None] - np.mod(hi[:, None] - np.arange(n)[None, :], n)
        self.size, self.slot, self.t = size, s, t
        self.inside = absolute >= lo[:, None]
        # Only an evaluation before the head (out of order, redelivered) has later transactions.
        before = (hi == s) & (t < head)
        self.before_head = before if before.any() else None

    def later(self, recent: np.ndarray) -> np.ndarray | None:
        """Which of the recent transactions are later than t in t's own slot (the only slot of t's
        window a later transaction can be in); None when no evaluation is before its head."""
        if self.before_head is None:
            return None
        t = self.t[:, None]
        later: np.ndarray = self.before_head[:, None] & (recent > t) & (np.floor(recent / self.size) == self.slot[:, None])
        return later

    def total(self, ring: np.ndarray, later: np.ndarray | None, amounts: np.ndarray | None) -> np.ndarray:
        """Sum of the window, minus the ``later`` transactions (their amounts, else 1 each)."""
        total = np.where(self.inside, ring, 0.0).sum(axis=1)
        if later is not None:
            total -= np.where(later, 1.0 if amounts is None else amounts, 0.0).sum(axis=1)
        clipped: np.ndarray = np.maximum(total, 0.0)
        return clipped


def _recent_stats(recent: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(count in the minute (t - 60 s, t] capped at 255, seconds since the previous or -1)."""
    tt = t[:, None]
    c1m = np.minimum(((recent <= tt) & (recent > tt - MINUTE_MS)).sum(axis=1), 255).astype(np.float64)
    prev = np.where(recent < tt, recent, -1.0).max(axis=1)
    return c1m, np.where(prev < 0, -1.0, (t - prev) / 1000)


def _first_time(ids: np.ndarray, first: np.ndarray, want: np.ndarray, tsec: np.ndarray) -> np.ndarray:
    """1 where no observation of the entity is earlier than tsec (absent id: 0); ``ids`` and
    ``first``: the users' remembered entities."""
    match = ids == want[:, None]
    first_of = first[np.arange(len(want)), match.argmax(axis=1)]
    first_seen: np.ndarray = np.where(want == 0, 0.0, np.where(match.any(axis=1) & (first_of < tsec), 0.0, 1.0))
    return first_seen


def _distinct(ids: np.ndarray, first: np.ndarray, last: np.ndarray, tsec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How many of the users' remembered entities were seen within 1 h and within 24 h up to tsec."""
    tt = tsec[:, None]
    known = (ids != 0) & (first <= tt)
    return (
        (known & (last > tt - 3600.0)).sum(axis=1).astype(np.float64),
        (known & (last > tt - 86400.0)).sum(axis=1).astype(np.float64),
    )


def _evaluate(s: States, tx: Transactions, rows: np.ndarray) -> np.ndarray:
    """Features as of each row's event time, read-only (users may repeat); the state already
    holds the transaction itself."""
    u, t, amount = tx.user[rows], tx.t_ms[rows], tx.amount[rows]
    tsec = np.floor(t / 1000)
    head = s.head[u]
    recent = s.recent[u]
    recent_amount = s.recent_amount[u]
    c1m, since = _recent_stats(recent, t)
    w1h, w24 = _Window(S1H, N1H, head, t), _Window(S24, N24, head, t)
    later_1h, later_24 = w1h.later(recent), w24.later(recent)
    # An event older than a ring's reach still counts what the exact recent list knows of it.
    c1h = np.maximum(w1h.total(s.count_1h[u], later_1h, None), c1m)
    c24 = np.maximum(w24.total(s.count_24h[u], later_24, None), c1h)
    sum24 = w24.total(s.sum_24h[u], later_24, recent_amount).astype(np.float32)

    # Mean of the user's transactions before t: the running mean with the recent ones at or after
    # t taken back out, so a redelivery sees what the original saw.
    at_or_after = recent >= t[:, None]
    n = s.n[u]
    count = n - at_or_after.sum(axis=1)
    total = n * s.mean[u] - np.where(at_or_after, recent_amount, 0.0).sum(axis=1)
    mean = np.where(count > 0, total / np.maximum(count, 1), 0.0).astype(np.float32).astype(np.float64)
    to_mean = np.divide(amount, mean, out=np.ones(len(rows)), where=mean > 0)

    out = np.empty((len(rows), len(BEHAVIOUR_FEATURES)))
    card = tx.card[rows]
    match = (s.card[u] == card[:, None]) & (card > 0)[:, None]
    has_card = match.any(axis=1)
    if has_card.any():
        slot = match.argmax(axis=1)
        card_recent = s.card_recent[u, slot]
        cc1m = np.where(has_card, _recent_stats(card_recent, t)[0], 0.0)
        cc1h = np.maximum(w1h.total(s.card_count_1h[u, slot], w1h.later(card_recent), None), cc1m)
        cc24 = np.maximum(w24.total(s.card_count_24h[u, slot], w24.later(card_recent), None), cc1h)
        out[:, 13] = cc1m
        out[:, 14] = np.where(has_card, np.minimum(cc1h, _COUNT_CAP), 0.0)
        out[:, 15] = np.where(has_card, np.minimum(cc24, _COUNT_CAP), 0.0)
    else:
        out[:, 13:] = 0.0

    merchants, countries, devices = s.merchants, s.countries, s.devices
    merchant_ids, merchant_first = merchants.ids[u], merchants.first[u]
    country_ids, country_first = countries.ids[u], countries.first[u]
    out[:, 0] = c1m
    out[:, 1] = np.minimum(c1h, _COUNT_CAP)
    out[:, 2] = np.minimum(c24, _COUNT_CAP)
    out[:, 3] = sum24
    out[:, 4] = to_mean
    out[:, 5], out[:, 6] = _distinct(merchant_ids, merchant_first, merchants.last[u], tsec)
    out[:, 7], out[:, 8] = _distinct(country_ids, country_first, countries.last[u], tsec)
    out[:, 9] = np.where((since < 0) | (since > SECONDS_SINCE_PREV_CAP), SECONDS_SINCE_PREV_CAP, since)
    out[:, 10] = _first_time(devices.ids[u], devices.first[u], tx.device[rows], tsec)
    out[:, 11] = _first_time(country_ids, country_first, tx.country[rows], tsec)
    out[:, 12] = _first_time(merchant_ids, merchant_first, tx.merchant[rows], tsec)
    return out
