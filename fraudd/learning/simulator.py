"""A second, independent labelled traffic simulator: customers, terminals, and the fraud of the
public fraud-detection literature.

``fraudd.generator`` hides each fraud in one user's own history. A team adopting fraudd brings
traffic nobody here designed, so the learning loop (calibrate, train, shadow, backtest) is shown on
this simulator instead, which shares no code, population or mechanics with it. It follows the
transaction simulator of the "Reproducible Machine Learning for Credit Card Fraud Detection"
handbook (Le Borgne et al., ULB), adapted to fraudd's input messages:

- customers live at a point of a 100 × 100 grid split into nine countries; each has a spending
  mean and spread, a pace of 0–4 transactions a day, a preferred time of day, one card, a phone
  and an IP address;
- terminals (one merchant each, card-present ``pos`` or online ``ecom``) stand on the same grid; a
  customer pays at the terminals within reach, favouring a few; a ``pos`` terminal is the message's
  ``device_id`` (the card reader), an ``ecom`` purchase carries the customer's phone and IP; some
  customers travel, paying near a far-away spot for a few days.

Fraud, labelled per transaction with its typology:

- ``compromised_terminal``: a terminal is compromised (skimmer, breached merchant) for 7–28 days;
  each of its transactions then is fraud with probability 0.8. Nothing in the transaction or the
  customer's history shows it: only the terminal's recent confirmed fraud does.
- ``stolen_card``: a card number is stolen; within two days a fraudster uses it online from a
  device and a country new to the account, in a burst of 3–10 purchases minutes apart at 2–6×
  the customer's usual amount.
- ``compromised_customer``: the customer's credentials leak; for 14 days a third of the account's
  transactions are the fraudster's, at 5× the usual amount, through the customer's usual terminals.

Labels come back late, as chargebacks and disputes do: each fraud is reported a log-normally
distributed delay after it happened (median ``report_delay_median_days``, two days by default; one in
ten after more than five and a half days), which ``history_lines`` give as ``reported_at`` so that
training sees each label only from then on.

Deterministic for a seed; the history ends at ``start_ts + days`` (by default: now), in
event-time order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import orjson

TYPOLOGIES: tuple[str, ...] = ("legit", "compromised_terminal", "stolen_card", "compromised_customer")
LEGIT, COMPROMISED_TERMINAL, STOLEN_CARD, COMPROMISED_CUSTOMER = range(4)

_DAY = 86_400.0
_GRID = 100.0
_COUNTRIES = ("FR", "BE", "NL", "DE", "LU", "CH", "IT", "AT", "ES")  # 3 × 3 cells of the grid
_CURRENCY = {"CH": "CHF"}
_FRAUD_COUNTRIES = ("RU", "NG", "BR", "VN", "US", "UA")  # where stolen cards get used
_MCCS = np.array(["5411", "5812", "5814", "5541", "5912", "5311", "5651", "5732", "5942", "5999", "4121", "7011"])
_ECOM_MCCS = np.array(["5815", "5816", "5818", "5942", "5999", "5732", "5311", "4121"])
_REACH = 40  # terminals within a customer's reach (the nearest ones)
_FAVOURITE_DECAY = 1.2  # the k-th nearest terminal is chosen with weight 1 / k**decay
_HUBS = 64  # far-away spots travellers go to


@dataclass(frozen=True)
class SimulatorConfig:
    """What the simulated portfolio looks like. The same config always yields the same history."""

    seed: int = 0
    n_customers: int = 5_000
    n_terminals: int = 10_000
    days: int = 60
    start_ts: float | None = None  # default: midnight UTC ``days`` days before today's
    ecom_share: float = 0.25  # of terminals
    trips_per_customer_day: float = 0.004
    # Fraud rates, per terminal or per customer and day (the handbook's 2 terminals and 3
    # customers a day for 10,000 terminals and 5,000 customers).
    terminal_compromises_per_day: float = 2e-4
    terminal_fraud_probability: float = 0.8
    customer_compromises_per_day: float = 6e-4
    card_thefts_per_day: float = 4e-4
    report_delay_median_days: float = 2.0
    typologies: tuple[str, ...] = field(default_factory=lambda: TYPOLOGIES[1:])

    def __post_init__(self) -> None:
        unknown = set(self.typologies) - set(TYPOLOGIES[1:])
        if unknown:
            raise ValueError(f"unknown typologies {sorted(unknown)}; known: {TYPOLOGIES[1:]}")
        if self.n_customers < 10 or self.n_terminals < _REACH or self.days < 1:
            raise ValueError(f"need n_customers >= 10, n_terminals >= {_REACH}, days >= 1")

    @property
    def start(self) -> float:
        if self.start_ts is not None:
            return float(self.start_ts)
        return (time.time() // _DAY - self.days) * _DAY


@dataclass(frozen=True)
class SimulatedHistory:
    """Transactions in event-time order; row i of every column is one transaction."""

    transaction_id: np.ndarray  # str
    user_id: np.ndarray  # str
    card_id: np.ndarray  # str
    merchant: np.ndarray  # str
    mcc: np.ndarray  # str
    channel: np.ndarray  # "pos" | "ecom"
    device_id: np.ndarray  # str
    ip: np.ndarray  # str or None (card-present)
    country: np.ndarray  # str
    currency: np.ndarray  # str
    amount: np.ndarray  # float64, 2 decimals
    timestamp: np.ndarray  # float64 Unix seconds, millisecond precision
    typology: np.ndarray  # int8 codes into TYPOLOGIES
    terminal: np.ndarray  # int64 (never in the message)
    customer: np.ndarray  # int64 (never in the message)
    reported_at: np.ndarray  # float64 Unix seconds a fraud's label is reported; NaN for legit (never in the message)

    typology_names = TYPOLOGIES

    def __len__(self) -> int:
        return len(self.timestamp)

    @property
    def is_fraud(self) -> np.ndarray:
        return self.typology != LEGIT

    def take(self, rows: np.ndarray | slice) -> SimulatedHistory:
        return SimulatedHistory(**{name: getattr(self, name)[rows] for name in self.__dataclass_fields__})

    def messages(self) -> list[dict]:
        """The input messages (DESIGN.md), one dict per transaction."""
        columns = zip(
            self.transaction_id.tolist(),
            self.user_id.tolist(),
            self.card_id.tolist(),
            self.merchant.tolist(),
            self.mcc.tolist(),
            self.channel.tolist(),
            self.device_id.tolist(),
            self.ip.tolist(),
            self.country.tolist(),
            self.currency.tolist(),
            self.amount.tolist(),
            self.timestamp.tolist(),
        )
        messages = []
        for txid, user, card, merchant, mcc, channel, device, ip, country, currency, amount, ts in columns:
            message = {
                "transaction_id": txid,
                "user_id": user,
                "card_id": card,
                "merchant": merchant,
                "mcc": mcc,
                "channel": channel,
                "device_id": device,
                "country": country,
                "currency": currency,
                "amount": amount,
                "timestamp": ts,
            }
            if ip is not None:
                message["ip"] = ip
            messages.append(message)
        return messages

    def payloads(self) -> list[bytes]:
        """The ``data`` field of each transaction, as a producer would write it."""
        return [orjson.dumps(message) for message in self.messages()]

    def history_lines(self) -> list[bytes]:
        """JSON Lines of ``fraudd train --history``: each message plus ``label`` (and ``typology``,
        which fraudd ignores as an unknown field but the model card reports recall by)."""
        names = np.array(TYPOLOGIES, dtype=object)[self.typology].tolist()
        fraud = self.is_fraud.tolist()
        reported = np.round(self.reported_at, 3).tolist()
        return [
            orjson.dumps({**message, "label": int(label), "typology": name, **({"reported_at": at} if label else {})})
            for message, label, name, at in zip(self.messages(), fraud, names, reported)
        ]


class Simulator:
    """Builds the population once; ``history()`` simulates ``config.days`` days of it."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config = config or SimulatorConfig()
        rng = self._rng = np.random.default_rng([config.seed, 0x51])
        n_c, n_t = config.n_customers, config.n_terminals
        self._home = rng.uniform(0.0, _GRID, (n_c, 2))
        self._mean_amount = rng.uniform(5.0, 100.0, n_c)
        self._std_amount = self._mean_amount / 2.0
        self._pace = rng.uniform(0.0, 4.0, n_c)
        self._peak_s = np.clip(rng.normal(13.0, 2.5, n_c), 7.0, 21.0) * 3600.0
        self._terminal_at = rng.uniform(0.0, _GRID, (n_t, 2))
        self._terminal_ecom = rng.random(n_t) < config.ecom_share
        self._terminal_mcc = np.where(self._terminal_ecom, rng.choice(_ECOM_MCCS, n_t), rng.choice(_MCCS, n_t))
        self._reach = _nearest(self._home, self._terminal_at, _REACH)
        hubs = rng.uniform(0.0, _GRID, (_HUBS, 2))
        self._hub_reach = _nearest(hubs, self._terminal_at, _REACH)
        self._hub_at = hubs
        weights = 1.0 / np.arange(1, _REACH + 1) ** _FAVOURITE_DECAY
        self._favourite_cdf = np.cumsum(weights) / weights.sum()

    def history(self) -> SimulatedHistory:
        cfg, rng = self.config, self._rng
        start = cfg.start
        customer, ts = self._arrivals(start)
        terminal = self._terminals_used(customer, ts, start)
        amount = np.abs(rng.normal(self._mean_amount[customer], self._std_amount[customer]))
        typology = np.zeros(len(ts), dtype=np.int8)
        device = np.full(len(ts), -1, dtype=np.int64)  # -1: the customer's own phone
        fraud_country = np.full(len(ts), -1, dtype=np.int64)
        if "compromised_customer" in cfg.typologies:
            self._compromise_customers(customer, ts, amount, typology, start)
        if "compromised_terminal" in cfg.typologies:
            self._compromise_terminals(terminal, ts, typology, start)
        if "stolen_card" in cfg.typologies:
            extra = self._steal_cards(start)
            customer, ts, terminal, amount, typology, device, fraud_country = (
                np.concatenate(pair) for pair in zip((customer, ts, terminal, amount, typology, device, fraud_country), extra)
            )
        order = np.argsort(ts, kind="stable")
        customer, ts, terminal, amount = customer[order], ts[order], terminal[order], amount[order]
        typology, device, fraud_country = typology[order], device[order], fraud_country[order]
        return self._materialise(customer, ts, terminal, np.round(np.maximum(amount, 0.5), 2), typology, device, fraud_country)

    def _arrivals(self, start: float) -> tuple[np.ndarray, np.ndarray]:
        """Each customer's transactions of each day, at times around the customer's own peak."""
        rng, cfg = self._rng, self.config
        counts = rng.poisson(np.tile(self._pace, cfg.days))
        day = np.repeat(np.repeat(np.arange(cfg.days), cfg.n_customers), counts)
        customer = np.repeat(np.tile(np.arange(cfg.n_customers), cfg.days), counts)
        time_of_day = np.clip(rng.normal(self._peak_s[customer], 3.0 * 3600.0), 0.0, _DAY - 1.0)
        return customer, start + day * _DAY + time_of_day

    def _terminals_used(self, customer: np.ndarray, ts: np.ndarray, start: float) -> np.ndarray:
        """A favourite-weighted terminal within reach, near a far-away spot while travelling."""
        rng, cfg = self._rng, self.config
        n_trips = rng.poisson(cfg.n_customers * cfg.days * cfg.trips_per_customer_day)
        traveller = rng.integers(0, cfg.n_customers, n_trips)
        trip_start = start + rng.uniform(0.0, cfg.days * _DAY, n_trips)
        trip_end = trip_start + rng.uniform(2.0, 7.0, n_trips) * _DAY
        distance = np.linalg.norm(self._hub_at[None, :, :] - self._home[traveller][:, None, :], axis=2)
        hub = np.argmax(rng.random(distance.shape) * distance, axis=1)  # far spots are likelier
        rank = np.minimum(np.searchsorted(self._favourite_cdf, rng.random(len(ts))), _REACH - 1)
        terminal = self._reach[customer, rank]
        rows_of = _Groups(customer)
        for who, since, until, where in zip(traveller.tolist(), trip_start.tolist(), trip_end.tolist(), hub.tolist()):
            away = rows_of.within(who, ts, since, until)
            terminal[away] = self._hub_reach[where, rank[away]]
        return terminal

    def _events(self, rate_per_day: float, population: int, start: float) -> tuple[np.ndarray, np.ndarray]:
        """Who is hit and when: a Poisson number per day, at uniform times."""
        rng, cfg = self._rng, self.config
        n = rng.poisson(rate_per_day * population * cfg.days)
        return rng.integers(0, population, n), start + rng.uniform(0.0, cfg.days * _DAY, n)

    def _compromise_terminals(self, terminal: np.ndarray, ts: np.ndarray, typology: np.ndarray, start: float) -> None:
        rng, cfg = self._rng, self.config
        victims, since = self._events(cfg.terminal_compromises_per_day, cfg.n_terminals, start)
        until = since + rng.uniform(7.0, 28.0, len(victims)) * _DAY
        rows_of = _Groups(terminal)
        for victim, lo, hi in zip(victims.tolist(), since.tolist(), until.tolist()):
            rows = rows_of.within(victim, ts, lo, hi)
            hit = rows[rng.random(len(rows)) < cfg.terminal_fraud_probability]
            typology[hit[typology[hit] == LEGIT]] = COMPROMISED_TERMINAL

    def _compromise_customers(
        self, customer: np.ndarray, ts: np.ndarray, amount: np.ndarray, typology: np.ndarray, start: float
    ) -> None:
        rng, cfg = self._rng, self.config
        victims, since = self._events(cfg.customer_compromises_per_day, cfg.n_customers, start)
        rows_of = _Groups(customer)
        for victim, lo in zip(victims.tolist(), since.tolist()):
            rows = rows_of.within(victim, ts, lo, lo + 14.0 * _DAY)
            hit = rows[rng.random(len(rows)) < 1.0 / 3.0]
            hit = hit[typology[hit] == LEGIT]
            amount[hit] *= 5.0
            typology[hit] = COMPROMISED_CUSTOMER

    def _steal_cards(self, start: float) -> tuple[np.ndarray, ...]:
        """The fraudsters' own transactions on stolen cards: rows to add to the history."""
        rng, cfg = self._rng, self.config
        victims, stolen_at = self._events(cfg.card_thefts_per_day, cfg.n_customers, start)
        size = rng.integers(3, 11, len(victims))
        event = np.repeat(np.arange(len(victims)), size)
        first = stolen_at + rng.uniform(0.0, 2.0 * _DAY, len(victims))
        elapsed = np.cumsum(rng.uniform(30.0, 900.0, len(event)))
        ts = first[event] + elapsed - np.repeat(elapsed[np.cumsum(size) - size], size)
        customer = victims[event]
        online = np.flatnonzero(self._terminal_ecom)
        terminal = rng.choice(online, len(event))
        amount = self._mean_amount[customer] * rng.uniform(2.0, 6.0, len(event))
        country = rng.integers(0, len(_FRAUD_COUNTRIES), len(victims))[event]
        inside = ts < start + cfg.days * _DAY
        return (
            customer[inside],
            ts[inside],
            terminal[inside],
            amount[inside],
            np.full(int(inside.sum()), STOLEN_CARD, dtype=np.int8),
            event[inside],
            country[inside],
        )

    def _materialise(self, customer, ts, terminal, amount, typology, device, fraud_country) -> SimulatedHistory:
        seed = self.config.seed
        n = len(ts)
        cell = np.minimum((self._terminal_at[terminal] // (_GRID / 3)).astype(np.int64), 2)
        countries = np.array(_COUNTRIES, dtype=object)[cell[:, 0] * 3 + cell[:, 1]]
        ecom = self._terminal_ecom[terminal]
        home_cell = np.minimum((self._home[customer] // (_GRID / 3)).astype(np.int64), 2)
        home = np.array(_COUNTRIES, dtype=object)[home_cell[:, 0] * 3 + home_cell[:, 1]]
        # Online, the country is where the buyer is (the IP's), not where the shop is.
        countries = np.where(ecom, home, countries)
        fraudster = device >= 0
        countries[fraudster] = np.array(_FRAUD_COUNTRIES, dtype=object)[fraud_country[fraudster]]
        customer_ids = customer.astype(str).astype(object)
        device_ids = np.where(ecom, "phone_" + customer_ids, "term_" + terminal.astype(str).astype(object))
        device_ids[fraudster] = f"fd{seed}_" + device[fraudster].astype(str).astype(object)
        ips = np.full(n, None, dtype=object)
        ips[ecom] = [f"10.{(c >> 16) & 255}.{(c >> 8) & 255}.{c & 255}" for c in customer[ecom].tolist()]
        ips[fraudster] = [f"203.0.{(d >> 8) & 255}.{d & 255}" for d in device[fraudster].tolist()]
        return SimulatedHistory(
            transaction_id=np.array([f"sim{seed}_{i:09d}" for i in range(n)], dtype=object),
            user_id="cust_" + customer_ids,
            card_id="card_" + customer_ids,
            merchant="shop_" + terminal.astype(str).astype(object),
            mcc=self._terminal_mcc[terminal].astype(object),
            channel=np.where(ecom, "ecom", "pos").astype(object),
            device_id=device_ids,
            ip=ips,
            country=countries,
            currency=np.array([_CURRENCY.get(c, "EUR") for c in countries.tolist()], dtype=object),
            amount=amount,
            timestamp=np.round(ts, 3),
            typology=typology,
            terminal=terminal,
            customer=customer,
            reported_at=self._reported_at(ts, typology),
        )

    def _reported_at(self, ts: np.ndarray, typology: np.ndarray) -> np.ndarray:
        # A stream of its own, so that adding report times left every earlier history unchanged.
        rng = np.random.default_rng([self.config.seed, 0x7E])
        delay_days = rng.lognormal(np.log(self.config.report_delay_median_days), 0.8, len(ts))
        return np.where(typology != LEGIT, np.round(ts, 3) + delay_days * _DAY, np.nan)


class _Groups:
    """The rows of each key (customer, terminal), found without scanning every row per lookup."""

    def __init__(self, keys: np.ndarray) -> None:
        self._order = np.argsort(keys, kind="stable")
        self._bounds = np.searchsorted(keys[self._order], np.arange(keys.max(initial=0) + 2))

    def within(self, key: int, ts: np.ndarray, since: float, until: float) -> np.ndarray:
        """Rows of ``key`` whose time is in [since, until)."""
        rows = self._order[self._bounds[key] : self._bounds[key + 1]]
        return rows[(ts[rows] >= since) & (ts[rows] < until)]


def _nearest(points: np.ndarray, terminals: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` terminals nearest each point, nearest first; in chunks to bound memory."""
    out = np.empty((len(points), k), dtype=np.int64)
    for start in range(0, len(points), 512):
        chunk = points[start : start + 512]
        distance = ((chunk[:, None, :] - terminals[None, :, :]) ** 2).sum(axis=2)
        nearest = np.argpartition(distance, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(distance, nearest, axis=1), axis=1)
        out[start : start + 512] = np.take_along_axis(nearest, order, axis=1)
    return out
