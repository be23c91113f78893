"""Seeded, labelled synthetic transactions for model training, tests and the benchmark.

The stream imitates a card network: many users, each with a home country, a handful of usual
merchants, a personal spending scale, a daily rhythm, a usual device and one or two cards. A small,
configurable share of the transactions is fraud of five typologies, each labelled. Every typology
is built so that it stands out only against the user's own history (new device, new merchant,
amount relative to the user's scale, burst relative to the user's pace, country relative to the
user's whereabouts, hour relative to the user's rhythm); judged alone, each fraudulent message
looks like plenty of legitimate ones, and legitimate traffic carries benign look-alikes (travel,
big purchases, new merchants, new phones, night owls, gamblers).

Everything is generated with numpy, a block of rows at a time; the only per-transaction Python work
is the final ``%``-formatting of the JSON payloads. The stream is cut into fixed-size blocks
internally, so it is the same however the caller slices it into ``generate`` calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import numpy as np
import orjson

from fraudd import decode

TYPOLOGIES: tuple[str, ...] = (
    "legit",
    "card_testing",
    "account_takeover",
    "velocity_burst",
    "impossible_travel",
    "high_risk_mcc_odd_hour",
)
LEGIT, CARD_TESTING, ACCOUNT_TAKEOVER, VELOCITY_BURST, IMPOSSIBLE_TRAVEL, HIGH_RISK_ODD_HOUR = range(6)

# code, currency, centre lat, centre lon, spread (degrees), UTC offset (h), share of users, IPv4 /8s
_COUNTRIES = (
    ("US", "USD", 39.5, -98.0, 5.0, -6, 30, (23, 24, 64, 71, 98, 107)),
    ("CA", "CAD", 45.5, -75.5, 2.0, -5, 4, (99, 142)),
    ("MX", "MXN", 19.4, -99.1, 1.5, -6, 3, (187, 201)),
    ("BR", "BRL", -23.5, -46.6, 2.0, -3, 4, (177, 189)),
    ("AR", "ARS", -34.6, -58.4, 1.5, -3, 1, (181, 190)),
    ("GB", "GBP", 52.5, -1.5, 1.0, 0, 7, (31, 81, 86)),
    ("IE", "EUR", 53.3, -7.5, 0.6, 0, 1, (89, 109)),
    ("FR", "EUR", 46.6, 2.4, 1.8, 1, 6, (78, 90)),
    ("DE", "EUR", 51.0, 10.4, 1.5, 1, 7, (46, 84, 91)),
    ("ES", "EUR", 40.4, -3.7, 1.5, 1, 4, (79, 88)),
    ("IT", "EUR", 42.8, 12.5, 1.2, 1, 4, (79, 93)),
    ("NL", "EUR", 52.2, 5.3, 0.4, 1, 2, (77, 145)),
    ("PL", "PLN", 52.1, 19.4, 1.2, 1, 2, (83, 178)),
    ("SE", "SEK", 59.3, 16.0, 1.2, 1, 1, (78, 194)),
    ("TR", "TRY", 39.9, 32.9, 1.5, 3, 2, (85, 176)),
    ("AE", "AED", 25.2, 55.3, 0.3, 4, 1, (94, 185)),
    ("NG", "NGN", 6.5, 3.4, 0.8, 1, 1, (102, 197)),
    ("ZA", "ZAR", -26.2, 28.0, 1.2, 2, 1, (41, 105)),
    ("IN", "INR", 21.0, 78.0, 3.0, 5, 5, (49, 117)),
    ("SG", "SGD", 1.35, 103.82, 0.05, 8, 1, (116, 203)),
    ("JP", "JPY", 35.7, 139.7, 1.2, 9, 4, (60, 126, 133)),
    ("KR", "KRW", 37.5, 127.0, 0.6, 9, 2, (112, 211)),
    ("AU", "AUD", -33.9, 151.2, 1.2, 10, 3, (1, 101, 203)),
    ("NZ", "NZD", -41.3, 174.8, 0.6, 12, 1, (122, 125)),
)

# mcc, name suffix, amount factor vs the user's scale, share online, popularity, role
# Roles: "small" = small-ticket online shops that card testers probe; "resale" = goods that
# account takeovers cash out on; "risky" = high-risk categories (gambling, quasi-cash, direct
# marketing) that some legitimate users use too.
_CATEGORIES = (
    ("5411", "Market", 1.2, 0.05, 18.0, ""),
    ("5812", "Kitchen", 1.0, 0.0, 10.0, ""),
    ("5814", "Cafe", 0.3, 0.05, 10.0, ""),
    ("5541", "Fuel", 1.3, 0.0, 6.0, ""),
    ("5912", "Pharmacy", 0.7, 0.1, 4.0, ""),
    ("5311", "Department Store", 1.8, 0.4, 4.0, "resale"),
    ("5651", "Outfitters", 1.8, 0.5, 4.0, ""),
    ("5732", "Electronics", 3.0, 0.5, 3.0, "resale"),
    ("5944", "Jewelers", 4.0, 0.3, 0.8, "resale"),
    ("4121", "Rides", 0.6, 1.0, 4.0, ""),
    ("4111", "Transit", 0.15, 0.3, 3.0, ""),
    ("5815", "Music", 0.12, 1.0, 3.0, "small"),
    ("5816", "Games", 0.15, 1.0, 2.0, "small"),
    ("5818", "Apps", 0.08, 1.0, 3.0, "small"),
    ("5942", "Books", 0.5, 0.5, 2.0, ""),
    ("5999", "Goods", 0.7, 0.6, 4.0, ""),
    ("4900", "Utilities", 2.5, 1.0, 2.0, ""),
    ("7011", "Hotel", 5.0, 0.6, 1.0, ""),
    ("4511", "Airways", 8.0, 1.0, 0.5, "resale"),
    ("6011", "ATM", 2.0, 0.0, 3.0, ""),
    ("7995", "Casino", 1.0, 1.0, 0.4, "risky"),
    ("6051", "Crypto", 2.0, 1.0, 0.4, "risky"),
    ("5967", "Direct", 0.6, 1.0, 0.3, "risky"),
)

_NAME_WORDS_A = (
    "Blue", "Red", "Green", "Silver", "Golden", "North", "South", "East", "West", "Royal", "Urban",
    "Happy", "Sunny", "Bright", "Rapid", "Prime", "Smart", "Grand", "Little", "Big", "Old", "New",
    "Lucky", "Quiet", "Wild", "Coastal", "Metro", "Pacific", "Alpine", "Star", "Maple", "Cedar",
    "Iron", "Crystal", "Velvet", "Copper", "Amber", "Harbor", "Summit", "Nova",
)
_NAME_WORDS_B = (
    "Fox", "Oak", "River", "Stone", "Bridge", "Lane", "Hill", "Field", "Bay", "Peak", "Garden",
    "Square", "Point", "Valley", "Works", "House", "Corner", "Market", "Forge", "Harvest", "Wave",
    "Lantern", "Anchor", "Arrow", "Beacon", "Canyon", "Meadow", "Orchard", "Pine", "Port",
    "Ridge", "Spring", "Tower", "Trail", "Union", "Vista", "Willow", "Yard", "Zenith", "Crown",
)

_CHANNELS = np.array(["pos", "ecom", "atm"], dtype=object)
_ATM_MCC = "6011"
_N_FAVOURITES = 8
_BLOCK = 8192  # rows drawn per internal step; fixed so slicing never changes the stream
_DAY = 86_400.0
_B36 = np.frombuffer(b"0123456789abcdefghijklmnopqrstuvwxyz", dtype=np.uint8).astype(np.uint32)
_ID_DIGITS = 8  # 36**8 ~ 2.8e12 transactions per seed
_EARTH_KM = 6371.0
_FAR_KM = 3000.0  # impossible-travel destinations are at least this far from the user

_PAYLOAD = (
    '{"transaction_id":"%s","user_id":"%s","amount":%r,"merchant":"%s","timestamp":%r,'
    '"card_id":"%s","currency":"%s","mcc":"%s","country":"%s","device_id":"%s","ip":"%s",'
    '"channel":"%s","lat":%r,"lon":%r}'
)


@dataclass(frozen=True)
class GeneratorConfig:
    """What the stream looks like. The same config always yields the same stream."""

    seed: int = 0
    n_users: int = 20_000
    n_merchants: int = 3_000
    # Share of transactions labelled fraud, split over the typologies by ``typology_mix``
    # (shares of fraud transactions, not of fraud events).
    fraud_rate: float = 0.01
    typology_mix: Mapping[str, float] = field(
        default_factory=lambda: {name: 1.0 for name in TYPOLOGIES[1:]}
    )
    start_ts: float = 1_764_374_400.0  # 2025-11-29T00:00:00Z
    # Event-time arrival rate. With 20,000 users, 1 tx/s is ~4.3 transactions per user per day,
    # so per-user windows of minutes to days hold realistic counts.
    tx_per_second: float = 1.0
    # Benign noise: the look-alikes that keep single-message scoring from being enough.
    trips_per_user_day: float = 0.01  # legit travel abroad, 2-10 days each
    new_device_per_user_day: float = 0.003  # new phone: a legit "new device"
    new_merchant_share: float = 0.06  # legit purchases at a merchant outside the usual ones
    big_purchase_share: float = 0.005  # legit purchases 3-8x the user's usual amount
    risky_user_share: float = 0.06  # users who legitimately gamble / buy crypto

    def __post_init__(self) -> None:
        unknown = set(self.typology_mix) - set(TYPOLOGIES[1:])
        if unknown:
            raise ValueError(f"unknown typologies {sorted(unknown)}; known: {TYPOLOGIES[1:]}")
        if not 0.0 <= self.fraud_rate < 0.5:
            raise ValueError("fraud_rate must be in [0, 0.5)")
        if self.seed < 0 or self.n_users < 10 or self.n_merchants < 4 * len(_CATEGORIES):
            raise ValueError("need seed >= 0, n_users >= 10, n_merchants >= 4 per category")
        if self.tx_per_second <= 0:
            raise ValueError("tx_per_second must be > 0")


@dataclass(frozen=True)
class FaultyPayloads:
    """A batch's payloads mixed with duplicates and invalid entries, each labelled.

    ``payloads[i]`` is None for an entry that should be written without a ``data`` field.
    ``row[i]`` is the batch row the entry carries (-1 for invalid ones); ``reason[i]`` the DLQ
    reason ``fraudd.decode`` gives it (None for valid entries, duplicates included).
    """

    payloads: list[bytes | None]
    row: np.ndarray  # int64
    is_duplicate: np.ndarray  # bool
    reason: list[str | None]


@dataclass(frozen=True)
class GeneratedBatch:
    """Transactions in event-time order as columns (row i of every column is one transaction).

    Text columns are object arrays of ``str``; ``typology`` holds codes into ``TYPOLOGIES``.
    """

    transaction_id: np.ndarray
    user_id: np.ndarray
    amount: np.ndarray  # float64, 2 decimals
    merchant: np.ndarray
    timestamp: np.ndarray  # float64 Unix seconds, millisecond precision
    card_id: np.ndarray
    currency: np.ndarray
    mcc: np.ndarray
    country: np.ndarray
    device_id: np.ndarray
    ip: np.ndarray
    channel: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    typology: np.ndarray  # int8 codes into TYPOLOGIES

    typology_names = TYPOLOGIES

    def __len__(self) -> int:
        return len(self.transaction_id)

    @property
    def is_fraud(self) -> np.ndarray:
        return self.typology != LEGIT

    @property
    def transaction_ids(self) -> list[str]:
        return self.transaction_id.tolist()

    def payloads(self) -> list[bytes]:
        """The ``data`` field of each transaction, as the origin producer writes it."""
        columns = (
            self.transaction_id.tolist(), self.user_id.tolist(), self.amount.tolist(),
            self.merchant.tolist(), self.timestamp.tolist(), self.card_id.tolist(),
            self.currency.tolist(), self.mcc.tolist(), self.country.tolist(),
            self.device_id.tolist(), self.ip.tolist(), self.channel.tolist(),
            self.lat.tolist(), self.lon.tolist(),
        )
        return [text.encode() for text in map(_PAYLOAD.__mod__, zip(*columns))]

    def with_faults(self, duplicate_rate: float, invalid_rate: float, rng: np.random.Generator) -> FaultyPayloads:
        """Every payload once, plus ``duplicate_rate * len`` exact re-sends (same bytes, at a later
        position, mostly soon after like a producer retry) and ``invalid_rate * len`` invalid
        entries at random positions, cycling through every kind the DLQ must handle.
        """
        n = len(self)
        payloads = self.payloads()
        n_dup = int(round(duplicate_rate * n))
        n_bad = int(round(invalid_rate * n))
        dup_rows = rng.integers(0, max(n, 1), n_dup)
        keys = np.concatenate([
            np.arange(n, dtype=np.float64),
            dup_rows + 0.5 + rng.exponential(20.0, n_dup),
            rng.uniform(0.0, n, n_bad),
        ])
        kinds = rng.permutation(np.arange(n_bad) % len(_INVALID_KINDS))
        templates = rng.integers(0, max(n, 1), n_bad)
        bad: list[bytes | None] = []
        bad_reason: list[str] = []
        for k, (kind, row) in enumerate(zip(kinds.tolist(), templates.tolist())):
            obj = orjson.loads(payloads[row])
            obj["transaction_id"] = f"bad{k}_{obj['transaction_id']}"
            reason, make = _INVALID_KINDS[kind]
            bad.append(make(obj))
            bad_reason.append(reason)
        order = np.argsort(keys, kind="stable")
        all_payloads = payloads + [payloads[i] for i in dup_rows.tolist()] + bad
        all_rows = np.concatenate([np.arange(n), dup_rows, np.full(n_bad, -1)]).astype(np.int64)
        all_dup = np.concatenate([np.zeros(n, bool), np.ones(n_dup, bool), np.zeros(n_bad, bool)])
        all_reason: list[str | None] = [None] * (n + n_dup) + bad_reason
        idx = order.tolist()
        return FaultyPayloads(
            payloads=[all_payloads[i] for i in idx],
            row=all_rows[order],
            is_duplicate=all_dup[order],
            reason=[all_reason[i] for i in idx],
        )

    @classmethod
    def concat(cls, batches: list[GeneratedBatch]) -> GeneratedBatch:
        return cls(**{f.name: np.concatenate([getattr(b, f.name) for b in batches]) for f in fields(cls)})

    def slice(self, start: int, stop: int) -> GeneratedBatch:
        return GeneratedBatch(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})


def _with(obj: dict, **changes) -> dict:
    return {**obj, **changes}


def _without(name: str):
    return lambda obj: orjson.dumps({k: v for k, v in obj.items() if k != name})


def _dumps_replacing(obj: dict, name: str, raw: bytes) -> bytes:
    """Dump with one value swapped for raw bytes orjson refuses to produce (NaN, bad UTF-8)."""
    return orjson.dumps(_with(obj, **{name: "\x00SWAP\x00"})).replace(b'"\\u0000SWAP\\u0000"', raw)


# (expected DLQ reason, payload maker). The transaction ids of invalid entries are prefixed so
# they can never collide with a valid transaction's id.
_INVALID_KINDS = (
    (decode.REASON_NOT_JSON, lambda obj: orjson.dumps(obj)[:-9]),
    (decode.REASON_NOT_JSON, lambda obj: b"definitely not json"),
    (decode.REASON_NOT_JSON, lambda obj: b""),
    (decode.REASON_NOT_JSON, lambda obj: _dumps_replacing(obj, "amount", b"NaN")),
    (decode.REASON_NOT_OBJECT, lambda obj: orjson.dumps([obj])),
    (decode.REASON_NOT_OBJECT, lambda obj: orjson.dumps(obj["transaction_id"])),
    (decode.REASON_MISSING, _without("transaction_id")),
    (decode.REASON_MISSING, _without("user_id")),
    (decode.REASON_MISSING, _without("amount")),
    (decode.REASON_MISSING, _without("merchant")),
    (decode.REASON_MISSING, _without("timestamp")),
    (decode.REASON_MISSING, lambda obj: orjson.dumps(_with(obj, user_id=None))),
    (decode.REASON_INVALID, lambda obj: orjson.dumps(_with(obj, amount="NaN"))),
    (decode.REASON_INVALID, lambda obj: orjson.dumps(_with(obj, amount=-obj["amount"]))),
    (decode.REASON_INVALID, lambda obj: orjson.dumps(_with(obj, amount=0))),
    (decode.REASON_INVALID, lambda obj: orjson.dumps(_with(obj, amount=str(obj["amount"])))),
    (decode.REASON_INVALID, lambda obj: orjson.dumps(_with(obj, amount=True))),
    (decode.REASON_INVALID, lambda obj: orjson.dumps(_with(obj, transaction_id="t" * 65))),
    (decode.REASON_INVALID, lambda obj: orjson.dumps(_with(obj, user_id=12345))),
    (decode.REASON_INVALID, lambda obj: orjson.dumps(_with(obj, merchant=""))),
    (decode.REASON_INVALID, lambda obj: orjson.dumps(_with(obj, timestamp="yesterday"))),
    (decode.REASON_INVALID, lambda obj: orjson.dumps(_with(obj, timestamp=obj["timestamp"] * 1000))),
    (decode.REASON_INVALID, lambda obj: orjson.dumps(_with(obj, timestamp="2025-11-29T10:00:00"))),
    (decode.REASON_NOT_UTF8, lambda obj: _dumps_replacing(obj, "merchant", b'"Caf\xe9 \xff"')),
    (decode.REASON_TOO_LARGE, lambda obj: orjson.dumps(_with(obj, note="x" * decode.MAX_PAYLOAD_BYTES))),
    (decode.REASON_NO_DATA, lambda obj: None),
)


@dataclass(slots=True)
class _Rows:
    """Transactions mid-generation, before text columns are materialised."""

    ts: np.ndarray
    user: np.ndarray
    merchant: np.ndarray
    amount: np.ndarray
    country: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    card: np.ndarray
    device: np.ndarray
    ip: np.ndarray
    typology: np.ndarray

    def take(self, index: np.ndarray) -> _Rows:
        return _Rows(*(getattr(self, f.name)[index] for f in fields(self)))

    @staticmethod
    def concat(parts: list[_Rows]) -> _Rows:
        return _Rows(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(_Rows)))


class TransactionGenerator:
    """An endless, deterministic transaction stream; ``generate(n)`` returns the next ``n``."""

    def __init__(self, config: GeneratorConfig | None = None) -> None:
        self.config = config = config or GeneratorConfig()
        self._rng = np.random.default_rng(config.seed)
        self._id_prefix = f"txn_{_base36(config.seed)}_"
        self._setup_world()
        self._setup_users()
        self._now = float(config.start_ts)
        self._sequence = 0
        self._pending: _Rows | None = None  # fraud rows scheduled beyond the current block
        self._ready: list[GeneratedBatch] = []
        self._ready_rows = 0
        mix = np.array([config.typology_mix.get(name, 0.0) for name in TYPOLOGIES[1:]], dtype=np.float64)
        odds = config.fraud_rate / (1.0 - config.fraud_rate)
        self._fraud_rows_per_row = odds * mix / mix.sum() if mix.sum() > 0 else np.zeros(5)

    # ---- public -------------------------------------------------------------------------------

    def generate(self, n: int) -> GeneratedBatch:
        """The next ``n`` transactions of the stream."""
        while self._ready_rows < n:
            block = self._block()
            self._ready.append(block)
            self._ready_rows += len(block)
        merged = GeneratedBatch.concat(self._ready) if len(self._ready) != 1 else self._ready[0]
        out, rest = merged.slice(0, n), merged.slice(n, len(merged))
        self._ready, self._ready_rows = [rest], len(rest)
        return out

    # ---- static world -------------------------------------------------------------------------

    def _setup_world(self) -> None:
        rng, cfg = self._rng, self.config
        countries = list(zip(*_COUNTRIES))
        self._country_code = np.array(countries[0], dtype=object)
        self._country_currency = np.array(countries[1], dtype=object)
        self._country_lat = np.array(countries[2], dtype=np.float64)
        self._country_lon = np.array(countries[3], dtype=np.float64)
        self._country_spread = np.array(countries[4], dtype=np.float64)
        self._country_offset = np.array(countries[5], dtype=np.int64)
        self._country_p = np.array(countries[6], dtype=np.float64) / sum(countries[6])
        self._country_octets = countries[7]
        self._country_far = _distance_km(
            self._country_lat[:, None], self._country_lon[:, None], self._country_lat[None], self._country_lon[None]
        ) >= _FAR_KM

        cats = list(zip(*_CATEGORIES))
        popularity = np.array(cats[4]) / sum(cats[4])
        per_cat = np.maximum(4, np.floor(popularity * cfg.n_merchants)).astype(np.int64)
        per_cat[0] += max(0, cfg.n_merchants - per_cat.sum())  # the remainder are supermarkets
        cat = np.repeat(np.arange(len(_CATEGORIES)), per_cat)
        n = len(cat)
        names = rng.choice(len(_NAME_WORDS_A) * len(_NAME_WORDS_B) * len(_CATEGORIES), n, replace=False)
        # Distinct names per category: the (adjective, noun) pair is unique within each suffix.
        pair = names % (len(_NAME_WORDS_A) * len(_NAME_WORDS_B))
        online = rng.random(n) < np.array(cats[3])[cat]
        mcc = np.array(cats[0], dtype=object)[cat]
        self._merchant_name = np.array(
            [f"{_NAME_WORDS_A[p // len(_NAME_WORDS_B)]} {_NAME_WORDS_B[p % len(_NAME_WORDS_B)]} {cats[1][c]}"
             for p, c in zip(pair.tolist(), cat.tolist())],
            dtype=object,
        )
        self._merchant_mcc = mcc
        self._merchant_channel = np.where(mcc == _ATM_MCC, _CHANNELS[2], np.where(online, _CHANNELS[1], _CHANNELS[0]))
        self._merchant_factor = np.array(cats[2])[cat]
        role = np.array(cats[5], dtype=object)[cat]
        self._merchant_p = popularity[cat] / per_cat[cat]
        self._merchant_p /= self._merchant_p.sum()
        # New-to-the-user merchants that fraud uses; non-risky pools are online-only.
        self._small_pool = np.flatnonzero((role == "small") & online)
        self._resale_pool = np.flatnonzero((role == "resale") & online)
        self._risky_pool = np.flatnonzero(role == "risky")
        self._plain_pool = np.flatnonzero(role != "risky")
        plain_p = self._merchant_p[self._plain_pool]
        self._plain_p = plain_p / plain_p.sum()

        # Daily rhythm: P(user's peak-hour group | UTC hour). Legit users are mostly active near
        # their peak; "odd" hours are 7+ hours away from it.
        delta = np.abs(np.arange(24)[:, None] - np.arange(24)[None])
        delta = np.minimum(delta, 24 - delta)
        self._hour_kernel = np.exp(-(delta**2) / (2 * 3.0**2)) + 0.02
        self._odd_hour = delta >= 7

    def _setup_users(self) -> None:
        rng, cfg = self._rng, self.config
        n = cfg.n_users
        self._user_id = np.array([f"user_{_base36(i)}" for i in range(n)], dtype=object)
        home = rng.choice(len(_COUNTRIES), n, p=self._country_p)
        self._home = home
        self._home_lat, self._home_lon = self._spot(home)
        self._home_ip = self._ips(home)
        self._currency = self._country_currency[home]
        self._mu = rng.normal(np.log(30.0), 0.6, n)  # log of the user's usual amount
        self._sigma = rng.uniform(0.35, 0.8, n)
        activity = rng.lognormal(0.0, 0.5, n)
        risky = rng.random(n) < cfg.risky_user_share
        night_owl = rng.random(n) < np.where(risky, 0.4, 0.2)
        peak_local = np.where(night_owl, rng.normal(23.0, 2.0, n), rng.normal(15.0, 2.5, n))
        peak = np.rint(peak_local - self._country_offset[home]).astype(np.int64) % 24
        self._peak = peak

        n_cards = 1 + (rng.random(n) < 0.3)
        cards = rng.integers(0, 2**48, (n, 2))
        self._cards = np.array([[f"card_{c:012x}" for c in pair] for pair in cards.tolist()], dtype=object)
        self._n_cards = n_cards
        self._device = np.array([_device_id(v) for v in rng.integers(0, 2**63, n).tolist()], dtype=object)

        fav = rng.choice(self._plain_pool, (n, _N_FAVOURITES), p=self._plain_p)
        slot = rng.integers(1, 5, n)
        fav[risky, slot[risky]] = rng.choice(self._risky_pool, int(risky.sum()))
        self._favourites = fav
        rank_p = 1.0 / np.arange(1, _N_FAVOURITES + 1) ** 1.1
        self._rank_cdf = np.cumsum(rank_p / rank_p.sum())

        # Users sorted by peak-hour group, with cumulative activity, for hour-aware sampling.
        order = np.argsort(peak, kind="stable")
        self._by_peak = order
        self._activity_cdf = np.cumsum(activity[order])
        bounds = np.searchsorted(peak[order], np.arange(25))
        cdf0 = np.concatenate([[0.0], self._activity_cdf])
        self._group_lo, self._group_hi = cdf0[bounds[:-1]], cdf0[bounds[1:]]
        group_activity = self._group_hi - self._group_lo
        self._hour_group_cdf = _row_cdf(self._hour_kernel * group_activity[None])
        self._odd_group_cdf = _row_cdf(self._odd_hour * group_activity[None])

        # Travel: where each user is between trip start and end.
        self._trip_start = np.full(n, np.inf)
        self._trip_end = np.full(n, -np.inf)
        self._trip_country = home.copy()
        self._trip_lat, self._trip_lon = self._home_lat.copy(), self._home_lon.copy()
        self._trip_ip = self._home_ip.copy()

    # ---- one block ----------------------------------------------------------------------------

    def _block(self) -> GeneratedBatch:
        rng, cfg = self._rng, self.config
        t0 = self._now
        ts = t0 + np.cumsum(rng.exponential(1.0 / cfg.tx_per_second, _BLOCK))
        t1 = float(ts[-1])
        self._life_events(t0, t1)
        parts = [self._legit(ts, self._pick_users(ts, self._hour_group_cdf))]
        parts += self._fraud(t0, t1)
        if self._pending is not None:
            parts.append(self._pending)
        rows = _Rows.concat(parts)
        due = rows.ts <= t1
        self._pending = rows.take(np.flatnonzero(~due))
        rows = rows.take(np.flatnonzero(due))
        rows = rows.take(np.argsort(rows.ts, kind="stable"))
        self._now = t1
        return self._materialise(rows)

    def _life_events(self, t0: float, t1: float) -> None:
        """Start legit trips and replace phones for some users (benign novelty)."""
        rng, cfg = self._rng, self.config
        days = (t1 - t0) / _DAY
        travellers = rng.integers(0, cfg.n_users, rng.poisson(cfg.n_users * cfg.trips_per_user_day * days))
        dest = rng.choice(len(_COUNTRIES), len(travellers), p=self._country_p)
        home = self._home[travellers]
        dest = np.where(dest == home, (home + 1 + rng.integers(0, len(_COUNTRIES) - 1, len(dest))) % len(_COUNTRIES), dest)
        start = rng.uniform(t0, t1, len(travellers))
        self._trip_start[travellers] = start
        self._trip_end[travellers] = start + rng.uniform(2, 10, len(travellers)) * _DAY
        self._trip_country[travellers] = dest
        self._trip_lat[travellers], self._trip_lon[travellers] = self._spot(dest)
        self._trip_ip[travellers] = self._ips(dest)
        upgraded = rng.integers(0, cfg.n_users, rng.poisson(cfg.n_users * cfg.new_device_per_user_day * days))
        self._device[upgraded] = self._new_devices(len(upgraded))

    def _legit(self, ts: np.ndarray, users: np.ndarray) -> _Rows:
        rng, cfg = self._rng, self.config
        n = len(users)
        rank = np.searchsorted(self._rank_cdf, rng.random(n))
        merchant = self._favourites[users, np.minimum(rank, _N_FAVOURITES - 1)]
        new = rng.random(n) < cfg.new_merchant_share
        merchant[new] = rng.choice(len(self._merchant_p), int(new.sum()), p=self._merchant_p)
        big = rng.random(n) < cfg.big_purchase_share
        amount = self._usual_amount(users, merchant) * np.where(big, rng.uniform(3.0, 8.0, n), 1.0)
        card = self._cards[users, ((rng.random(n) < 0.3) & (self._n_cards[users] == 2)).astype(np.int64)]
        country, lat, lon, ip = self._whereabouts(users, ts)
        return self._rows(ts, users, merchant, amount, country, lat, lon, card, self._device[users], ip, LEGIT)

    def _fraud(self, t0: float, t1: float) -> list[_Rows]:
        """Fraud events starting in [t0, t1); rows may spill past t1 and wait in ``_pending``."""
        rng = self._rng
        expected_rows = self._fraud_rows_per_row * _BLOCK
        makers = (self._card_testing, self._account_takeover, self._velocity_burst,
                  self._impossible_travel, self._high_risk_odd_hour)
        parts = []
        for maker, rows, mean_rows in zip(makers, expected_rows, (6.5, 2.0, 10.0, 1.5, 1.5)):
            n_events = rng.poisson(rows / mean_rows)
            if n_events:
                parts.append(maker(np.sort(rng.uniform(t0, t1, n_events))))
        return parts

    def _card_testing(self, start: np.ndarray) -> _Rows:
        """4-9 tiny charges on one card at shops new to the user within ~30-150 s, from a
        fraudster's device. Tiny online charges are common; the burst of new merchants on one card
        is what only the card's history reveals."""
        rng = self._rng
        users = self._pick_users(start, self._hour_group_cdf)
        size = rng.integers(4, 10, len(users))
        event, ts = self._spread(start, size, 30.0, 150.0)
        u = users[event]
        merchant = self._fresh_merchants(u, self._small_pool)
        amount = rng.uniform(0.5, 3.0, len(u))
        card = self._cards[users, rng.integers(0, self._n_cards[users])][event]
        device = self._new_devices(len(users))[event]
        ip = self._ips(rng.choice(len(_COUNTRIES), len(users), p=self._country_p))[event]
        country, lat, lon, _ = self._whereabouts(u, ts)
        return self._rows(ts, u, merchant, amount, country, lat, lon, card, device, ip, CARD_TESTING)

    def _account_takeover(self, start: np.ndarray) -> _Rows:
        """1-3 purchases of resellable goods 5-12x the user's usual amount (globally ordinary),
        from a new device in a country that is not the user's home."""
        rng = self._rng
        users = self._pick_users(start, self._hour_group_cdf)
        size = rng.integers(1, 4, len(users))
        event, ts = self._spread(start, size, 120.0, 1200.0)
        u = users[event]
        merchant = self._fresh_merchants(u, self._resale_pool)
        amount = np.exp(self._mu[u]) * rng.uniform(5.0, 12.0, len(u))
        home = self._home[users]
        place = rng.choice(len(_COUNTRIES), len(users), p=self._country_p)
        place = np.where(place == home, (home + 1 + rng.integers(0, len(_COUNTRIES) - 1, len(users))) % len(_COUNTRIES), place)
        lat, lon = self._spot(place)
        card = self._cards[u, 0]
        device = self._new_devices(len(users))[event]
        ip = self._ips(place)[event]
        return self._rows(ts, u, merchant, amount, place[event], lat[event], lon[event], card, device, ip,
                          ACCOUNT_TAKEOVER)

    def _velocity_burst(self, start: np.ndarray) -> _Rows:
        """6-14 ordinary-looking purchases by one user within 2-10 minutes, on the usual device:
        only the user's usual pace makes the count stand out."""
        rng = self._rng
        users = self._pick_users(start, self._hour_group_cdf)
        size = rng.integers(6, 15, len(users))
        event, ts = self._spread(start, size, 120.0, 600.0)
        u = users[event]
        merchant = np.where(rng.random(len(u)) < 0.5, self._favourites[u, rng.integers(0, _N_FAVOURITES, len(u))],
                            rng.choice(self._plain_pool, len(u), p=self._plain_p))
        amount = self._usual_amount(u, merchant) * rng.uniform(1.0, 2.0, len(u))
        country, lat, lon, ip = self._whereabouts(u, ts)
        card = self._cards[u, 0]
        return self._rows(ts, u, merchant, amount, country, lat, lon, card, self._device[u], ip, VELOCITY_BURST)

    def _impossible_travel(self, start: np.ndarray) -> _Rows:
        """A genuine purchase where the user is, then 1-2 card-present purchases 5-90 minutes later
        in a country >= 3000 km away. Foreign purchases are common (trips); the time and distance
        since the user's previous transaction are what give it away."""
        rng = self._rng
        users = self._pick_users(start, self._hour_group_cdf)
        genuine = self._legit(start, users)
        size = rng.integers(1, 3, len(users))
        event, ts = self._spread(start + rng.uniform(300.0, 5400.0, len(users)), size, 60.0, 900.0)
        u = users[event]
        keys = rng.random((len(users), len(_COUNTRIES))) * self._country_far[genuine.country]
        place = np.argmax(keys, axis=1)
        lat, lon = self._spot(place)
        pos = self._merchant_channel[self._plain_pool] == _CHANNELS[0]
        merchant = rng.choice(self._plain_pool[pos], len(u))
        amount = self._usual_amount(u, merchant) * rng.uniform(1.0, 3.0, len(u))
        card = genuine.card[event]
        device = self._new_devices(len(users))[event]
        fraud = self._rows(ts, u, merchant, amount, place[event], lat[event], lon[event], card, device,
                           self._ips(place)[event], IMPOSSIBLE_TRAVEL)
        return _Rows.concat([genuine, fraud])

    def _high_risk_odd_hour(self, start: np.ndarray) -> _Rows:
        """1-2 charges at a gambling / crypto / direct-marketing merchant new to the user, at an
        hour 7+ hours from the user's daily peak. Some users gamble legitimately, and night owls
        exist; the user's own merchants and rhythm are what make it odd."""
        rng = self._rng
        users = self._pick_users(start, self._odd_group_cdf)
        size = rng.integers(1, 3, len(users))
        event, ts = self._spread(start, size, 60.0, 900.0)
        u = users[event]
        merchant = self._fresh_merchants(u, self._risky_pool)
        amount = self._usual_amount(u, merchant) * rng.uniform(1.0, 4.0, len(u))
        country, lat, lon, ip = self._whereabouts(u, ts)
        card = self._cards[u, 0]
        return self._rows(ts, u, merchant, amount, country, lat, lon, card, self._device[u], ip,
                          HIGH_RISK_ODD_HOUR)

    # ---- helpers ------------------------------------------------------------------------------

    def _pick_users(self, ts: np.ndarray, group_cdf: np.ndarray) -> np.ndarray:
        """Users by activity, given the UTC hour: first the peak-hour group, then a user in it."""
        rng = self._rng
        hour = ((ts % _DAY) // 3600).astype(np.int64)
        group = (group_cdf[hour] < rng.random(len(ts))[:, None]).sum(axis=1)
        group = np.minimum(group, 23)
        lo, hi = self._group_lo[group], self._group_hi[group]
        at = np.searchsorted(self._activity_cdf, lo + rng.random(len(ts)) * (hi - lo), side="right")
        return self._by_peak[np.minimum(at, len(self._by_peak) - 1)]

    def _spread(self, start: np.ndarray, size: np.ndarray, low: float, high: float):
        """Event index and timestamp of each row of events of ``size`` rows over low-high seconds."""
        rng = self._rng
        event = np.repeat(np.arange(len(start)), size)
        span = rng.uniform(low, high, len(start))[event]
        first = np.concatenate([[0], np.cumsum(size)[:-1]])
        offset = rng.random(len(event)) * span
        offset[first] = 0.0
        ts = start[event] + offset
        order = np.lexsort((ts, event))
        return event[order], ts[order]

    def _fresh_merchants(self, users: np.ndarray, pool: np.ndarray) -> np.ndarray:
        """Merchants from ``pool`` that are not among each user's usual ones."""
        rng = self._rng
        merchant = rng.choice(pool, len(users))
        for _ in range(10):
            clash = (self._favourites[users] == merchant[:, None]).any(axis=1)
            if not clash.any():
                break
            merchant[clash] = rng.choice(pool, int(clash.sum()))
        return merchant

    def _usual_amount(self, users: np.ndarray, merchant: np.ndarray) -> np.ndarray:
        z = self._rng.standard_normal(len(users))
        return np.exp(self._mu[users] + self._sigma[users] * z) * self._merchant_factor[merchant]

    def _whereabouts(self, users: np.ndarray, ts: np.ndarray):
        """Country, lat, lon and IP of each user at ``ts``: home, or the trip destination."""
        rng = self._rng
        away = (self._trip_start[users] <= ts) & (ts < self._trip_end[users])
        country = np.where(away, self._trip_country[users], self._home[users])
        lat = np.where(away, self._trip_lat[users], self._home_lat[users]) + rng.normal(0.0, 0.03, len(users))
        lon = np.where(away, self._trip_lon[users], self._home_lon[users]) + rng.normal(0.0, 0.03, len(users))
        ip = np.where(away, self._trip_ip[users], self._home_ip[users])
        return country, lat, lon, ip

    def _spot(self, country: np.ndarray):
        """A point inside each country: its centre plus a country-sized jitter."""
        spread = self._country_spread[country] / 2.0
        lat = self._country_lat[country] + self._rng.normal(0.0, 1.0, len(country)) * spread
        lon = self._country_lon[country] + self._rng.normal(0.0, 1.0, len(country)) * spread
        return np.clip(lat, -89.0, 89.0), lon

    def _ips(self, country: np.ndarray) -> np.ndarray:
        octets = self._rng.integers(0, 256, (len(country), 4)).tolist()
        pick = self._rng.integers(0, 1 << 30, len(country)).tolist()
        return np.array(
            [f"{self._country_octets[c][p % len(self._country_octets[c])]}.{o[1]}.{o[2]}.{o[3] % 254 + 1}"
             for c, p, o in zip(country.tolist(), pick, octets)],
            dtype=object,
        )

    def _new_devices(self, n: int) -> np.ndarray:
        return np.array([_device_id(v) for v in self._rng.integers(0, 2**63, n).tolist()], dtype=object)

    @staticmethod
    def _rows(ts, user, merchant, amount, country, lat, lon, card, device, ip, typology: int) -> _Rows:
        return _Rows(ts, user, merchant, amount, country, lat, lon, card, device, ip,
                     np.full(len(ts), typology, dtype=np.int8))

    def _materialise(self, rows: _Rows) -> GeneratedBatch:
        n = len(rows.ts)
        sequence = np.arange(self._sequence, self._sequence + n, dtype=np.int64)
        self._sequence += n
        return GeneratedBatch(
            transaction_id=_prefixed_base36(self._id_prefix, sequence),
            user_id=self._user_id[rows.user],
            amount=np.round(np.clip(rows.amount, 0.25, 50_000.0), 2),
            merchant=self._merchant_name[rows.merchant],
            timestamp=np.round(rows.ts, 3),
            card_id=rows.card,
            currency=self._currency[rows.user],
            mcc=self._merchant_mcc[rows.merchant],
            country=self._country_code[rows.country],
            device_id=rows.device,
            ip=rows.ip,
            channel=self._merchant_channel[rows.merchant],
            lat=np.round(rows.lat, 4),
            lon=np.round(np.mod(rows.lon + 180.0, 360.0) - 180.0, 4),
            typology=rows.typology,
        )


def _row_cdf(weights: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(weights, axis=1)
    return cdf / cdf[:, -1:]


def _distance_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    lat1, lon1, lat2, lon2 = map(np.radians, (lat1, lon1, lat2, lon2))
    h = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * _EARTH_KM * np.arcsin(np.sqrt(h))


def _device_id(value: int) -> str:
    return f"dev_{value:016x}"


def _base36(value: int) -> str:
    digits = ""
    while True:
        value, d = divmod(value, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[d] + digits
        if not value:
            return digits


def _prefixed_base36(prefix: str, values: np.ndarray) -> np.ndarray:
    """``prefix`` + fixed-width base36 of each value, built as UCS-4 code points in one go."""
    powers = 36 ** np.arange(_ID_DIGITS - 1, -1, -1, dtype=np.int64)
    codes = np.empty((len(values), len(prefix) + _ID_DIGITS), dtype=np.uint32)
    codes[:, : len(prefix)] = np.frombuffer(prefix.encode("utf-32-le"), dtype=np.uint32)
    codes[:, len(prefix):] = _B36[(values[:, None] // powers) % 36]
    return codes.view(f"<U{codes.shape[1]}").ravel().astype(object)
