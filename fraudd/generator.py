"""Seeded, labelled synthetic transactions for model training, tests and the benchmark.

The stream imitates a card network: many users, each with a home country, a handful of usual
merchants, a personal spending scale, a daily rhythm, a usual device and one or two cards. A small,
configurable share of the transactions is fraud of five typologies, each labelled. Every typology
is built so that it stands out only against the user's own history (new device, new merchant,
amount relative to the user's scale, burst relative to the user's pace, country relative to the
user's whereabouts, hour relative to the user's rhythm); judged alone, each fraudulent message
looks like plenty of legitimate ones, and legitimate traffic carries benign look-alikes (travel,
big purchases, new merchants, new phones, night owls, gamblers).

``currency`` is the local currency of the country where the transaction happens (as on the wire),
so it does not give away the cardholder's home; amounts are on one scale whatever the currency.

Everything is generated with numpy, a block of rows at a time; the only per-transaction Python work
is the final ``%``-formatting of the JSON payloads. The stream is cut into fixed-size blocks
internally, so it is the same however the caller slices it into ``generate`` calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cache

import numpy as np
import orjson

from fraudd.scoring import decode

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
    "Blue",
    "Red",
    "Green",
    "Silver",
    "Golden",
    "North",
    "South",
    "East",
    "West",
    "Royal",
    "Urban",
    "Happy",
    "Sunny",
    "Bright",
    "Rapid",
    "Prime",
    "Smart",
    "Grand",
    "Little",
    "Big",
    "Old",
    "New",
    "Lucky",
    "Quiet",
    "Wild",
    "Coastal",
    "Metro",
    "Pacific",
    "Alpine",
    "Star",
    "Maple",
    "Cedar",
    "Iron",
    "Crystal",
    "Velvet",
    "Copper",
    "Amber",
    "Harbor",
    "Summit",
    "Nova",
)
_NAME_WORDS_B = (
    "Fox",
    "Oak",
    "River",
    "Stone",
    "Bridge",
    "Lane",
    "Hill",
    "Field",
    "Bay",
    "Peak",
    "Garden",
    "Square",
    "Point",
    "Valley",
    "Works",
    "House",
    "Corner",
    "Market",
    "Forge",
    "Harvest",
    "Wave",
    "Lantern",
    "Anchor",
    "Arrow",
    "Beacon",
    "Canyon",
    "Meadow",
    "Orchard",
    "Pine",
    "Port",
    "Ridge",
    "Spring",
    "Tower",
    "Trail",
    "Union",
    "Vista",
    "Willow",
    "Yard",
    "Zenith",
    "Crown",
)

_CHANNELS = np.array(["pos", "ecom", "atm"], dtype=object)
_ATM_MCC = "6011"
_N_FAVOURITES = 8
_BLOCK = 8192  # rows drawn per internal step; fixed so slicing never changes the stream
_DAY = 86_400.0
_B36 = np.frombuffer(b"0123456789abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
_ID_DIGITS = 8  # 36**8 ~ 2.8e12 transactions per seed
_EARTH_KM = 6371.0
_FAR_KM = 3000.0  # impossible-travel destinations are at least this far from the user

# Field order groups the parts that are pre-rendered once per user, merchant and place, so that
# per transaction only the id, amount, timestamp, card and device are formatted.
_PAYLOAD = b'{"transaction_id":"%s",%s,"amount":%s,%s,"timestamp":%d.%03d,"card_id":"%s","device_id":"%s",%s}'
_AMOUNT_TABLE_CENTS = 1 << 18  # amounts below 2621.44 are rendered by table lookup


@dataclass(frozen=True)
class GeneratorConfig:
    """What the stream looks like. The same config always yields the same stream."""

    seed: int = 0
    n_users: int = 20_000
    n_merchants: int = 3_000
    # Share of transactions labelled fraud, split over the typologies by ``typology_mix``
    # (shares of fraud transactions, not of fraud events).
    fraud_rate: float = 0.01
    typology_mix: Mapping[str, float] = field(default_factory=lambda: {name: 1.0 for name in TYPOLOGIES[1:]})
    start_ts: float = 1_764_374_400.0  # 2025-11-29T00:00:00Z
    # Event-time arrival rate. With 20,000 users, 1 tx/s is ~4.3 transactions per user per day,
    # so per-user windows of minutes to days hold realistic counts.
    tx_per_second: float = 1.0
    # Benign noise: the look-alikes that keep single-message scoring from being enough.
    trips_per_user_day: float = 0.015  # legit travel abroad, 2-10 days each (~9% of user-days)
    new_device_per_user_day: float = 0.003  # new phone: a legit "new device"
    new_merchant_share: float = 0.06  # legit purchases at a merchant outside the usual ones
    big_purchase_share: float = 0.005  # legit purchases 3-8x the user's usual amount (6x as
    # often at resellable-goods merchants, where account takeovers cash out)
    risky_user_share: float = 0.12  # users who legitimately gamble / buy crypto, some a lot

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
    reason ``fraudd.scoring.decode`` gives it (None for valid entries, duplicates included).
    """

    payloads: list[bytes | None]
    row: np.ndarray  # int64
    is_duplicate: np.ndarray  # bool
    reason: list[str | None]


class _Table:
    """Append-only columns. A row keeps its index forever, so batches already handed out can
    keep referring to rows (places, devices) that later blocks add."""

    def __init__(self, **columns: np.ndarray) -> None:
        self.size = len(next(iter(columns.values())))
        self.columns = columns

    def append(self, **columns: np.ndarray) -> np.ndarray:
        n = len(next(iter(columns.values())))
        if self.size + n > len(next(iter(self.columns.values()))):
            capacity = max(2 * (self.size + n), 1024)
            for name, old in self.columns.items():
                grown = np.empty(capacity, dtype=old.dtype)
                grown[: self.size] = old[: self.size]
                self.columns[name] = grown
        for name, values in columns.items():
            self.columns[name][self.size : self.size + n] = values
        self.size += n
        return np.arange(self.size - n, self.size)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]


@dataclass(frozen=True)
class _World:
    """The generator's users, merchants, cards, devices and places, as text and as pre-rendered
    JSON pieces. Batches keep indices into it and render columns and payloads on demand."""

    id_prefix: bytes
    user_id: np.ndarray  # str per user
    user_raw: np.ndarray  # bytes per user: "user_id":"…"
    merchant_name: np.ndarray
    merchant_mcc: np.ndarray
    merchant_channel: np.ndarray
    merchant_raw: np.ndarray  # bytes per merchant: "merchant":"…","mcc":"…","channel":"…"
    card: np.ndarray  # str per card; card index = user * 2 + slot
    card_raw: np.ndarray
    country_code: np.ndarray
    country_currency: np.ndarray
    devices: _Table  # text (str), raw (bytes)
    places: _Table  # country (index), lat, lon, ip, raw (bytes: "currency":…,"country":…,"ip":…,"lat":…,"lon":…)


@dataclass(frozen=True)
class GeneratedBatch:
    """Transactions in event-time order (row i of every column is one transaction).

    Numeric columns are stored; text columns (object arrays of ``str``) are rendered from the
    generator's tables on each access (keep the result if you index it in a loop), so that
    generating costs nothing a caller does not use.
    ``sequence`` (position in the stream) and ``user_index`` never appear in the payload.
    """

    sequence: np.ndarray  # int64
    timestamp: np.ndarray  # float64 Unix seconds, millisecond precision
    amount: np.ndarray  # float64, 2 decimals
    typology: np.ndarray  # int8 codes into TYPOLOGIES
    user_index: np.ndarray
    merchant_index: np.ndarray
    card_index: np.ndarray
    device_index: np.ndarray
    place_index: np.ndarray
    world: _World = field(repr=False, compare=False)

    typology_names = TYPOLOGIES

    def __len__(self) -> int:
        return len(self.sequence)

    @property
    def is_fraud(self) -> np.ndarray:
        return self.typology != LEGIT

    @property
    def transaction_id(self) -> np.ndarray:
        return _id_bytes(self.world.id_prefix, self.sequence).astype(str).astype(object)

    @property
    def transaction_ids(self) -> list[str]:
        return self.transaction_id.tolist()

    @property
    def user_id(self) -> np.ndarray:
        return self.world.user_id[self.user_index]

    @property
    def currency(self) -> np.ndarray:
        return self.world.country_currency[self.world.places["country"][self.place_index]]

    @property
    def merchant(self) -> np.ndarray:
        return self.world.merchant_name[self.merchant_index]

    @property
    def mcc(self) -> np.ndarray:
        return self.world.merchant_mcc[self.merchant_index]

    @property
    def channel(self) -> np.ndarray:
        return self.world.merchant_channel[self.merchant_index]

    @property
    def card_id(self) -> np.ndarray:
        return self.world.card[self.card_index]

    @property
    def device_id(self) -> np.ndarray:
        return self.world.devices["text"][self.device_index]

    @property
    def country(self) -> np.ndarray:
        return self.world.country_code[self.world.places["country"][self.place_index]]

    @property
    def ip(self) -> np.ndarray:
        return self.world.places["ip"][self.place_index]

    @property
    def lat(self) -> np.ndarray:
        return self.world.places["lat"][self.place_index]

    @property
    def lon(self) -> np.ndarray:
        return self.world.places["lon"][self.place_index]

    def payloads(self) -> list[bytes]:
        """The ``data`` field of each transaction, as the origin producer writes it."""
        world = self.world
        millis = np.rint(self.timestamp * 1000.0).astype(np.int64)
        columns = (
            _id_bytes(world.id_prefix, self.sequence).tolist(),
            world.user_raw[self.user_index].tolist(),
            _amount_text(self.amount).tolist(),
            world.merchant_raw[self.merchant_index].tolist(),
            (millis // 1000).tolist(),
            (millis % 1000).tolist(),
            world.card_raw[self.card_index].tolist(),
            world.devices["raw"][self.device_index].tolist(),
            world.places["raw"][self.place_index].tolist(),
        )
        return list(map(_PAYLOAD.__mod__, zip(*columns)))

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
        keys = np.concatenate(
            [
                np.arange(n, dtype=np.float64),
                dup_rows + 0.5 + rng.exponential(20.0, n_dup),
                rng.uniform(0.0, n, n_bad),
            ]
        )
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
        columns = {name: np.concatenate([getattr(b, name) for b in batches]) for name in _COLUMNS}
        return cls(**columns, world=batches[0].world)

    def slice(self, start: int, stop: int) -> GeneratedBatch:
        return GeneratedBatch(**{name: getattr(self, name)[start:stop] for name in _COLUMNS}, world=self.world)


_COLUMNS = tuple(f.name for f in fields(GeneratedBatch) if f.name != "world")


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
    (decode.REASON_INVALID, lambda obj: orjson.dumps(_with(obj, merchant=obj["merchant"] + "\r\n"))),
    (decode.REASON_INVALID, lambda obj: orjson.dumps(_with(obj, amount=1e308))),
    (decode.REASON_INVALID, lambda obj: orjson.dumps(_with(obj, timestamp="yesterday"))),
    (decode.REASON_INVALID, lambda obj: orjson.dumps(_with(obj, timestamp=obj["timestamp"] * 1000))),
    (decode.REASON_INVALID, lambda obj: orjson.dumps(_with(obj, timestamp="2025-11-29T10:00:00"))),
    (decode.REASON_NOT_UTF8, lambda obj: _dumps_replacing(obj, "merchant", b'"Caf\xe9 \xff"')),
    (decode.REASON_TOO_LARGE, lambda obj: orjson.dumps(_with(obj, note="x" * decode.MAX_PAYLOAD_BYTES))),
    (decode.REASON_NO_DATA, lambda obj: None),
)


@dataclass(slots=True)
class _Rows:
    """Transactions mid-generation: numbers and indices into the user/merchant/place tables."""

    ts: np.ndarray
    user: np.ndarray
    merchant: np.ndarray
    amount: np.ndarray
    place: np.ndarray
    card: np.ndarray  # index into the card table: user * 2 + slot
    device: np.ndarray
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
        self._setup_world()
        self._setup_users()
        self._now = float(config.start_ts)
        self._sequence = 0
        self._pending: _Rows | None = None  # fraud rows scheduled beyond the current block
        self._ready: list[GeneratedBatch] = []
        self._ready_rows = 0
        mix = np.array([config.typology_mix.get(name, 0.0) for name in TYPOLOGIES[1:]], dtype=np.float64)
        odds = config.fraud_rate / (1.0 - config.fraud_rate)
        self._fraud_rows_per_row = odds * mix / mix.sum() if mix.sum() > 0 else np.zeros(len(mix))

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
        self._country_far = (
            _distance_km(self._country_lat[:, None], self._country_lon[:, None], self._country_lat[None], self._country_lon[None])
            >= _FAR_KM
        )

        cats = list(zip(*_CATEGORIES))
        popularity = np.array(cats[4]) / sum(cats[4])
        per_cat = np.maximum(4, np.floor(popularity * cfg.n_merchants)).astype(np.int64)
        per_cat[0] += max(0, cfg.n_merchants - per_cat.sum())  # the remainder are supermarkets
        cat = np.repeat(np.arange(len(_CATEGORIES)), per_cat)
        n = len(cat)
        n_pairs = len(_NAME_WORDS_A) * len(_NAME_WORDS_B)
        # Distinct (adjective, noun, suffix) triples, so merchant names are unique.
        pair = rng.choice(n_pairs * len(_CATEGORIES), n, replace=False) % n_pairs
        online = rng.random(n) < np.array(cats[3])[cat]
        mcc = np.array(cats[0], dtype=object)[cat]
        self._merchant_name = np.array(
            [
                f"{_NAME_WORDS_A[p // len(_NAME_WORDS_B)]} {_NAME_WORDS_B[p % len(_NAME_WORDS_B)]} {cats[1][c]}"
                for p, c in zip(pair.tolist(), cat.tolist())
            ],
            dtype=object,
        )
        self._merchant_mcc = mcc
        self._merchant_channel = np.where(mcc == _ATM_MCC, _CHANNELS[2], np.where(online, _CHANNELS[1], _CHANNELS[0]))
        self._merchant_factor = np.array(cats[2])[cat]
        role = np.array(cats[5], dtype=object)[cat]
        self._merchant_p = popularity[cat] / per_cat[cat]
        self._merchant_p /= self._merchant_p.sum()
        # Merchants new to the user that fraud uses; the non-risky pools are online shops.
        self._small_pool = np.flatnonzero((role == "small") & online)
        self._resale_pool = np.flatnonzero((role == "resale") & online)
        self._big_purchase_weight = np.where(role == "resale", 6.0, 1.0)
        self._risky_pool = np.flatnonzero(role == "risky")
        self._plain_pool = np.flatnonzero(role != "risky")
        plain_p = self._merchant_p[self._plain_pool]
        self._plain_p = plain_p / plain_p.sum()
        self._card_present_pool = self._plain_pool[self._merchant_channel[self._plain_pool] == _CHANNELS[0]]

        # Daily rhythm: users are mostly active within a few hours of their peak; "odd" hours are
        # 7+ hours away from it.
        delta = np.abs(np.arange(24)[:, None] - np.arange(24)[None])
        delta = np.minimum(delta, 24 - delta)
        self._hour_kernel = np.exp(-(delta**2) / (2 * 3.0**2)) + 0.02
        self._odd_hour = delta >= 7

    def _setup_users(self) -> None:
        rng, cfg = self._rng, self.config
        n = cfg.n_users
        user_id = np.array([f"user_{_base36(i)}" for i in range(n)], dtype=object)
        home = rng.choice(len(_COUNTRIES), n, p=self._country_p)
        self._home = home
        self._mu = rng.normal(np.log(30.0), 0.6, n)  # log of the user's usual amount
        self._sigma = rng.uniform(0.35, 0.8, n)
        activity = rng.lognormal(0.0, 0.5, n)
        risky = rng.random(n) < cfg.risky_user_share
        night_owl = rng.random(n) < np.where(risky, 0.4, 0.2)
        peak_local = np.where(night_owl, rng.normal(23.0, 2.0, n), rng.normal(15.0, 2.5, n))
        peak = np.rint(peak_local - self._country_offset[home]).astype(np.int64) % 24

        self._n_cards = 1 + (rng.random(n) < 0.3).astype(np.int64)
        cards = np.array([f"card_{c:012x}" for c in rng.integers(0, 2**48, 2 * n).tolist()], dtype=object)
        self._devices = _Table(text=np.empty(0, dtype=object), raw=np.empty(0, dtype=object))
        self._device_of = self._new_devices(n)
        self._places = _Table(
            country=np.empty(0, np.int64),
            lat=np.empty(0),
            lon=np.empty(0),
            ip=np.empty(0, dtype=object),
            raw=np.empty(0, dtype=object),
        )
        self._home_place = self._new_places(home)

        fav = rng.choice(self._plain_pool, (n, _N_FAVOURITES), p=self._plain_p)
        slot = rng.integers(0, 4, n)
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

        # Legit travel: where each user is between trip start and end.
        self._trip_start = np.full(n, np.inf)
        self._trip_end = np.full(n, -np.inf)
        self._trip_place = self._home_place.copy()

        self._world = _World(
            id_prefix=f"txn_{_base36(cfg.seed)}_".encode(),
            user_id=user_id,
            user_raw=_encoded('"user_id":"{}"', user_id),
            merchant_name=self._merchant_name,
            merchant_mcc=self._merchant_mcc,
            merchant_channel=self._merchant_channel,
            merchant_raw=_encoded(
                '"merchant":"{}","mcc":"{}","channel":"{}"', self._merchant_name, self._merchant_mcc, self._merchant_channel
            ),
            card=cards,
            card_raw=_encoded("{}", cards),
            country_code=self._country_code,
            country_currency=self._country_currency,
            devices=self._devices,
            places=self._places,
        )

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
        """Start legit trips abroad and replace some users' phones (benign novelty)."""
        rng, cfg = self._rng, self.config
        days = (t1 - t0) / _DAY
        travellers = rng.integers(0, cfg.n_users, rng.poisson(cfg.n_users * cfg.trips_per_user_day * days))
        start = rng.uniform(t0, t1, len(travellers))
        self._trip_start[travellers] = start
        self._trip_end[travellers] = start + rng.uniform(2, 10, len(travellers)) * _DAY
        self._trip_place[travellers] = self._new_places(self._elsewhere(self._home[travellers]))
        upgraded = rng.integers(0, cfg.n_users, rng.poisson(cfg.n_users * cfg.new_device_per_user_day * days))
        self._device_of[upgraded] = self._new_devices(len(upgraded))

    def _legit(self, ts: np.ndarray, users: np.ndarray) -> _Rows:
        rng, cfg = self._rng, self.config
        n = len(users)
        rank = np.minimum(np.searchsorted(self._rank_cdf, rng.random(n)), _N_FAVOURITES - 1)
        merchant = self._favourites[users, rank]
        new = rng.random(n) < cfg.new_merchant_share
        merchant[new] = rng.choice(len(self._merchant_p), int(new.sum()), p=self._merchant_p)
        big = rng.random(n) < cfg.big_purchase_share * self._big_purchase_weight[merchant]
        amount = self._usual_amount(users, merchant) * np.where(big, rng.uniform(3.0, 8.0, n), 1.0)
        second_card = (rng.random(n) < 0.3) & (self._n_cards[users] == 2)
        return self._rows(
            ts, users, merchant, amount, self._whereabouts(users, ts), 2 * users + second_card, self._device_of[users], LEGIT
        )

    def _fraud(self, t0: float, t1: float) -> list[_Rows]:
        """Fraud events starting in [t0, t1); rows may spill past t1 and wait in ``_pending``."""
        rng = self._rng
        makers = (
            self._card_testing,
            self._account_takeover,
            self._velocity_burst,
            self._impossible_travel,
            self._high_risk_odd_hour,
        )
        mean_rows = (6.5, 2.0, 10.0, 1.5, 1.5)  # fraud rows per event of each typology
        parts = []
        for maker, rows_per_row, per_event in zip(makers, self._fraud_rows_per_row, mean_rows):
            n_events = rng.poisson(rows_per_row * _BLOCK / per_event)
            if n_events:
                parts.append(maker(np.sort(rng.uniform(t0, t1, n_events))))
        return parts

    def _card_testing(self, start: np.ndarray) -> _Rows:
        """4-9 tiny online charges (0.50-3.00) on one card at shops new to the user within
        ~30-150 s, from a fraudster's device. Tiny online charges are everyday traffic; the burst
        of new merchants on one card is what only the card's history reveals."""
        rng = self._rng
        users = self._pick_users(start, self._hour_group_cdf)
        size = rng.integers(4, 10, len(users))
        event, ts = self._spread(start, size, 30.0, 150.0)
        u = users[event]
        card = (2 * users + rng.integers(0, self._n_cards[users]))[event]
        return self._rows(
            ts,
            u,
            self._fresh_merchants(u, self._small_pool),
            rng.uniform(0.5, 3.0, len(u)),
            self._whereabouts(u, ts),
            card,
            self._new_devices(len(users))[event],
            CARD_TESTING,
        )

    def _account_takeover(self, start: np.ndarray) -> _Rows:
        """1-3 online purchases of resellable goods at 5-12x the user's usual amount (ordinary for
        the population), from a new device in a country that is not the user's home."""
        rng = self._rng
        users = self._pick_users(start, self._hour_group_cdf)
        size = rng.integers(1, 4, len(users))
        event, ts = self._spread(start, size, 120.0, 1200.0)
        u = users[event]
        amount = np.exp(self._mu[u]) * rng.uniform(5.0, 12.0, len(u))
        place = self._new_places(self._elsewhere(self._home[users]))[event]
        return self._rows(
            ts,
            u,
            self._fresh_merchants(u, self._resale_pool),
            amount,
            place,
            2 * u,
            self._new_devices(len(users))[event],
            ACCOUNT_TAKEOVER,
        )

    def _velocity_burst(self, start: np.ndarray) -> _Rows:
        """6-14 ordinary-looking purchases by one user within 2-10 minutes, on the usual device:
        only the user's usual pace makes the count stand out."""
        rng = self._rng
        users = self._pick_users(start, self._hour_group_cdf)
        size = rng.integers(6, 15, len(users))
        event, ts = self._spread(start, size, 120.0, 600.0)
        u = users[event]
        merchant = np.where(
            rng.random(len(u)) < 0.5,
            self._favourites[u, rng.integers(0, _N_FAVOURITES, len(u))],
            rng.choice(self._plain_pool, len(u), p=self._plain_p),
        )
        amount = self._usual_amount(u, merchant) * rng.uniform(1.0, 2.0, len(u))
        return self._rows(ts, u, merchant, amount, self._whereabouts(u, ts), 2 * u, self._device_of[u], VELOCITY_BURST)

    def _impossible_travel(self, start: np.ndarray) -> _Rows:
        """A genuine purchase where the user is, then 1-2 card-present purchases 5-90 minutes later
        in a country >= 3000 km away. Foreign purchases are everyday traffic (trips); the time
        and distance since the user's previous transaction are what give it away."""
        rng = self._rng
        users = self._pick_users(start, self._hour_group_cdf)
        genuine = self._legit(start, users)
        size = rng.integers(1, 3, len(users))
        event, ts = self._spread(start + rng.uniform(300.0, 5400.0, len(users)), size, 60.0, 900.0)
        u = users[event]
        here = self._places["country"][genuine.place]
        far = np.argmax(rng.random((len(users), len(_COUNTRIES))) * self._country_far[here], axis=1)
        merchant = rng.choice(self._card_present_pool, len(u))
        amount = self._usual_amount(u, merchant) * rng.uniform(1.0, 3.0, len(u))
        fraud = self._rows(
            ts,
            u,
            merchant,
            amount,
            self._new_places(far)[event],
            genuine.card[event],
            self._new_devices(len(users))[event],
            IMPOSSIBLE_TRAVEL,
        )
        return _Rows.concat([genuine, fraud])

    def _high_risk_odd_hour(self, start: np.ndarray) -> _Rows:
        """1-2 charges at a gambling / crypto / direct-marketing merchant new to the user, 7+ hours
        from the user's daily peak, on the usual device. Some users gamble legitimately and night
        owls exist; the user's own merchants and rhythm are what make it odd."""
        rng = self._rng
        users = self._pick_users(start, self._odd_group_cdf)
        size = rng.integers(1, 3, len(users))
        event, ts = self._spread(start, size, 60.0, 900.0)
        u = users[event]
        merchant = self._fresh_merchants(u, self._risky_pool)
        amount = self._usual_amount(u, merchant) * rng.uniform(1.0, 4.0, len(u))
        return self._rows(ts, u, merchant, amount, self._whereabouts(u, ts), 2 * u, self._device_of[u], HIGH_RISK_ODD_HOUR)

    # ---- helpers ------------------------------------------------------------------------------

    def _pick_users(self, ts: np.ndarray, group_cdf: np.ndarray) -> np.ndarray:
        """Users by activity, given the UTC hour: first the peak-hour group, then a user in it."""
        rng = self._rng
        hour = ((ts % _DAY) // 3600).astype(np.int64)
        group = np.minimum((group_cdf[hour] < rng.random(len(ts))[:, None]).sum(axis=1), 23)
        lo, hi = self._group_lo[group], self._group_hi[group]
        at = np.searchsorted(self._activity_cdf, lo + rng.random(len(ts)) * (hi - lo), side="right")
        return self._by_peak[np.minimum(at, len(self._by_peak) - 1)]

    def _spread(self, start: np.ndarray, size: np.ndarray, low: float, high: float):
        """Event index and time of each row, for events of ``size`` rows over low-high seconds."""
        rng = self._rng
        event = np.repeat(np.arange(len(start)), size)
        offset = rng.random(len(event)) * rng.uniform(low, high, len(start))[event]
        offset[np.cumsum(size) - size] = 0.0  # each event's first row is at its start
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

    def _elsewhere(self, home: np.ndarray) -> np.ndarray:
        """A country other than ``home``, drawn like users' home countries."""
        rng = self._rng
        other = rng.choice(len(_COUNTRIES), len(home), p=self._country_p)
        shift = 1 + rng.integers(0, len(_COUNTRIES) - 1, len(home))
        return np.where(other == home, (home + shift) % len(_COUNTRIES), other)

    def _whereabouts(self, users: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """The place of each user at ``ts``: home, or the destination of a trip in progress."""
        away = (self._trip_start[users] <= ts) & (ts < self._trip_end[users])
        return np.where(away, self._trip_place[users], self._home_place[users])

    def _new_places(self, country: np.ndarray) -> np.ndarray:
        """Register a spot (lat/lon inside the country, a local IP) per entry; their indices."""
        rng = self._rng
        spread = self._country_spread[country] / 2.0
        lat = np.round(np.clip(self._country_lat[country] + rng.standard_normal(len(country)) * spread, -89.0, 89.0), 4)
        lon = np.round(self._country_lon[country] + rng.standard_normal(len(country)) * spread, 4)
        lon = np.round(np.mod(lon + 180.0, 360.0) - 180.0, 4)
        host = rng.integers(0, 1 << 30, (len(country), 2)).tolist()
        ip = np.array(
            [
                f"{self._country_octets[c][h % len(self._country_octets[c])]}.{(g >> 16) & 255}.{(g >> 8) & 255}.{g % 254 + 1}"
                for c, (h, g) in zip(country.tolist(), host)
            ],
            dtype=object,
        )
        raw = np.array(
            [
                f'"currency":"{self._country_currency[c]}","country":"{self._country_code[c]}","ip":"{i}",'
                f'"lat":{a!r},"lon":{o!r}'.encode()
                for c, i, a, o in zip(country.tolist(), ip.tolist(), lat.tolist(), lon.tolist())
            ],
            dtype=object,
        )
        return self._places.append(country=country, lat=lat, lon=lon, ip=ip, raw=raw)

    def _new_devices(self, n: int) -> np.ndarray:
        """Register ``n`` never-seen devices (same id format for users' phones and fraudsters')."""
        text = np.array([f"dev_{v:016x}" for v in self._rng.integers(0, 2**63, n).tolist()], dtype=object)
        return self._devices.append(text=text, raw=np.array([t.encode() for t in text], dtype=object))

    @staticmethod
    def _rows(ts, user, merchant, amount, place, card, device, typology: int) -> _Rows:
        return _Rows(
            ts,
            user,
            merchant,
            np.round(np.clip(amount, 0.25, 50_000.0), 2),
            place,
            card,
            device,
            np.full(len(ts), typology, dtype=np.int8),
        )

    def _materialise(self, rows: _Rows) -> GeneratedBatch:
        n = len(rows.ts)
        self._sequence += n
        return GeneratedBatch(
            sequence=np.arange(self._sequence - n, self._sequence, dtype=np.int64),
            timestamp=np.round(rows.ts, 3),
            amount=rows.amount,
            typology=rows.typology,
            user_index=rows.user,
            merchant_index=rows.merchant,
            card_index=rows.card,
            device_index=rows.device,
            place_index=rows.place,
            world=self._world,
        )


def _encoded(template: str, *columns: np.ndarray) -> np.ndarray:
    return np.array([template.format(*values).encode() for values in zip(*columns)], dtype=object)


def _row_cdf(weights: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(weights, axis=1)
    return cdf / cdf[:, -1:]


def _distance_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    lat1, lon1, lat2, lon2 = map(np.radians, (lat1, lon1, lat2, lon2))
    h = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * _EARTH_KM * np.arcsin(np.sqrt(h))


def _base36(value: int) -> str:
    digits = ""
    while True:
        value, d = divmod(value, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[d] + digits
        if not value:
            return digits


def _id_bytes(prefix: bytes, sequence: np.ndarray) -> np.ndarray:
    """``prefix`` + fixed-width base36 of each sequence number, built as one byte matrix."""
    powers = 36 ** np.arange(_ID_DIGITS - 1, -1, -1, dtype=np.int64)
    chars = np.empty((len(sequence), len(prefix) + _ID_DIGITS), dtype=np.uint8)
    chars[:, : len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    chars[:, len(prefix) :] = _B36[(sequence[:, None] // powers) % 36]
    return chars.view(f"S{chars.shape[1]}").ravel()


@cache
def _amount_table() -> np.ndarray:
    """The JSON text of every amount below the table size, in cents (as Go prints floats)."""
    return np.array([repr(c / 100).encode() for c in range(_AMOUNT_TABLE_CENTS)], dtype=object)


def _amount_text(amount: np.ndarray) -> np.ndarray:
    cents = np.rint(amount * 100.0).astype(np.int64)
    inside = cents < _AMOUNT_TABLE_CENTS
    text = _amount_table()[np.where(inside, cents, 0)]
    text[~inside] = [repr(c / 100).encode() for c in cents[~inside].tolist()]
    return text
