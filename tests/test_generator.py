"""The synthetic stream: deterministic, continuable, labelled, and exactly what decode expects."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

from fraudd.generator import (
    ACCOUNT_TAKEOVER,
    CARD_TESTING,
    HIGH_RISK_ODD_HOUR,
    IMPOSSIBLE_TRAVEL,
    LEGIT,
    TYPOLOGIES,
    GeneratorConfig,
    TransactionGenerator,
)
from fraudd.scoring import decode

SMALL = GeneratorConfig(seed=3, n_users=2_000, tx_per_second=0.2)


@pytest.fixture(scope="module")
def stream():
    """60k transactions of the default world: enough for every typology to occur many times."""
    return TransactionGenerator(GeneratorConfig(seed=11)).generate(60_000)


def test_same_seed_same_stream_other_seed_other_stream():
    a = TransactionGenerator(SMALL).generate(5_000).payloads()
    b = TransactionGenerator(SMALL).generate(5_000).payloads()
    c = TransactionGenerator(GeneratorConfig(seed=4, n_users=2_000, tx_per_second=0.2)).generate(5_000).payloads()
    assert a == b
    assert len(set(a) & set(c)) == 0  # ids carry the seed, so streams never collide


def test_repeated_calls_continue_the_stream_however_it_is_sliced():
    whole = TransactionGenerator(SMALL).generate(20_000)
    gen = TransactionGenerator(SMALL)
    parts = [gen.generate(n) for n in (1, 2_999, 10_000, 7_000)]
    assert [p for part in parts for p in part.payloads()] == whole.payloads()
    assert np.array_equal(np.concatenate([p.sequence for p in parts]), np.arange(20_000))
    assert np.all(np.diff(whole.timestamp) >= 0)  # event-time order, across internal blocks too
    assert whole.timestamp[0] >= SMALL.start_ts


def test_fraud_rate_and_every_typology(stream):
    assert stream.is_fraud.tolist() == (stream.typology != LEGIT).tolist()
    assert 0.007 < stream.is_fraud.mean() < 0.013
    counts = np.bincount(stream.typology, minlength=len(TYPOLOGIES))
    assert all(counts[1:] > 50), dict(zip(TYPOLOGIES, counts))
    quiet = TransactionGenerator(GeneratorConfig(seed=1, n_users=500, fraud_rate=0.0)).generate(10_000)
    assert not quiet.is_fraud.any()
    only = GeneratorConfig(seed=1, n_users=500, typology_mix={"card_testing": 1.0})
    assert set(np.unique(TransactionGenerator(only).generate(20_000).typology)) == {LEGIT, CARD_TESTING}


def test_payloads_decode_to_exactly_the_columns(stream):
    batch = stream.slice(0, 20_000)
    payloads = batch.payloads()
    decoded = decode.decode_batch([str(i) for i in range(len(payloads))], payloads)
    assert decoded.rejected == []
    assert decoded.transaction_id == batch.transaction_ids
    assert len(set(decoded.transaction_id)) == len(batch)
    assert max(map(len, decoded.transaction_id)) <= decode.MAX_ID_CHARS
    assert decoded.user_id == batch.user_id.tolist()
    assert decoded.merchant == batch.merchant.tolist()
    assert np.array_equal(decoded.amount, batch.amount) and np.all(batch.amount > 0)
    assert np.array_equal(decoded.amount, np.round(batch.amount, 2))
    assert np.array_equal(decoded.timestamp, batch.timestamp)
    for name in ("card_id", "currency", "mcc", "country", "device_id", "ip", "channel"):
        assert getattr(decoded, name) == getattr(batch, name).tolist(), name
    assert np.array_equal(decoded.lat, batch.lat) and np.array_equal(decoded.lon, batch.lon)
    assert set(decoded.channel) == {"pos", "ecom", "atm"}


def test_faults_get_the_reasons_decode_gives_and_duplicates_are_identical():
    batch = TransactionGenerator(SMALL).generate(3_000)
    clean = batch.payloads()
    faulty = batch.with_faults(duplicate_rate=0.05, invalid_rate=0.05, rng=np.random.default_rng(0))
    n = len(faulty.payloads)
    assert n == 3_000 + 150 + 150
    entry_ids = [f"{i}-0" for i in range(n)]
    decoded = decode.decode_batch(entry_ids, faulty.payloads)

    valid = [i for i in range(n) if faulty.reason[i] is None]
    assert decoded.entry_ids == [entry_ids[i] for i in valid]
    ids = batch.transaction_ids
    assert decoded.transaction_id == [ids[faulty.row[i]] for i in valid]
    got = {r.entry_id: r.reason for r in decoded.rejected}
    assert got == {entry_ids[i]: faulty.reason[i] for i in range(n) if faulty.reason[i] is not None}
    expected_reasons = {
        decode.REASON_TOO_LARGE,
        decode.REASON_NOT_UTF8,
        decode.REASON_NOT_JSON,
        decode.REASON_NOT_OBJECT,
        decode.REASON_MISSING,
        decode.REASON_INVALID,
        decode.REASON_NO_DATA,
    }
    assert set(got.values()) == expected_reasons
    assert all(np.asarray(faulty.row)[[i for i in range(n) if faulty.reason[i]]] == -1)

    # Every valid payload appears; duplicates are the same bytes, later than their original.
    first_seen = {}
    for i in valid:
        assert faulty.payloads[i] == clean[faulty.row[i]]
        if faulty.is_duplicate[i]:
            assert first_seen[faulty.row[i]] < i
        else:
            first_seen[faulty.row[i]] = i
    assert len(first_seen) == 3_000 and int(faulty.is_duplicate.sum()) == 150


def test_fraud_is_only_visible_against_the_users_history(stream):
    """Each typology's tell is relative to the user; judged alone the rows look ordinary."""
    users = stream.user_id.tolist()
    typology = stream.typology
    legit = typology == LEGIT
    amount, mcc, country = stream.amount, stream.mcc, stream.country.tolist()
    devices = stream.device_id.tolist()

    # Card-testing amounts overlap plenty of legit small purchases.
    tiny = amount[typology == CARD_TESTING]
    assert tiny.min() >= 0.5 and tiny.max() <= 3.0
    assert (legit & (amount <= 3.0)).sum() > 5 * len(tiny)
    # High-risk MCCs occur in legit traffic too.
    risky = np.isin(mcc, ["7995", "6051", "5967"])
    assert (risky & legit).sum() > 0.5 * (risky & (typology == HIGH_RISK_ODD_HOUR)).sum()
    # Account takeover: far above the user's own norm, yet below the population's top 1%, from a
    # device the user never used, and not in the user's home country.
    seen_devices, history = defaultdict(set), defaultdict(list)
    home = {}
    ato_ratio = []
    for i in np.flatnonzero(legit | (typology == ACCOUNT_TAKEOVER)).tolist():
        u = users[i]
        if typology[i] == ACCOUNT_TAKEOVER:
            assert devices[i] not in seen_devices[u]
            if len(history[u]) >= 5:
                ato_ratio.append(amount[i] / np.median(history[u]))
                assert country[i] != home[u]
        else:
            seen_devices[u].add(devices[i])
            history[u].append(amount[i])
            home.setdefault(u, country[i])
    assert np.median(ato_ratio) > 4
    assert np.median(amount[typology == ACCOUNT_TAKEOVER]) < np.percentile(amount[legit], 99)
    # Impossible travel: the user's previous transaction is far away and recent.
    last = {}
    checked = 0
    lat, lon, ts = stream.lat, stream.lon, stream.timestamp
    for i in range(len(stream)):
        u = users[i]
        if typology[i] == IMPOSSIBLE_TRAVEL and u in last and typology[last[u]] != IMPOSSIBLE_TRAVEL:
            j = last[u]
            assert ts[i] - ts[j] < 2 * 3600
            assert _km(lat[i], lon[i], lat[j], lon[j]) > 2_000
            checked += 1
        last[u] = i
    assert checked > 50


def _km(lat1, lon1, lat2, lon2):
    p1, p2 = math.radians(lat1), math.radians(lat2)
    h = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * 6371 * math.asin(math.sqrt(h))
