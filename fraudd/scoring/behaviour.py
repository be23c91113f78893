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

A round costs numpy calls whatever its width, and most rounds after a batch's first are a few rows
wide, so the arithmetic is laid out for few calls per round: a user's decoded state is one record
(``_WORK``), gathered and scattered with one index per round; the 1 h and 24 h rings sit side by
side, the card slots' counters beside the user's own, merchants, countries and devices beside each
other, so one call does a step for all of them; and what depends on an event alone (its second,
its slots) is computed once per batch.
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


# The decoded state as the arithmetic works on it: float64 (times absolute ms, -1 = none) but ids.
# Counter sets: the user's own, then one per card slot (a card's counters share the user's head).
# A card set's recent list holds KRC times, padded to KR with +inf: never the oldest (so never
# replaced), never in a minute, never in an evaluation's own slot.
# Ring columns: the 1 h ring's N1H slots, then the 24 h ring's N24.
# Entity kinds: merchants, countries, devices (id 0 = empty slot, first and last seen in Unix
# seconds), each padded to _KE slots with ones that never match, are never empty, never known and
# never the least recently seen (id -1, times +inf).
_SETS = 1 + KCARD
_KINDS = (("merchant", KM), ("country", KC), ("device", KD))
_KE = max(size for _name, size in _KINDS)
_WORK = np.dtype(
    [
        ("head", "<f8"),
        ("n", "<f8"),
        ("mean", "<f8"),
        ("recent", "<f8", (_SETS, KR)),
        ("recent_amount", "<f8", (KR,)),
        ("counts", "<f8", (_SETS, N1H + N24)),
        ("sum_24h", "<f8", (N24,)),
        ("card", "<i8", (KCARD,)),
        ("entity", "<i8", (len(_KINDS), _KE)),
        ("entity_first", "<f8", (len(_KINDS), _KE)),
        ("entity_last", "<f8", (len(_KINDS), _KE)),
    ]
)
# Per ring column: its slot length, its ring's size, its place in its ring.
_RING_SIZE = np.repeat([float(S1H), float(S24)], [N1H, N24])
_RING_N = np.repeat([N1H, N24], [N1H, N24])
_RING_POS = np.concatenate([np.arange(N1H), np.arange(N24)])
# Per window (1 h, 24 h): its slot length, its first ring column.
_WINDOW_SIZE = np.array([float(S1H), float(S24)])
_WINDOW_START = np.array([0, N1H])
_SLOT_POS = np.arange(max(KR, _KE, KCARD))
_ENTITY_PADDING = _SLOT_POS[:_KE] >= np.array([[size] for _name, size in _KINDS])
_DISTINCT_SPANS = np.array([3600.0, 86400.0])  # seconds: 1 h, 24 h
# A record as raw bytes: gathered and scattered with a copy of each (a structured copy goes field
# by field, several times slower).
_RECORD = np.dtype((np.void, _WORK.itemsize))


def _empty_state() -> bytes:
    rec = np.zeros(1, dtype=STATE)
    rec["head_ms"] = -1.0
    rec["recent_ago"] = _EMPTY
    rec["card_recent_ago"] = _EMPTY
    return rec.tobytes()


# What ``decode`` reads for a user without a stored state.
_EMPTY_STATE = _empty_state()


@dataclass(slots=True)
class States:
    """Decoded states of U users, one ``_WORK`` record each (kept as ``_RECORD``)."""

    records: np.ndarray

    def of(self, users: np.ndarray) -> np.ndarray:
        """A copy of the users' records."""
        records: np.ndarray = self.records[users].view(_WORK)
        return records

    def put(self, users: np.ndarray, w: np.ndarray) -> None:
        """Stores the users' records (each user at most once)."""
        self.records[users] = w.view(_RECORD)


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
    w = np.empty(len(rec), dtype=_WORK)
    head = rec["head_ms"].astype(np.float64)
    w["head"] = head
    w["n"] = rec["n"]
    w["mean"] = rec["mean"]
    recent, counts = w["recent"], w["counts"]
    recent[:, 0] = _times(head, rec["recent_ago"], 1)
    recent[:, 1:, :KRC] = _times(head, rec["card_recent_ago"], 2)
    recent[:, 1:, KRC:] = np.inf
    w["recent_amount"] = rec["recent_amount"]
    counts[:, 0, :N1H] = rec["count_1h"]
    counts[:, 0, N1H:] = rec["count_24h"]
    counts[:, 1:, :N1H] = rec["card_count_1h"]
    counts[:, 1:, N1H:] = rec["card_count_24h"]
    w["sum_24h"] = rec["sum_24h"]
    w["card"] = rec["card"]
    ids, first, last = w["entity"], w["entity_first"], w["entity_last"]
    for k, (name, size) in enumerate(_KINDS):
        ids[:, k, :size] = rec[name]
        first[:, k, :size] = rec[name + "_first"]
        last[:, k, :size] = rec[name + "_last"]
    ids[:, _ENTITY_PADDING] = -1
    first[:, _ENTITY_PADDING] = np.inf
    last[:, _ENTITY_PADDING] = np.inf
    return States(w.view(_RECORD))


def encode(s: States, rows: np.ndarray) -> bytes:
    """The given users' states, concatenated (fixed size each), with one ``tobytes``."""
    w = s.of(rows)
    rec = np.empty(len(rows), dtype=STATE)
    head = w["head"]
    recent, counts = w["recent"], w["counts"]
    rec["head_ms"] = head
    rec["n"] = w["n"]
    rec["mean"] = w["mean"]
    rec["recent_ago"] = _offsets(head, recent[:, 0], 1)
    rec["recent_amount"] = w["recent_amount"]
    rec["count_1h"] = counts[:, 0, :N1H]
    rec["count_24h"] = counts[:, 0, N1H:]
    rec["sum_24h"] = w["sum_24h"]
    for k, (name, size) in enumerate(_KINDS):
        rec[name] = w["entity"][:, k, :size]
        rec[name + "_first"] = w["entity_first"][:, k, :size]
        rec[name + "_last"] = w["entity_last"][:, k, :size]
    rec["card"] = w["card"]
    rec["card_recent_ago"] = _offsets(head, recent[:, 1:, :KRC], 2)
    rec["card_count_1h"] = counts[:, 1:, :N1H]
    rec["card_count_24h"] = counts[:, 1:, N1H:]
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
        # Each row's rank among its user's new rows: its place minus the place of the user's first.
        users, place = tx.user[order], np.arange(len(order))
        first = np.ones(len(order), dtype=bool)
        first[1:] = users[1:] != users[:-1]
        rank = place - np.maximum.accumulate(np.where(first, place, 0))
        by_rank = order[np.argsort(rank, kind="stable")]
        ends = np.cumsum(np.bincount(rank)).tolist()
        rows = _Rows.of(tx, by_rank)
        features = np.empty((len(by_rank), out.shape[1]))
        for start, end in zip([0, *ends[:-1]], ends):
            r = rows[start:end]
            records = s.of(r.user)
            _apply(records, r)
            s.put(r.user, records)
            _evaluate(records, r, features[start:end])
        out[by_rank] = features
    old = np.flatnonzero(~tx.new)
    if len(old):
        r = _Rows.of(tx, old)
        features = np.empty((len(old), out.shape[1]))
        _evaluate(s.of(r.user), r, features)
        out[old] = features
    return out


@dataclass(slots=True)
class _Rows:
    """Rows of a batch in the order the arithmetic takes them, with what depends on each event
    alone computed once for all of them rather than once per round."""

    user: np.ndarray
    t_ms: np.ndarray
    amount: np.ndarray
    entities: np.ndarray  # int64 (m, kinds): merchant, country, device
    card: np.ndarray
    tsec: np.ndarray  # the event's second
    slot: np.ndarray  # (m, ring columns) the event's absolute slot in each column's ring
    latest: np.ndarray  # (m, ring columns) the latest absolute slot at or before it each column holds
    own: np.ndarray  # (m, ring columns) the column the event counts in, of each ring
    window_slot: np.ndarray  # (m, windows) the event's absolute slot, per window

    @classmethod
    def of(cls, tx: Transactions, rows: np.ndarray) -> _Rows:
        t = tx.t_ms[rows]
        slot = np.floor(t[:, None] / _RING_SIZE)
        latest = slot - (slot.astype(np.int64) - _RING_POS) % _RING_N  # in integers: a float mod is slow
        return cls(
            user=tx.user[rows],
            t_ms=t,
            amount=tx.amount[rows],
            entities=np.array([tx.merchant[rows], tx.country[rows], tx.device[rows]]).T,
            card=tx.card[rows],
            tsec=np.floor(t / 1000),
            slot=slot,
            latest=latest,
            own=latest == slot,
            window_slot=slot[:, _WINDOW_START],
        )

    def __getitem__(self, part: slice) -> _Rows:
        return _Rows(
            self.user[part],
            self.t_ms[part],
            self.amount[part],
            self.entities[part],
            self.card[part],
            self.tsec[part],
            self.slot[part],
            self.latest[part],
            self.own[part],
            self.window_slot[part],
        )


def _times(head: np.ndarray, ago: np.ndarray, extra_dims: int) -> np.ndarray:
    h = head.reshape(head.shape + (1,) * extra_dims)
    return np.where(ago == _EMPTY, -1.0, h - ago)


def _offsets(head: np.ndarray, times: np.ndarray, extra_dims: int) -> np.ndarray:
    ago = head.reshape(head.shape + (1,) * extra_dims) - times
    return np.where(times < 0, _EMPTY, np.minimum(ago, _EMPTY - 1)).astype(np.uint32)


def _slot(ids: np.ndarray, last: np.ndarray, want: np.ndarray, now: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each wanted entity goes among ``ids`` (last axis): its own slot, else the first empty
    one, else the least recently seen, taken only by an observation newer than that one's last; an
    absent entity (0) goes nowhere. Returns the masks (of the shape of ``ids``) of that slot and of
    the entity's own.

    One ``argmin`` of a key picks the slot (own, then empty, then least recent), and the key itself
    at that slot says whether it may be taken: masks only, as reductions over a short last axis
    cost numpy a loop per row."""
    match = ids == want[..., None]
    key = np.where(match, -np.inf, np.where(ids == 0, np.finfo(np.float64).min, last))
    at: np.ndarray = (
        (_SLOT_POS[: ids.shape[-1]] == key.argmin(axis=-1)[..., None]) & (now[..., None] > key) & (want > 0)[..., None]
    )
    return at, match


def _remember(recent: np.ndarray, t: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Recent event times (last axis, unsorted): t replaces the oldest if it is newer, ``where``
    (the other axes). Returns the mask of the replaced times."""
    oldest = _SLOT_POS[: recent.shape[-1]] == recent.argmin(axis=-1)[..., None]
    put: np.ndarray = oldest & (t[..., None] > recent) & where[..., None]
    np.copyto(recent, t[..., None], where=put)
    return put


def _apply(w: np.ndarray, r: _Rows) -> None:
    """Adds each row's transaction to its user's record in ``w`` (each user at most once).

    A ring column is passed by a head moving from slot h to the event's slot s when some absolute
    slot in (h, s] maps to it, i.e. when the latest it holds up to s is after h: zeroed, so a gap of
    a whole ring or more clears everything (a long silence resets the window), and an event at or
    before the head (s <= h) clears nothing. An event older than a ring's reach from the head
    (s <= h - n; the new head max(h, s) reaches as far) is not counted in it: the exact recent list
    still knows it."""
    head = w["head"]
    h = np.floor(head[:, None] / _RING_SIZE)
    passed = r.latest > h
    counted = r.own & (r.slot > h - _RING_N)
    counts, sums = w["counts"], w["sum_24h"]
    np.copyto(counts, 0.0, where=passed[:, None])
    np.copyto(sums, 0.0, where=passed[:, N1H:])
    np.maximum(head, r.t_ms, out=head)
    sets = _take_card(w, r)
    np.copyto(counts, np.minimum(counts + 1.0, _COUNT_CAP), where=sets[:, :, None] & counted[:, None])
    np.copyto(sums, sums + r.amount[:, None], where=counted[:, N1H:])
    put = _remember(w["recent"], r.t_ms[:, None], sets)
    np.copyto(w["recent_amount"], r.amount[:, None], where=put[:, 0])
    n, mean = w["n"], w["mean"]
    n += 1.0
    mean += (r.amount - mean) / n
    _observe(w, r)


def _take_card(w: np.ndarray, r: _Rows) -> np.ndarray:
    """Puts each row's card in a slot (a card taking over a slot starts with an empty history);
    returns the counter sets (R, _SETS) the transaction counts in: the user's own and its card's."""
    card_recent = w["recent"][:, 1:, :KRC]
    at, match = _slot(w["card"], card_recent.max(axis=2), r.card, r.t_ms)
    fresh = (at & ~match)[:, :, None]
    np.copyto(card_recent, -1.0, where=fresh)
    np.copyto(w["counts"][:, 1:], 0.0, where=fresh)
    np.copyto(w["card"], r.card[:, None], where=at)
    return np.concatenate([np.ones((len(at), 1), dtype=bool), at], axis=1)


def _observe(w: np.ndarray, r: _Rows) -> None:
    """Remembers each row's merchant, country and device (all three kinds at once), at its second."""
    ids, first, last = w["entity"], w["entity_first"], w["entity_last"]
    at, match = _slot(ids, last, r.entities, r.tsec[:, None])
    t, seen = r.tsec[:, None, None], at & match
    np.copyto(first, np.where(seen, np.minimum(first, t), t), where=at)
    np.copyto(last, np.where(seen, np.maximum(last, t), t), where=at)
    np.copyto(ids, r.entities[..., None], where=at)


class _Window:
    """The ring columns inside the 1 h and 24 h windows ending at each event time t, read at the
    same (head, t) for every counter set: computed once, applied to each."""

    __slots__ = ("before_head", "inside", "rows")

    def __init__(self, head: np.ndarray, r: _Rows) -> None:
        # A column is inside when the latest absolute slot it holds up to the earlier of the event's
        # slot s and the head's h is within the window's reach from the later, max(s, h) - n.
        h = np.floor(head[:, None] / _RING_SIZE)
        latest = r.latest
        if (r.t_ms > head).any():  # s can be after h only then (evaluated where no state knew t)
            latest = np.minimum(latest, h - np.mod(h - _RING_POS, _RING_N))
        self.inside = latest > np.maximum(r.slot, h) - _RING_N
        self.rows = r
        # Only an evaluation before the head (out of order, redelivered) has later transactions;
        # such a t is in a slot at or before the head's, so its slot is the window's last.
        before = r.t_ms < head
        self.before_head = before if before.any() else None

    def later(self, recent: np.ndarray) -> np.ndarray | None:
        """Which of the recent transactions (R, sets, K) are later than t in t's own slot of each
        window (the only slot of t's window a later transaction can be in), (R, sets, K, windows);
        None when no evaluation is before its head."""
        if self.before_head is None:
            return None
        t = self.rows.t_ms[:, None, None]
        candidates = (self.before_head[:, None, None] & (recent > t))[..., None]
        later: np.ndarray = candidates & (np.floor(recent[..., None] / _WINDOW_SIZE) == self.rows.window_slot[:, None, None])
        return later

    def counts(self, counts: np.ndarray, later: np.ndarray | None) -> np.ndarray:
        """Each counter set's count (R, sets, windows), minus the ``later`` transactions."""
        total = np.add.reduceat(np.where(self.inside[:, None], counts, 0.0), _WINDOW_START, axis=2)
        if later is not None:
            total -= later.sum(axis=2)
        clipped: np.ndarray = np.maximum(total, 0.0)
        return clipped

    def amount(self, sums: np.ndarray, later: np.ndarray | None, amounts: np.ndarray) -> np.ndarray:
        """The 24 h amount, minus the ``later`` transactions' amounts of the user's own set."""
        total = np.where(self.inside[:, N1H:], sums, 0.0).sum(axis=1)
        if later is not None:
            total -= np.where(later[:, 0, :, 1], amounts, 0.0).sum(axis=1)
        clipped: np.ndarray = np.maximum(total, 0.0)
        return clipped


def _evaluate(w: np.ndarray, r: _Rows, out: np.ndarray) -> None:
    """Features as of each row's event time into ``out``, read-only; ``w``: the rows' users'
    records (users may repeat), which already hold the transactions themselves."""
    t = r.t_ms
    head, recent, amounts = w["head"], w["recent"], w["recent_amount"]
    own = recent[:, 0]
    tt, t3 = t[:, None], t[:, None, None]
    window = _Window(head, r)
    later = window.later(recent)
    # Per counter set: the 1-minute count (exact, capped at 255), then the windows' counts. An event
    # older than a ring's reach still counts what the exact recent list knows of it.
    c1m = np.minimum(((recent <= t3) & (recent > t3 - MINUTE_MS)).sum(axis=2), 255).astype(np.float64)
    c1h_24 = window.counts(w["counts"], later)
    c1h = np.maximum(c1h_24[:, :, 0], c1m)
    sets = np.empty(c1h.shape + (3,))  # per counter set: count_1m, count_1h, count_24h
    sets[:, :, 0] = c1m
    np.minimum(c1h, _COUNT_CAP, out=sets[:, :, 1])
    np.minimum(np.maximum(c1h_24[:, :, 1], c1h), _COUNT_CAP, out=sets[:, :, 2])
    out[:, 0:3] = sets[:, 0]
    # The card's set is the one whose slot holds the row's card; none (0) without one.
    card = (w["card"] == r.card[:, None]) & (r.card > 0)[:, None]
    out[:, 13:16] = np.where(card[:, :, None], sets[:, 1:], 0.0).sum(axis=1)
    out[:, 3] = window.amount(w["sum_24h"], later, amounts).astype(np.float32)

    # Mean of the user's transactions before t: the running mean with the recent ones at or after
    # t taken back out, so a redelivery sees what the original saw.
    at_or_after = own >= tt
    n = w["n"]
    count = n - at_or_after.sum(axis=1)
    total = n * w["mean"] - np.where(at_or_after, amounts, 0.0).sum(axis=1)
    mean = np.where(count > 0, total / np.maximum(count, 1), 0.0).astype(np.float32).astype(np.float64)
    out[:, 4] = np.divide(r.amount, mean, out=np.ones(len(t)), where=mean > 0)

    prev = np.where(own < tt, own, -1.0).max(axis=1)
    since = np.where(prev < 0, -1.0, (t - prev) / 1000)
    out[:, 9] = np.where((since < 0) | (since > SECONDS_SINCE_PREV_CAP), SECONDS_SINCE_PREV_CAP, since)
    out[:, 5:9] = _distinct(w, r.tsec)
    out[:, 10:13] = _first_time(w, r)[:, ::-1]


def _first_time(w: np.ndarray, r: _Rows) -> np.ndarray:
    """Per kind (R, kinds), 1 where no observation of the row's entity is earlier than its second
    (absent entity: 0). An entity is in at most one slot of its kind."""
    earlier = (w["entity"] == r.entities[..., None]) & (w["entity_first"] < r.tsec[:, None, None])
    first_seen: np.ndarray = ((r.entities != 0) & ~earlier.any(axis=2)).astype(np.float64)
    return first_seen


def _distinct(w: np.ndarray, tsec: np.ndarray) -> np.ndarray:
    """How many of the users' remembered merchants, then countries, were seen within 1 h and
    within 24 h up to tsec: (R, 4)."""
    tt = tsec[:, None, None]
    known = (w["entity"][:, :2] != 0) & (w["entity_first"][:, :2] <= tt)
    seen = w["entity_last"][:, :2, None] > (tt - _DISTINCT_SPANS[:, None])[:, None]
    distinct: np.ndarray = (known[:, :, None] & seen).sum(axis=3).reshape(len(tsec), 4).astype(np.float64)
    return distinct
