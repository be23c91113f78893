"""``bench redis-instructions``: Redis's instructions per transaction of the scoring's Redis calls.

Redis's CPU time per command (INFO commandstats) moves 1.3-3x with the machine's load, so a small
change in what a batch asks of Redis drowns in it. This mode replays the Redis side of scoring
(the workers' reads of new entries over their shards, the features read and commit, the settle
with an alert for about one transaction in 32) against a private ``redis-server`` run under
``valgrind --tool=callgrind``, counting only while the replay runs: the same transactions give
the same instruction count on a busy box and a quiet one, so a before/after pair needs no
alternation. No model and no PostgreSQL: what they decide does not change what Redis does,
beyond which transactions alert.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import orjson
import redis

from bench.traffic import generator
from fraudd.ingest import Publisher
from fraudd.keys import Keys, shard_streams
from fraudd.localservers import free_port, scratch_dir, wait_until
from fraudd.runtime.consumer import read_entries
from fraudd.runtime.redis_wire import round_trip
from fraudd.scoring.decode import DecodedBatch, decode_batch
from fraudd.scoring.dedup import buckets
from fraudd.scoring.features import FeatureStore
from fraudd.scoring.features_owned import OwnedFeatureStore, compute_owned
from fraudd.scoring.features_shared import SharedFeatureStore
from fraudd.scoring.leases import Lease
from fraudd.scoring.sinks import SETTLE_SCRIPT, AlertDocument, Settler, settle_together

GROUP = "fraud-group"
WINDOW_MS = 3_600_000
# The commands whose inclusive instruction counts the report breaks the total into.
COMMANDS = ("xreadCommand", "execCommand", "fcallCommand", "evalShaCommand", "hmgetCommand", "hsetCommand", "xackCommand")


def measure(n: int, shards: int, workers: int, batch_size: int, event_rate: float, resent_every: int, echo) -> dict:
    """Instructions of ``redis-server`` per transaction while ``workers`` consumers drain ``n``
    transactions (and every ``resent_every``-th again, a producer's resend) over ``shards``."""
    directory = scratch_dir("fraudd-callgrind-")
    port = free_port()
    out = directory / "callgrind.out"
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", "redis-server"]
        + ["--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, protocol=2)
    try:
        wait_until(lambda: _answers(client), 60, "redis-server under valgrind")
        payloads = generator(7, n, event_rate).generate(n).payloads()
        payloads += payloads[::resent_every] if resent_every else []
        echo(f"  {len(payloads):,} entries over {shards} shard(s), drained by {workers} consumer(s) ...")
        Publisher(client, "bench:transactions:raw", shards).publish(payloads)
        owned = _consumers(client, shards, workers)
        client.script_load(SETTLE_SCRIPT)
        subprocess.run(["callgrind_control", "-i", "on", str(server.pid)], check=True, capture_output=True)
        drained = _drain(client, owned, batch_size, shards > 1)
        subprocess.run(["callgrind_control", "-i", "off", str(server.pid)], check=True, capture_output=True)
        client.shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # the shutdown's
    finally:
        server.wait(timeout=120)
    total, by_command = _counts(out)
    shutil.rmtree(directory, ignore_errors=True)
    return {
        "transactions": drained,
        "shards": shards,
        "workers": workers,
        "instructions_per_tx": total / drained,
        "by_command_per_tx": {name: count / drained for name, count in by_command.items()},
    }


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _consumers(client: redis.Redis, shards: int, workers: int) -> list[list[tuple[str, FeatureStore, Settler]]]:
    """Per consumer, its shards (shard k goes to consumer k mod workers): stream, store, settler."""
    owned: list[list[tuple[str, FeatureStore, Settler]]] = [[] for _ in range(workers)]
    for k, stream in enumerate(shard_streams("bench:transactions:raw", shards)):
        client.xgroup_create(stream, GROUP, "0")
        keys = Keys(stream, "bench:transactions:fraud", "bench:transactions:dlq")
        for w in range(workers) if shards == 1 else [k % workers]:
            lease = None if shards == 1 else Lease(keys.lease, f"1:consumer-{w}")
            if lease is not None:
                client.set(lease.key, lease.token)
            store: FeatureStore = (
                SharedFeatureStore(client, keys, WINDOW_MS)
                if lease is None
                else OwnedFeatureStore(client, keys, WINDOW_MS, lease)
            )
            owned[w].append((stream, store, Settler(client, keys, GROUP, f"consumer-{w}", WINDOW_MS, lease)))
    return owned


def _drain(client: redis.Redis, owned: list[list[tuple[str, FeatureStore, Settler]]], batch_size: int, sharded: bool) -> int:
    """The consumers in turn, each one read of all its shards' new entries at a time, until none is left."""
    drained = idle = turn = 0
    while idle < len(owned):
        mine = owned[turn % len(owned)]
        turn += 1
        streams = [stream for stream, _store, _settler in mine]
        count = -(-batch_size // len(streams))
        read = ("XREADGROUP", "GROUP", GROUP, f"consumer-{turn % len(owned)}", "COUNT", count, "STREAMS", *streams)
        (reply,) = round_trip(client, [(*read, *([">"] * len(streams)))])
        idle = 0 if reply else idle + 1
        by_stream = {name.decode(): raw for name, raw in reply or []}
        parts = []
        for stream, store, settler in mine:
            if by_stream.get(stream):
                entries = read_entries(by_stream[stream])
                parts.append((store, settler, entries.ids, decode_batch(entries.ids, entries.payloads)))
                drained += len(entries.ids)
        if sharded:
            compute_owned([(store, batch) for store, _settler, _ids, batch in parts])
            settle_together(client, [(settler, ids, _alerts(batch), [], {}) for _store, settler, ids, batch in parts])
        else:
            for store, settler, ids, batch in parts:
                store.compute(batch)
                settler.settle(ids, _alerts(batch), [])
    return drained


def _alerts(batch: DecodedBatch) -> list[AlertDocument]:
    """An alert for about one transaction in 32 (as many as the shipped model flags), 500 bytes each."""
    bucket = buckets(np.round(batch.timestamp * 1000.0).astype(np.int64)).tolist()
    return [
        AlertDocument(txid, bucket[i], orjson.dumps({"transaction_id": txid, "row": "x" * 480}))
        for i, txid in enumerate(batch.transaction_id)
        if zlib.crc32(txid.encode()) % 32 == 0
    ]


def _counts(out: Path) -> tuple[int, dict[str, int]]:
    """The total and the inclusive instruction counts of COMMANDS, from callgrind_annotate."""
    annotated = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(out)], check=True, capture_output=True, text=True
    ).stdout
    total = 0
    by_command: dict[str, int] = {}
    for line in annotated.splitlines():
        match = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S+)", line)
        if not match:
            continue
        count, where = int(match.group(1).replace(",", "")), match.group(2)
        if where == "PROGRAM":
            total = count
        name = where.rsplit(":", 1)[-1]
        if name in COMMANDS:
            by_command[name] = max(by_command.get(name, 0), count)
    return total, by_command


def format_result(result: dict) -> str:
    commands = ", ".join(f"{name.removesuffix('Command')} {count:,.0f}" for name, count in result["by_command_per_tx"].items())
    return (
        f"redis-server instructions per transaction ({result['transactions']:,} tx, {result['shards']} shard(s), "
        f"{result['workers']} consumers): {result['instructions_per_tx']:,.0f}\n  inclusive, per command: {commands}"
    )
