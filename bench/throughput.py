"""``bench throughput``: how fast fraudd drains a prefilled stream, and at what CPU cost.

The same transactions are drained, one run after the other, by fraudd and by the baselines, each
with the same number of processes and in a fresh namespace; fraudd's rate is reported as a ratio
of each baseline's. fraudd's output is then checked exactly against what was produced (no loss,
no duplicate, one alert per flagged transaction) and its decisions against the generator's labels.

Per Redis server (the one Redis, or each node of a cluster) the report adds which shards it serves
and their share of the transactions, its CPU per transaction of the drain and per transaction of
its own shards (what stays constant as shards and nodes grow, whatever the slots' placement), and
its keys and memory after the drain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import redis
from redis.cluster import RedisCluster

from bench.latency import scrape_stage_seconds
from bench.namespace import Namespace
from bench.runners import Consumers, Drain, Setup, measure_drain
from bench.traffic import generator
from bench.usage import redis_nodes
from fraudd.ingest import Publisher
from fraudd.localservers import free_port

BASELINES = ("bare", "naive")


@dataclass(frozen=True)
class Traffic:
    payloads: list[bytes]
    transaction_ids: np.ndarray
    is_fraud: np.ndarray

    @classmethod
    def generate(cls, seed: int, n: int, event_rate: float | None = None) -> Traffic:
        batch = generator(seed, n, event_rate).generate(n)
        return cls(batch.payloads(), batch.transaction_id, batch.is_fraud)


def run_drain(setup: Setup, kind: str, traffic: Traffic, n: int) -> tuple[Drain, dict, dict, dict[str, float]]:
    """Drain the first ``n`` transactions with ``kind`` (fraudd or a baseline) in a fresh namespace.

    Returns the drain and, for fraudd, the checks of its output, each Redis node's placement
    and state (``nodes``), and the workers' seconds per stage of the batch loop.
    """
    ns = Namespace.fresh(kind, setup.redis_url, setup.postgres_url)
    if kind == "fraudd":
        ns.shards = setup.shards
    client = setup.client
    consumers = None
    try:
        if kind != "bare":
            ns.migrate()
        ns.create_group(client)
        Publisher(client, ns.stream, ns.shards).publish(traffic.payloads[:n])
        placement = shard_placement(client, ns) if kind == "fraudd" else {}
        setup.echo(f"  {kind}: {n:,} entries on {ns.stream}, draining with {setup.workers} processes ...")
        log_path = setup.log_dir / f"{ns.name}.log"
        port = free_port()
        if kind == "fraudd":
            consumers = Consumers.fraudd(ns, [*setup.fraudd_args, "--metrics-port", str(port)], setup.workers, log_path)
        else:
            consumers = Consumers.baseline(
                kind, ns, setup.workers, setup.batch_size, log_path, setup.model_path if kind == "naive" else None
            )
        drain = measure_drain(client, ns, consumers, n)
        stages = scrape_stage_seconds(port) if kind == "fraudd" else {}
        exit_codes = consumers.stop()
        consumers = None
        if kind != "fraudd":
            return drain, {}, {}, {}
        return drain, check_output(client, ns, traffic, n, exit_codes), nodes_report(client, ns, drain, placement, n), stages
    finally:
        if consumers is not None:
            consumers.stop(timeout=10)
        ns.drop(client)


def by_stage(workers_cpu_us: float, stage_seconds: dict[str, float]) -> dict[str, float]:
    """The workers' CPU-µs per transaction split over the stages in proportion to their wall time
    (a stage waiting on Redis or PostgreSQL is credited with CPU it did not use: an approximation;
    the flame graph in RESULTS.md is the exact split)."""
    total = sum(stage_seconds.values())
    if not total:
        return {}
    return {stage: round(workers_cpu_us * seconds / total, 2) for stage, seconds in stage_seconds.items() if seconds}


def node_of(client: redis.Redis | RedisCluster, key: str) -> str:
    """``host:port`` of the node serving ``key`` (the one Redis off a cluster), as ``redis_nodes`` names it."""
    if isinstance(client, RedisCluster):
        return client.get_node_from_key(key).name
    return next(iter(redis_nodes(client)))


def shard_placement(client: redis.Redis | RedisCluster, ns: Namespace) -> dict[str, dict[int, int]]:
    """Per node: shard -> entries prefilled on it, for every shard the node serves."""
    placement: dict[str, dict[int, int]] = {}
    for shard, stream in enumerate(ns.streams):
        placement.setdefault(node_of(client, stream), {})[shard] = client.xlen(stream)
    return placement


def nodes_report(
    client: redis.Redis | RedisCluster, ns: Namespace, drain: Drain, placement: dict[str, dict[int, int]], n: int
) -> dict[str, dict]:
    """Each node's drain figures with its role, shards, share of the transactions, CPU per transaction
    of its own shards, the unsharded streams it serves (every shard's alerts and dead letters go
    there), and keys and memory now (before the namespace is dropped)."""
    unsharded = {"fraud": node_of(client, ns.fraud_stream), "dlq": node_of(client, ns.dlq_stream)}
    report = {}
    for name, node in redis_nodes(client).items():
        served = sum(placement.get(name, {}).values())
        figures = drain.usage.redis_nodes[name]
        info = node.info("everything")
        # The drain's window holds ``drain.transactions`` of the n, the node's share of them its own.
        in_window = drain.transactions * served / n
        report[name] = {
            "role": info["role"],
            "shards": sorted(placement.get(name, {})),
            "streams": [label for label, at in unsharded.items() if at == name],
            "transactions": served,
            **figures,
            "cpu_us_per_own_tx": round(figures["cpu_s"] * 1e6 / in_window, 2) if in_window else None,
            "keys": int(node.dbsize()),
            "used_memory_bytes": int(info["used_memory"]),
        }
    return report


def check_output(client: redis.Redis, ns: Namespace, traffic: Traffic, n: int, exit_codes: list[int]) -> dict:
    """Exact comparison of fraudd's output with the input, and detection quality against the labels."""
    rows = ns.sql("SELECT transaction_id, decision FROM transactions")
    stored = np.array([r[0] for r in rows], dtype=object)
    flagged_rows = np.array([r[1] != "approve" for r in rows], dtype=bool)
    produced = traffic.transaction_ids[:n]
    distinct = set(stored.tolist())
    produced_set = set(produced.tolist())
    is_fraud = traffic.is_fraud[:n]
    fraud_ids = set(produced[is_fraud].tolist())
    flagged = set(stored[flagged_rows].tolist())
    caught = len(fraud_ids & flagged)
    first, last, count = ns.sql("SELECT min(scored_at), max(scored_at), count(*) FROM transactions")[0]
    span = (last - first).total_seconds() if first else 0.0
    pending = sum(client.xpending(stream, ns.group)["pending"] for stream in ns.streams)
    alerts = client.xlen(ns.fraud_stream)
    return {
        "produced": n,
        "rows": len(stored),
        "distinct_transaction_ids": len(distinct),
        "missing": len(produced_set - distinct),
        "unexpected": len(distinct - produced_set),
        "duplicate_rows": len(stored) - len(distinct),
        "alerts": alerts,
        "flagged_rows": len(flagged),
        "dead_letters": client.xlen(ns.dlq_stream),
        "pending_after_drain": pending,
        "exit_codes": exit_codes,
        "exactly_once": len(stored) == len(distinct) == n
        and distinct == produced_set
        and alerts == len(flagged)
        and pending == 0,
        "decisions": dict(ns.sql("SELECT decision, count(*) FROM transactions GROUP BY 1")),
        "fraud_labelled": len(fraud_ids),
        "recall": round(caught / len(fraud_ids), 4) if fraud_ids else None,
        "precision": round(caught / len(flagged), 4) if flagged else None,
        # Cross-check of the group-based rate: scored_at is stamped once per batch before its COPY.
        "rate_from_scored_at": round(count / span, 1) if span > 0 else None,
    }


def run(setup: Setup, n: int, naive_n: int, seed: int, baselines: tuple[str, ...], event_rate: float | None = None) -> dict:
    """Every drain of one invocation; bare first and naive last, fraudd between them."""
    setup.echo(f"generating {max(n, naive_n):,} transactions (seed {seed}) ...")
    traffic = Traffic.generate(seed, max(n, naive_n), event_rate)
    order = [k for k in ("bare", "fraudd", "naive") if k == "fraudd" or k in baselines]
    drains: dict[str, dict] = {}
    checks: dict = {}
    for kind in order:
        drain, kind_checks, nodes, stages = run_drain(setup, kind, traffic, naive_n if kind == "naive" else n)
        drains[kind] = drain.as_dict()
        if stages:
            drains[kind]["worker_stages_cpu_us_per_tx"] = by_stage(drains[kind]["cpu_us_per_tx"].get("workers", 0.0), stages)
        if nodes:
            drains[kind]["redis_nodes"] = nodes
        checks = kind_checks or checks
        setup.echo(f"    {drain.rate:,.0f} tx/s, {drain.usage.pipeline_cpu_us_per_tx:.1f} CPU-µs/tx")
    fraudd_rate = drains["fraudd"]["rate_tx_per_s"]
    ratios = {
        f"fraudd_over_{k}": round(fraudd_rate / drains[k]["rate_tx_per_s"], 3)
        for k in baselines
        if drains[k]["rate_tx_per_s"] > 0
    }
    return {
        "transactions": n,
        "naive_transactions": naive_n if "naive" in baselines else 0,
        "seed": seed,
        "event_rate": event_rate,
        "drains": drains,
        "ratios": ratios,
        "checks": checks,
    }
