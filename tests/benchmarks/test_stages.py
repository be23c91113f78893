"""Per-stage micro-benchmarks of the scoring hot path, each on a batch of 1,000 transactions (the
settle stage's also on one of 130, a read at half load, where a batch's fixed costs show).

Run on demand, not in the default test run (``pyproject.toml`` keeps this directory out of it):

    .venv/bin/pytest tests/benchmarks --benchmark-columns=min,median,mean,stddev,rounds

Figures divide by the batch's rows to give µs per transaction; ``bench/RESULTS.md`` keeps the latest. They
time the worker's own CPU per stage; what Redis and PostgreSQL spend is ``python -m bench``'s.
Features run against the machine's Redis (its round trip and commit are part of the stage).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import redis

from fraudd.generator import GeneratorConfig, TransactionGenerator
from fraudd.keys import Keys, shard_of, shard_stream
from fraudd.runtime.deadletters import Rejected
from fraudd.runtime.process import keep_freed_memory
from fraudd.runtime.redis_wire import pack
from fraudd.scoring import behaviour, joined, pgbinary
from fraudd.scoring.decode import DecodedBatch, decode_batch
from fraudd.scoring.features import FEATURE_NAMES, Features, FeatureStore, Prepared, message_columns, prepare, split_states
from fraudd.scoring.features_owned import OwnedFeatureStore, compute_owned
from fraudd.scoring.features_shared import SharedFeatureStore
from fraudd.scoring.leases import Fenced, Lease
from fraudd.scoring.model import FraudModel
from fraudd.scoring.rules import Rules
from fraudd.scoring.settings import DEFAULT_MODEL, DEFAULT_RULES
from fraudd.scoring.sinks import AlertDocument, DecisionStore, ScoredBatch, Settler, _copy_binary, alert_documents
from fraudd.scoring.worker import score_batch, scored_batch

from ..conftest import REDIS_URL, Namespace, migrated_namespace

BATCH = 1_000
HALF_LOAD = 130  # what a read holds at half the throughput a worker sustains
ROUNDS = 40  # features: each round scores a batch never seen before, as the worker does
COPY_ROUNDS = 300  # each encodes a batch of its own, as the worker does


@pytest.fixture(scope="module", autouse=True)
def worker_heap() -> None:
    """Allocate as a scoring worker does (its ``worker_main``), or every stage pays page faults the
    worker does not."""
    keep_freed_memory()


@pytest.fixture(scope="module")
def payload_batches() -> list[list[bytes]]:
    return generated_batches(1000.0)


def generated_batches(tx_per_second: float) -> list[list[bytes]]:
    """ROUNDS + 1 batches at an event-time pace of ``tx_per_second`` over the generator's users."""
    generated = TransactionGenerator(GeneratorConfig(seed=3, tx_per_second=tx_per_second)).generate(BATCH * (ROUNDS + 1))
    payloads = generated.payloads()
    return [payloads[i : i + BATCH] for i in range(0, len(payloads), BATCH)]


def decoded(payloads: list[bytes]) -> DecodedBatch:
    return decode_batch([f"{int(time.time() * 1000)}-{i}" for i in range(len(payloads))], payloads)


@pytest.fixture(scope="module")
def keys() -> Iterator[Keys]:
    name = f"bench-{uuid.uuid4().hex[:10]}"
    k = Keys(f"{name}:raw", f"{name}:fraud", f"{name}:dlq")
    yield k
    remove_keys(redis.Redis.from_url(REDIS_URL), k.prefix)


def remove_keys(client: redis.Redis, *prefixes: str) -> None:
    """Every key under ``prefixes``, a benchmark's own, in a few UNLINKs."""
    stale = [
        key
        for prefix in prefixes
        for key in client.scan_iter(match=prefix.replace("{", "\\{").replace("}", "\\}") + "*", count=10_000)
    ]
    for start in range(0, len(stale), 1000):
        client.unlink(*stale[start : start + 1000])


@pytest.fixture(scope="module")
def store(keys: Keys) -> FeatureStore:
    return SharedFeatureStore(redis.Redis.from_url(REDIS_URL, protocol=2), keys, dedup_window_ms=3_600_000)


@pytest.fixture(scope="module")
def model() -> FraudModel:
    return FraudModel.load(DEFAULT_MODEL, FEATURE_NAMES)


@pytest.fixture(scope="module")
def scored(payload_batches: list[list[bytes]], store: FeatureStore, model: FraudModel) -> ScoredBatch:
    batch = decoded(payload_batches[-1])
    features = store.compute(batch)
    rules = Rules.load(DEFAULT_RULES)
    decided = score_batch(model, rules, features, model.review_threshold, model.decline_threshold)
    return scored_batch(batch, features, decided, model.version, rules.version)


def test_decode(benchmark, payload_batches: list[list[bytes]]) -> None:
    batch = benchmark(decoded, payload_batches[0])
    assert len(batch) == BATCH and not batch.rejected


def test_features(benchmark, payload_batches: list[list[bytes]], store: FeatureStore) -> None:
    batches = iter([decoded(p) for p in payload_batches[:ROUNDS]])
    features: Features = benchmark.pedantic(store.compute, setup=lambda: ((next(batches),), {}), rounds=ROUNDS)
    assert features.matrix.shape == (BATCH, len(FEATURE_NAMES)) and not features.seen.any()


def test_features_of_half_load_reads(benchmark, payload_batches: list[list[bytes]], keys: Keys) -> None:
    """``test_features`` on reads of HALF_LOAD entries, where what a read costs whatever its size
    (its round trips, its numpy calls) counts most; a store of its own, so none is seen before."""
    client = redis.Redis.from_url(REDIS_URL, protocol=2)
    half = Keys(f"{keys.stream}:half", keys.fraud_stream, keys.dlq_stream)
    store = SharedFeatureStore(client, half, dedup_window_ms=3_600_000)
    batches = iter([decoded(p[:HALF_LOAD]) for p in payload_batches[:ROUNDS]])
    try:
        features: Features = benchmark.pedantic(store.compute, setup=lambda: ((next(batches),), {}), rounds=ROUNDS)
    finally:
        remove_keys(client, half.prefix)
    assert features.matrix.shape == (HALF_LOAD, len(FEATURE_NAMES)) and not features.seen.any()


def test_features_preparation(benchmark, payload_batches: list[list[bytes]]) -> None:
    """A batch's columns made ready for the behaviour arithmetic (users, hashes, copies, the values
    to look up in the blocklists) and its message columns: the features stage without Redis."""
    batch = decoded(payload_batches[0])

    def preparation() -> Prepared:
        message_columns(batch)
        return prepare(batch)

    p = benchmark(preparation)
    assert len(p.tx.user) == BATCH and len(p.names) > BATCH // 2


@pytest.mark.parametrize(
    ("tx_per_second", "size"),
    [(1000.0, BATCH), (1.0, BATCH), (1.0, 130)],
    ids=["1-second-batches", "17-minute-batches", "130-entry-batches"],
)
def test_behaviour_arithmetic(benchmark, payload_batches: list[list[bytes]], tx_per_second: float, size: int) -> None:
    """The behaviour states of a batch's users decoded, its transactions applied and evaluated, the
    written states encoded: the worker's own part of the features stage, without Redis.

    A batch spanning more event time holds more transactions per user (bursts of fraud whole, not
    cut over batches): more rounds of the arithmetic, each costing its numpy calls. Batches of 130
    are a worker's at half load: a round after the first holds few rows, so what a round costs
    whatever its width counts most. Each call computes the ``BATCH // size`` batches that follow
    ROUNDS * BATCH transactions of history (their rounds vary), so divide by their transactions."""
    if tx_per_second != 1000.0:
        payload_batches = generated_batches(tx_per_second)
    payloads = [payload for batch in payload_batches for payload in batch]
    history = ROUNDS * BATCH
    stored: dict[str, bytes] = {}
    timed: list[tuple[Prepared, list[bytes | None]]] = []
    for start in range(0, history + size * (BATCH // size), size):
        p = prepare(decoded(payloads[start : start + size]))
        blobs = [stored.get(name) for name in p.names]
        if start >= history:
            timed.append((p, blobs))
        states = behaviour.decode(blobs)  # the users' states as the earlier batches left them
        behaviour.compute(states, p.tx)
        stored.update(zip(p.names, split_states(behaviour.encode(states, np.arange(len(p.names))))))

    def arithmetic() -> np.ndarray:
        for p, blobs in timed:
            states = behaviour.decode(blobs)
            columns = behaviour.compute(states, p.tx)
            behaviour.encode(states, np.unique(p.tx.user))
        return columns

    columns = benchmark(arithmetic)
    p, blobs = timed[-1]
    assert columns.shape == (size, len(behaviour.BEHAVIOUR_FEATURES)) and sum(b is not None for b in blobs) > size // 4


@pytest.mark.parametrize("shards", [1, 4])
@pytest.mark.parametrize("read", [BATCH, 40], ids=["1000-entry-reads", "40-entry-reads"])
def test_features_of_owned_shards(benchmark, payload_batches: list[list[bytes]], keys: Keys, shards: int, read: int) -> None:
    """One read's features on owned shards, the read's transactions spread over ``shards`` by user:
    the parts prepared and computed as one batch, every shard read in one round trip and committed
    in one MULTI/EXEC fenced by each lease (``compute_owned``), so a read's cost should not grow
    with its shards. Small reads (a moderate load) show what a read costs whatever its size."""
    client = redis.Redis.from_url(REDIS_URL, protocol=2)
    stores = []
    for k in range(shards):
        shard = Keys(
            shard_stream(keys.stream, shards, k) if shards > 1 else f"{keys.stream}:owned", keys.fraud_stream, keys.dlq_stream
        )
        lease = Lease(shard.lease, "1:bench")
        client.set(lease.key, lease.token, px=600_000)
        stores.append(OwnedFeatureStore(client, shard, 3_600_000, lease))

    def parts(payloads: list[bytes]) -> list[tuple[OwnedFeatureStore, DecodedBatch]]:
        batch = decoded(payloads)
        rows = [[i for i, user in enumerate(batch.user_id) if shard_of(user, shards) == k] for k in range(shards)]
        return [(store, batch.take(part)) for store, part in zip(stores, rows)]

    reads = iter([parts(p[:read]) for p in payload_batches[:ROUNDS]])
    try:
        features = benchmark.pedantic(compute_owned, setup=lambda: ((next(reads),), {}), rounds=ROUNDS)
    finally:
        remove_keys(client, *(store._keys.prefix for store in stores))
    assert sum(len(f) for f in features if isinstance(f, Features)) == read and not any(isinstance(f, Fenced) for f in features)


def test_inference_and_rules(benchmark, payload_batches: list[list[bytes]], store: FeatureStore, model: FraudModel) -> None:
    features = store.compute(decoded(payload_batches[-2]))
    rules = Rules.load(DEFAULT_RULES)
    scores, decision, *_ = benchmark(score_batch, model, rules, features, model.review_threshold, model.decline_threshold)
    assert scores.shape == (BATCH,) and decision.max() <= 2


@pytest.mark.parametrize("shards", [1, 4])
def test_scoring_of_a_read_over_shards(
    benchmark, payload_batches: list[list[bytes]], store: FeatureStore, model: FraudModel, shards: int
) -> None:
    """One read's scoring, its 1,000 transactions spread over ``shards`` by user: the parts joined,
    scored in one inference call and split back into the parts (``joined``), as the worker does,
    so the cost per transaction should not grow with the shards of a read."""
    whole = decoded(payload_batches[-2])
    features = store.compute(whole)
    rows = [[i for i, user in enumerate(whole.user_id) if shard_of(user, shards) == k] for k in range(shards)]
    parts = [whole.take(part) for part in rows]
    part_features = [_features_of(features, part) for part in rows]
    rules = Rules.load(DEFAULT_RULES)

    def score() -> list[ScoredBatch]:
        together = joined.features(part_features)
        decided = score_batch(model, rules, together, model.review_threshold, model.decline_threshold)
        return joined.split(scored_batch(joined.batches(parts), together, decided, model.version, rules.version), parts)

    scored = benchmark(score)
    assert [len(part) for part in scored] == [len(part) for part in rows] and sum(map(len, scored)) == BATCH


def _features_of(features: Features, rows: list[int]) -> Features:
    """The features of some rows of a batch, as a shard's part of a read has them."""
    index = np.asarray(rows, dtype=np.intp)
    return Features(
        features.matrix[index],
        features.seen[index],
        features.event_ms[index],
        {kind: flags[index] for kind, flags in features.blocked.items()},
        features.amount[index],
        {name: column[index] for name, column in features.confirmed.items()},
        features.published_rules,
    )


@pytest.mark.parametrize("flagged", [32, 256], ids=["a 1,000-entry read's flagged rows", "a 10,000-entry read's"])
def test_explanations_of_flagged_rows(
    benchmark, payload_batches: list[list[bytes]], store: FeatureStore, model: FraudModel, flagged: int
) -> None:
    """The exact contributions of the flagged rows of one read (≈ 2.7% of it), explained in one
    call as ``score_batch`` does; the figure divided by ``flagged`` is the cost per flagged row."""
    features = store.compute(decoded(payload_batches[-3]))
    rows = features.matrix[np.argsort(-model.score(features.matrix))[:flagged]]
    reasons, explanations = benchmark(model.explain, rows)
    assert len(explanations) == flagged and all(e is not None for e in explanations)


@pytest.mark.parametrize("rows", [BATCH, HALF_LOAD], ids=["1000-entry-reads", "130-entry-reads"])
@pytest.mark.parametrize("missing", [0, 10], ids=["complete", "optional fields missing in 1 of 10"])
def test_copy_encoding(benchmark, scored: ScoredBatch, missing: int, rows: int) -> None:
    """The batch's binary COPY; every ``missing``-th row without location, card, device and IP (the
    generator always sends them, real gateways not), whose NULLs are patched in per row."""
    scored = scored.take(range(rows))
    for i in range(0, rows, missing) if missing else ():
        scored.batch.lat[i] = scored.batch.lon[i] = np.nan
        scored.batch.card_id[i] = scored.batch.device_id[i] = scored.batch.ip[i] = None

    def fresh() -> tuple[tuple[list[ScoredBatch]], dict]:
        """The batch as scored: its explanations not yet made JSON (the COPY makes it)."""
        return ([scored.take(range(rows), scored.batch)],), {}

    data = benchmark.pedantic(_copy_binary, setup=fresh, rounds=COPY_ROUNDS)
    assert data.startswith(pgbinary.HEADER) and data.endswith(pgbinary.TRAILER) and len(data) > rows * 200
    assert data.count(pgbinary.NULL) >= (5 * rows // missing if missing else 0)


@pytest.fixture(scope="module")
def namespace() -> Iterator[Namespace]:
    yield from migrated_namespace(redis.Redis.from_url(REDIS_URL, protocol=2))


@pytest.mark.parametrize("rows", [BATCH, HALF_LOAD], ids=["1000-entry-reads", "130-entry-reads"])
def test_copy_into_postgres(benchmark, scored: ScoredBatch, namespace: Namespace, rows: int) -> None:
    """Encoding and the COPY of a batch of new transactions, as the worker stores them (the round
    trip included; ``--benchmark-timer=time.process_time`` gives the worker's CPU alone)."""
    store = DecisionStore(namespace.postgres_url, namespace.schema)
    rounds = iter(range(ROUNDS))

    def fresh() -> tuple[tuple[ScoredBatch], dict]:
        batch = scored.take(range(rows))
        suffix = f"-{rows}-{next(rounds)}"
        batch.batch.transaction_id = [t + suffix for t in batch.batch.transaction_id]
        return (batch,), {}

    benchmark.pedantic(store.store, setup=fresh, rounds=ROUNDS)
    store.close()
    assert namespace.sql("SELECT count(*) FROM transactions WHERE transaction_id LIKE %s", (f"%-{rows}-%",)) == [(rows * ROUNDS,)]


@pytest.mark.parametrize("rows", [BATCH, HALF_LOAD], ids=["1000-entry-reads", "130-entry-reads"])
def test_settle_encoding(benchmark, scored: ScoredBatch, keys: Keys, rows: int) -> None:
    """Alert documents, the script's arguments and their RESP packing, as the worker sends them."""
    scored = scored.take(range(rows))
    _copy_binary([scored])  # made the explanations' JSON, which the alerts carry too, as in the worker
    settler = Settler(redis.Redis.from_url(REDIS_URL, protocol=2), keys, "group", "consumer", 3_600_000)

    def encode() -> bytes:
        return pack(settler.command(scored.entry_ids, alert_documents(scored), [], {}))

    packed = benchmark(encode)
    assert len(packed) > rows * 10
    assert np.count_nonzero(scored.decision) == len(alert_documents(scored))


@pytest.mark.parametrize("rows", [BATCH, HALF_LOAD], ids=["1000-entry-reads", "130-entry-reads"])
def test_settle_call(benchmark, scored: ScoredBatch, keys: Keys, rows: int) -> None:
    """``test_settle_encoding`` and the script's round trip: the batch's entries acked, its alerts
    (new transactions each round) written, as the worker settles a read on one Redis."""
    client = redis.Redis.from_url(REDIS_URL, protocol=2)
    group = f"group-{rows}"
    client.xgroup_create(keys.stream, group, id="0", mkstream=True)
    settler = Settler(client, keys, group, "consumer", 3_600_000)
    rounds = iter(range(ROUNDS))

    def fresh() -> tuple[tuple[list[str], list[AlertDocument], list[Rejected]], dict]:
        batch = scored.take(range(rows))
        suffix = f"-{rows}-{next(rounds)}"
        batch.batch.transaction_id = [t + suffix for t in batch.batch.transaction_id]
        _copy_binary([batch])  # made the explanations' JSON, which the alerts carry too, as in the worker
        return (batch.entry_ids, alert_documents(batch), []), {}

    try:
        settled = benchmark.pedantic(settler.settle, setup=fresh, rounds=ROUNDS)
        assert settled.alerts == len(alert_documents(scored.take(range(rows)))) > 0
    finally:
        client.delete(keys.stream, keys.fraud_stream)
