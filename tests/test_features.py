"""Behaviour features against a real Redis: exactly-once counting, event-time windows, bounds."""

from __future__ import annotations

import struct
import uuid

import numpy as np
import orjson
import pytest
import redis

from fraudd.generator import GeneratorConfig, TransactionGenerator
from fraudd.keys import Keys, shard_of, shard_stream
from fraudd.scoring import dedup, features_shared
from fraudd.scoring.behaviour import STATE
from fraudd.scoring.decode import DecodedBatch, decode_batch
from fraudd.scoring.features import (
    BLOCKLIST_KINDS,
    FEATURE_NAMES,
    LIBRARY_NAME,
    MESSAGE_FEATURES,
    SECONDS_SINCE_PREV_CAP,
    CommitConflictError,
    Features,
    FeatureStore,
    state_periods,
    stored_states,
)
from fraudd.scoring.features_owned import OwnedFeatureStore, compute_owned
from fraudd.scoring.features_shared import SharedFeatureStore
from fraudd.scoring.leases import Fenced, Lease

from .conftest import REDIS_URL

T0 = 1764385200.0  # 2025-11-29 03:00:00 UTC: mid 2-hour slot, on a 10-minute one
HOUR = 3600.0


@pytest.fixture()
def client() -> redis.Redis:
    r = redis.Redis.from_url(REDIS_URL)
    r.ping()
    return r


@pytest.fixture()
def keys(client: redis.Redis):
    """A stream name of the test's own, so its keys never meet another test's; removed after."""
    name = f"test-features-{uuid.uuid4().hex[:10]}"
    k = Keys(stream=f"{name}:raw", fraud_stream=f"{name}:fraud", dlq_stream=f"{name}:dlq")
    yield k
    stale = list(client.scan_iter(match=k.prefix.replace("{", "\\{").replace("}", "\\}") + "*", count=1000))
    if stale:
        client.delete(*stale)


@pytest.fixture()
def store(client: redis.Redis, keys: Keys) -> SharedFeatureStore:
    return SharedFeatureStore(client, keys, dedup_window_ms=3_600_000)


@pytest.fixture(params=["shared", "owned"])
def either_store(request: pytest.FixtureRequest, client: redis.Redis, keys: Keys) -> FeatureStore:
    """A shared store (compare-and-set), or the owner of the shard (markers checked in the commit)."""
    return open_store(client, keys, owned=request.param == "owned")


def open_store(client: redis.Redis, keys: Keys, owned: bool) -> FeatureStore:
    """A shared store, or one owning the shard through a lease it holds (for a minute)."""
    if not owned:
        return SharedFeatureStore(client, keys, 3_600_000)
    lease = Lease(keys.lease, "1:test")
    client.set(keys.lease, lease.token, px=60_000)
    return OwnedFeatureStore(client, keys, 3_600_000, lease)


_seq = iter(range(10**9))


def tx(ts: float, user: str = "alice", amount: float = 10.0, merchant: str = "shop", **extra) -> dict:
    return {
        "transaction_id": f"txn_{next(_seq)}",
        "user_id": user,
        "amount": amount,
        "merchant": merchant,
        "timestamp": ts,
        **extra,
    }


def batch(*txs: dict) -> DecodedBatch:
    decoded = decode_batch([f"{i}-0" for i in range(len(txs))], [orjson.dumps(t) for t in txs])
    assert not decoded.rejected
    return decoded


def col(features: Features, name: str) -> list[float]:
    return features.column(name).tolist()


def user_state(client: redis.Redis, keys: Keys, user: str) -> bytes | None:
    return stored_states(client, keys, [user])[0]


def test_feature_names_are_consistent(store: FeatureStore) -> None:
    assert FEATURE_NAMES[: len(MESSAGE_FEATURES)] == MESSAGE_FEATURES
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    features = store.compute(batch(tx(T0, mcc="7995", channel="atm", device_id="d", card_id="c")))
    assert features.matrix.dtype == np.float32 and features.matrix.shape == (1, len(FEATURE_NAMES))
    assert col(features, "log_amount") == pytest.approx([np.log1p(10.0)])
    assert col(features, "hour_utc") == [3.0]
    assert col(features, "mcc_high_risk") == [1.0]
    assert col(features, "channel") == [3.0]
    assert col(features, "has_device") == [1.0] and col(features, "has_card") == [1.0]
    assert col(features, "seconds_since_prev") == [SECONDS_SINCE_PREV_CAP]
    assert col(features, "amount_to_mean") == [1.0]


def test_redelivery_is_counted_once_and_scores_the_same(client: redis.Redis, keys: Keys, either_store: FeatureStore) -> None:
    store = either_store
    txs = [
        tx(T0 + i * 10, amount=10.0 + i, merchant=f"m{i % 2}", card_id="card1", country="US", device_id="d1") for i in range(4)
    ] + [tx(T0 + 5, user="bob", card_id="card2")]
    first = store.compute(batch(*txs))
    state = user_state(client, keys, "alice")
    again = store.compute(batch(*txs))

    assert not first.seen.any() and again.seen.all()
    assert user_state(client, keys, "alice") == state, "a redelivered batch must not change the state"
    np.testing.assert_allclose(again.matrix, first.matrix, rtol=1e-6)
    np.testing.assert_array_equal(again.event_ms, first.event_ms)
    assert col(first, "count_1m") == [1, 2, 3, 4, 1]
    assert col(first, "card_count_1m") == [1, 2, 3, 4, 1]


def test_producer_retry_keeps_the_original_event_time(either_store: FeatureStore) -> None:
    store = either_store
    original = tx(T0)
    retry = dict(original, timestamp=T0 + 30)
    store.compute(batch(original))
    features = store.compute(batch(retry))
    assert features.seen.tolist() == [True]
    assert features.event_ms.tolist() == [int(T0 * 1000)]
    assert col(features, "count_1m") == [1]


def test_duplicates_within_one_batch(client: redis.Redis, keys: Keys, either_store: FeatureStore) -> None:
    store = either_store
    a = tx(T0 + 20)
    # The copy arrives later in the batch but carries an earlier timestamp: the first in batch
    # order is still the original, and the copy is scored at the original's event time.
    copy = dict(a, timestamp=T0 + 1)
    features = store.compute(batch(a, copy, tx(T0 + 30)))
    assert features.seen.tolist() == [False, True, False]
    assert features.event_ms.tolist() == [int((T0 + 20) * 1000)] * 2 + [int((T0 + 30) * 1000)]
    assert col(features, "count_1h") == [1, 1, 2]
    np.testing.assert_allclose(features.matrix[1], features.matrix[0], rtol=1e-6)
    later = store.compute(batch(tx(T0 + 40)))
    assert col(later, "count_1h") == [3], "the copy must not have been counted"


def test_a_copy_after_more_of_its_users_transactions_scores_as_its_original(either_store: FeatureStore) -> None:
    # More of the user's transactions between the original and its copy than the state keeps
    # exactly (recent times, merchants, cards): evaluated against the batch's final state, the copy
    # would see fewer; it is the same transaction, so it gets its original's features. How many
    # such transactions share its batch depends on the batch (one shard or eight), so anything
    # else gives one transaction different decisions depending on the shard count.
    store = either_store
    first = tx(T0, merchant="m0", card_id="card1")
    burst = [tx(T0 + i, merchant=f"m{i}", card_id="card1") for i in range(1, 9)]
    features = store.compute(batch(first, *burst, first))
    assert features.seen.tolist() == [False] * 9 + [True]
    assert col(features, "count_1h") == [1, 2, 3, 4, 5, 6, 7, 8, 9, 1]
    np.testing.assert_array_equal(features.matrix[-1], features.matrix[0])


def test_event_time_windows(store: FeatureStore) -> None:
    # Minute: exact, window (t - 60 s, t].
    f = store.compute(batch(tx(T0), tx(T0 + 59), tx(T0 + 119.5)))
    assert col(f, "count_1m") == [1, 2, 1]
    assert col(f, "seconds_since_prev") == pytest.approx([SECONDS_SINCE_PREV_CAP, 59, 60.5])
    # Hour: 10-minute slots, the current one and the 5 before (50-60 min back).
    f = store.compute(batch(tx(T0 + 3599)))
    assert col(f, "count_1h") == [4] and col(f, "count_24h") == [4]
    f = store.compute(batch(tx(T0 + 3600)))
    assert col(f, "count_1h") == [2], "the slot at T0 has left the hour"
    # Two hours of silence resets the hour and keeps the day.
    f = store.compute(batch(tx(T0 + 3 * HOUR)))
    assert col(f, "count_1h") == [1] and col(f, "count_24h") == [6]
    assert col(f, "seconds_since_prev") == [2 * HOUR]
    # Day: 2-hour slots (from even hours), the current one and the 11 before (22-24 h back):
    # 03:00 the next day reaches back to 04:00, so T0 + 1 h is in and T0 + 3599 s is out.
    f = store.compute(batch(tx(T0 + 24 * HOUR)))
    assert col(f, "count_24h") == [3] and col(f, "amount_sum_24h") == [30.0]


def test_out_of_order_event_is_scored_at_its_own_time(store: FeatureStore) -> None:
    store.compute(batch(tx(T0), tx(T0 + 2 * HOUR)))
    late = store.compute(batch(tx(T0 + 30, amount=40.0)))
    assert col(late, "count_1m") == [2]
    assert col(late, "count_1h") == [2]
    assert col(late, "count_24h") == [2], "the transaction two hours later is not in its window"
    assert col(late, "amount_to_mean") == [4.0]
    after = store.compute(batch(tx(T0 + 2 * HOUR + 1)))
    assert col(after, "count_24h") == [4]


def test_amounts_and_mean(store: FeatureStore) -> None:
    f = store.compute(batch(tx(T0, amount=10.0), tx(T0 + 1, amount=30.0), tx(T0 + 2, amount=100.0)))
    assert col(f, "amount_sum_24h") == [10.0, 40.0, 140.0]
    assert col(f, "amount_to_mean") == pytest.approx([1.0, 3.0, 5.0])


def test_distinct_counts_and_first_seen(store: FeatureStore) -> None:
    f = store.compute(
        batch(
            tx(T0, merchant="a", country="US", device_id="d1"),
            tx(T0 + 60, merchant="b", country="US", device_id="d1"),
            tx(T0 + 120, merchant="a", country="FR", device_id="d2"),
            tx(T0 + 180, merchant="c"),
        )
    )
    assert col(f, "distinct_merchants_1h") == [1, 2, 2, 3]
    assert col(f, "distinct_countries_1h") == [1, 1, 2, 2]
    assert col(f, "new_merchant") == [1, 1, 0, 1]
    assert col(f, "new_country") == [1, 0, 1, 0], "absent country is never new"
    assert col(f, "new_device") == [1, 0, 1, 0]
    f = store.compute(batch(tx(T0 + 2 * HOUR, merchant="a", country="US", device_id="d1")))
    assert col(f, "distinct_merchants_1h") == [1] and col(f, "distinct_merchants_24h") == [3]
    assert col(f, "distinct_countries_1h") == [1] and col(f, "distinct_countries_24h") == [2]
    assert col(f, "new_merchant") == [0] and col(f, "new_device") == [0] and col(f, "new_country") == [0]


def test_card_counts_are_per_user_and_card(store: FeatureStore) -> None:
    # Card counters live in the user's state (one key per user): a card shared by two users is
    # counted per user, and a user's two cards separately.
    f = store.compute(
        batch(
            tx(T0, user="u1", card_id="shared"),
            tx(T0 + 1, user="u2", card_id="shared"),
            tx(T0 + 2, user="u2"),
            tx(T0 + 3, user="u2", card_id="other"),
            tx(T0 + 4, user="u2", card_id="shared"),
        )
    )
    assert col(f, "count_1m") == [1, 1, 2, 3, 4]
    assert col(f, "card_count_1m") == [1, 1, 0, 1, 2]
    assert col(f, "card_count_24h") == [1, 1, 0, 1, 2]


def test_blocklist_edits_apply_at_the_next_batch(client: redis.Redis, keys: Keys, either_store: FeatureStore) -> None:
    blocked = {"merchant": "evil", "device": "dev9", "ip": "10.0.0.9", "country": "KP", "card": "card9"}
    assert sorted(blocked) == sorted(BLOCKLIST_KINDS)
    b = batch(
        tx(T0, merchant="evil", device_id="dev9", ip="10.0.0.9", country="KP", card_id="card9"),
        tx(T0 + 1, merchant="fine", card_id="card1"),
    )
    before = either_store.compute(b)
    assert not any(flags.any() for flags in before.blocked.values())
    for kind, value in blocked.items():
        client.sadd(keys.blocklist(kind), value)
    after = either_store.compute(b)
    for kind in BLOCKLIST_KINDS:
        assert after.blocked[kind].tolist() == [True, False], kind
    client.srem(keys.blocklist("merchant"), "evil")
    client.srem(keys.blocklist("card"), "card9")
    again = either_store.compute(b)
    assert again.blocked["merchant"].tolist() == again.blocked["card"].tolist() == [False, False]


def test_function_reloaded_after_it_is_lost(client: redis.Redis, store: FeatureStore) -> None:
    # What FUNCTION FLUSH or a restart without persistence does to us, without wiping the
    # libraries of whoever else shares this Redis.
    client.function_delete(LIBRARY_NAME)
    features = store.compute(batch(tx(T0)))
    assert len(features) == 1
    assert client.function_list(library=LIBRARY_NAME), "the library is installed again"


def test_state_size_is_bounded(client: redis.Redis, keys: Keys, store: FeatureStore) -> None:
    def feed(user: str, count: int) -> None:
        for start in range(0, count, 500):
            store.compute(
                batch(
                    *(
                        tx(
                            T0 + i * 7.3,
                            user=user,
                            merchant=f"m{i}",
                            country="US" if i % 2 else "DE",
                            device_id=f"d{i}",
                            card_id=f"card-{user}",
                        )
                        for i in range(start, min(count, start + 500))
                    )
                )
            )

    feed("light", 50)
    feed("heavy", 10_000)
    light, heavy = user_state(client, keys, "light"), user_state(client, keys, "heavy")
    assert len(light) == len(heavy)
    assert 24 * 3600 * 1000 < client.pttl(state_periods(keys)[1]) <= 25 * 3600 * 1000
    counts = store.compute(batch(tx(T0 + 10_000 * 7.3, user="heavy")))
    assert col(counts, "count_1m") == [6], "the minute count is exact up to the recent-list size"
    assert 3000 / 7.3 < col(counts, "count_1h")[0] <= 3600 / 7.3 + 1


def test_empty_batch(store: FeatureStore) -> None:
    features = store.compute(batch())
    assert features.matrix.shape == (0, len(FEATURE_NAMES)) and len(features.seen) == 0


def test_already_counted_and_new_transactions_of_one_user(client: redis.Redis, keys: Keys, either_store: FeatureStore) -> None:
    store = either_store
    known = tx(T0)
    store.compute(batch(known))
    f = store.compute(batch(tx(T0 + 10), dict(known, timestamp=T0 + 20), tx(T0 + 30)))
    assert f.seen.tolist() == [False, True, False]
    assert f.event_ms.tolist() == [int((T0 + 10) * 1000), int(T0 * 1000), int((T0 + 30) * 1000)]
    assert col(f, "count_1m") == [2, 1, 3]
    assert struct.unpack_from("<dI", user_state(client, keys, "alice"))[1] == 3
    assert col(store.compute(batch(tx(T0 + 40))), "count_1m") == [4]


def test_a_state_written_meanwhile_is_read_again(client: redis.Redis, keys: Keys, store: SharedFeatureStore) -> None:
    other = SharedFeatureStore(client, keys, dedup_window_ms=3_600_000)
    read = store._read
    racing = [batch(tx(T0 + 1), tx(T0 + 2, user="bob"))]

    def read_then_race(*args):
        replies = read(*args)
        if racing:
            other.compute(racing.pop())  # another worker commits alice and bob between our read and commit
        return replies

    store._read = read_then_race
    f = store.compute(batch(tx(T0 + 3), tx(T0 + 4, user="carol")))
    assert not f.seen.any()
    assert col(f, "count_1m") == [2, 1]
    assert struct.unpack_from("<dI", user_state(client, keys, "alice"))[1] == 2


def test_endless_conflicts_raise(client: redis.Redis, keys: Keys, store: SharedFeatureStore, monkeypatch) -> None:
    read = store._read
    bump = iter(range(1, 10**6))

    def read_then_race(*args):
        replies = read(*args)
        state = np.zeros(1, dtype=STATE)
        state["n"] = next(bump)
        client.hset(state_periods(keys)[1], "alice", state.tobytes())
        return replies

    store._read = read_then_race
    monkeypatch.setattr(features_shared, "MAX_COMMIT_ATTEMPTS", 3)
    with pytest.raises(CommitConflictError):
        store.compute(batch(tx(T0)))
    assert not list(client.scan_iter(match=keys.seen_prefix.replace("{", "\\{").replace("}", "\\}") + "*")), (
        "no dedup marker is left behind"
    )


def test_markers_are_one_hash_per_event_minute_living_the_window(client: redis.Redis, keys: Keys) -> None:
    store = SharedFeatureStore(client, keys, dedup_window_ms=600_000)
    store.compute(batch(tx(T0), tx(T0 + 59.5, user="bob"), tx(T0 + 60)))
    buckets = sorted(client.scan_iter(match=keys.seen_prefix.replace("{", "\\{").replace("}", "\\}") + "*"))
    minute = int(T0 * 1000) // dedup.BUCKET_MS
    assert buckets == sorted(keys.seen_bucket(b).encode() for b in (minute, minute + 1))
    assert client.hlen(keys.seen_bucket(minute)) == 2 and client.hlen(keys.seen_bucket(minute + 1)) == 1
    assert 590_000 < client.pttl(keys.seen_bucket(minute)) <= 600_000


def test_a_marker_bucket_is_a_hash_table_of_its_markers_alone(
    client: redis.Redis, keys: Keys, either_store: FeatureStore
) -> None:
    """A listpack bucket (as a worker of the release before leaves one) is scanned for every marker
    added or looked up: the commit, shared or owned, makes new and listpack buckets hash tables,
    and the field that converts them leaves with it."""
    store = either_store
    minute = int(T0 * 1000) // dedup.BUCKET_MS
    counted = tx(T0)
    client.hset(keys.seen_bucket(minute), counted["transaction_id"], int(T0 * 1000) - minute * dedup.BUCKET_MS)
    assert client.object("encoding", keys.seen_bucket(minute)) == b"listpack"
    txs = [counted, tx(T0 + 1, user="bob"), tx(T0 + 60)]
    assert store.compute(batch(*txs)).seen.tolist() == [True, False, False]
    for b, ids in ((minute, txs[:2]), (minute + 1, txs[2:])):
        assert client.object("encoding", keys.seen_bucket(b)) == b"hashtable"
        assert sorted(client.hkeys(keys.seen_bucket(b))) == sorted(t["transaction_id"].encode() for t in ids)


def test_was_seen_answers_for_counted_transactions_only(client: redis.Redis, keys: Keys, store: FeatureStore) -> None:
    counted = [tx(T0), tx(T0 + 3600, user="bob")]
    store.compute(batch(*counted))
    ids = [t["transaction_id"] for t in counted]
    asked = dedup.was_seen(client, keys, ids + ["txn_never", ids[0]], [T0, T0 + 3600, T0, T0 + 30])
    # A resend stamped within its original's minute is recognised, as the worker would.
    assert asked == [True, True, False, True]
    assert dedup.was_seen(client, keys, [], []) == []


@pytest.mark.parametrize("owned", [False, True])
def test_states_follow_the_latest_period(client: redis.Redis, keys: Keys, owned: bool) -> None:
    """A state from the period before is read and carried into this one; one written a period
    ahead (another host's clock) is the latest copy, and later writes go there, not behind it."""
    before, current, after = state_periods(keys)
    open_store(client, keys, owned).compute(batch(tx(T0), tx(T0 + 1, user="bob")))
    client.rename(current, before)
    f = open_store(client, keys, owned).compute(batch(tx(T0 + 2)))
    assert col(f, "count_1m") == [2]
    assert client.hkeys(current) == [b"alice"] and struct.unpack_from("<dI", client.hget(current, "alice"))[1] == 2
    client.rename(current, after)
    store = open_store(client, keys, owned)
    assert col(store.compute(batch(tx(T0 + 3), tx(T0 + 4, user="carol"))), "count_1m") == [3, 1]
    assert not client.exists(current), "written where the latest copy is"
    assert sorted(client.hkeys(after)) == [b"alice", b"carol"]
    assert [struct.unpack_from("<dI", s)[1] for s in stored_states(client, keys, ["alice", "bob", "carol"])] == [3, 1, 1]


def test_an_owner_whose_lease_changed_hands_writes_nothing(client: redis.Redis, keys: Keys) -> None:
    lease = Lease(keys.lease, "1:test")
    client.set(keys.lease, lease.token, px=60_000)
    store = OwnedFeatureStore(client, keys, 3_600_000, lease)
    store.compute(batch(tx(T0)))
    client.set(keys.lease, "2:another-owner", px=60_000)
    fenced = batch(tx(T0 + 1), tx(T0 + 2, user="bob"))
    with pytest.raises(Fenced):
        store.compute(fenced)
    assert dedup.was_seen(client, keys, fenced.transaction_id, fenced.timestamp.tolist()) == [False, False]
    assert struct.unpack_from("<dI", user_state(client, keys, "alice"))[1] == 1
    assert user_state(client, keys, "bob") is None
    client.set(keys.lease, lease.token, px=60_000)
    assert col(store.compute(batch(tx(T0 + 3))), "count_1m") == [2], "back from what Redis holds"


def test_a_read_over_shards_gives_each_shard_what_it_alone_would(client: redis.Redis) -> None:
    """A read's shards are computed as one batch, yet apart in everything: each shard's features and
    stored states are those of its part computed alone, with duplicates, redeliveries, a user and a
    transaction id in two shards' parts (streams written under an earlier shard count), a shard
    fenced out at the read, which leaves the others computed, and blocklists filled on two shards
    after reads found them empty."""
    generated = TransactionGenerator(GeneratorConfig(seed=5, tx_per_second=20.0, n_users=300)).generate(1_200)
    payloads = [p for p in generated.with_faults(0.05, 0.0, np.random.default_rng(2)).payloads if p is not None]
    name = f"test-features-{uuid.uuid4().hex[:10]}"
    shards = 3
    together, alone = (
        [Keys(shard_stream(f"{name}:{side}:raw", shards, k), f"{name}:fraud", f"{name}:dlq") for k in range(shards)]
        for side in ("together", "alone")
    )
    stores = [[open_store(client, k, owned=True) for k in side] for side in (together, alone)]
    try:
        for r, start in enumerate(range(0, len(payloads), 200)):
            read = decode_batch([f"{i}-0" for i in range(200)], payloads[start : start + 200])
            rows = [[i for i, user in enumerate(read.user_id) if shard_of(user, shards) == k] for k in range(shards)]
            rows[1] += rows[0][:3]  # a user in two shards' parts
            rows[2] += rows[0][3:4] + rows[1][:1]  # and a transaction in two, of its own user and of another's
            parts = [read.take(part) for part in rows]
            if r == 2:
                client.set(together[1].lease, "2:another-owner", px=60_000)
            filled = {0: "merchant", 2: "card"} if r == 3 else {}
            for k, kind in filled.items():
                value = next(v for v in (parts[k].merchant if kind == "merchant" else parts[k].card_id) if v is not None)
                for side in (together, alone):
                    client.sadd(side[k].blocklist(kind), value)
            computed = compute_owned(list(zip(stores[0], parts)))
            for k, (part, features) in enumerate(zip(parts, computed)):
                if k in filled:
                    assert isinstance(features, Features) and features.blocked[filled[k]].any()
                if r == 2 and k == 1:
                    assert isinstance(features, Fenced)
                    client.set(together[1].lease, "1:test", px=60_000)
                    continue
                expected = stores[1][k].compute(part)
                assert isinstance(features, Features)
                assert features.matrix.tobytes() == expected.matrix.tobytes()
                assert (
                    features.seen.tolist() == expected.seen.tolist() and features.event_ms.tolist() == expected.event_ms.tolist()
                )
                assert all(features.blocked[kind].tolist() == expected.blocked[kind].tolist() for kind in BLOCKLIST_KINDS)
                users = sorted(set(part.user_id))
                assert stored_states(client, together[k], users) == stored_states(client, alone[k], users)
    finally:
        for side in (together, alone):
            for k in side:
                stale = list(client.scan_iter(match=k.prefix.replace("{", "\\{").replace("}", "\\}") + "*", count=1000))
                if stale:
                    client.delete(*stale)
