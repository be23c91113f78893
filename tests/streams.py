"""Stream-side helpers for the failure tests: publishing odd entries and reading the group's state."""

from __future__ import annotations

import time
from collections.abc import Sequence

import orjson
import redis

from fraudd.ingest import Publisher
from fraudd.keys import shard_stream
from fraudd.learning.labels import Label, label_entries

from .conftest import Namespace, wait_for

NOW = int(time.time())


def payload(txid: str, user: str = "user_1", amount: float = 42.5, merchant: str = "Amazon", ts: float = NOW - 60) -> bytes:
    """One valid input message (DESIGN.md's shape)."""
    return orjson.dumps({"transaction_id": txid, "user_id": user, "amount": amount, "merchant": merchant, "timestamp": ts})


def publish_labels(client: redis.Redis, stream: str, labels: list[Label]) -> None:
    """Append ``labels`` to the labels stream in one round trip, as a source of labels other than
    the ingest would."""
    pipe = client.pipeline(transaction=False)
    for command in label_entries(stream, labels):
        pipe.execute_command(*command)
    pipe.execute()


# A label that is no verdict, and an entry that is not JSON: what the labels service dead-letters
# (invalid_field, invalid_json) instead of storing.
UNREADABLE_LABELS = (b'{"transaction_id": "unknown_tx", "label": "perhaps"}', b"not json")


def feed_labels_service(client: redis.Redis, ns: Namespace, labels: list[Label], resent: int) -> None:
    """The labels stream as the labels service must take it: ``labels``, the first ``resent`` of them
    again (a source sending twice), then ``UNREADABLE_LABELS``."""
    publish_labels(client, ns.labels_stream, labels)
    publish_labels(client, ns.labels_stream, labels[:resent])
    for data in UNREADABLE_LABELS:
        client.xadd(ns.labels_stream, {"data": data})


def wait_labels_stored(client: redis.Redis, ns: Namespace, stored: int, timeout: float) -> None:
    """Until ``stored`` labels are in the table, the unreadable entries in the DLQ and nothing is pending."""
    wait_for(
        lambda: (
            ns.sql("SELECT count(*) FROM labels")[0][0] == stored
            and client.xlen(ns.dlq_stream) == len(UNREADABLE_LABELS)
            and client.xpending(ns.labels_stream, ns.group)["pending"] == 0
        ),
        timeout,
        message="labels stored",
    )


def valid_payloads(count: int, prefix: str, users: int = 50) -> list[bytes]:
    return [
        payload(
            f"{prefix}_{i}", user=f"{prefix}_user_{i % users}", amount=round(5 + (i * 7.31) % 900, 2), ts=NOW - 3000 + i % 3000
        )
        for i in range(count)
    ]


def publish(client: redis.Redis, stream: str, payloads: Sequence[bytes | None]) -> list[str]:
    """Append entries in order; ``None`` becomes an entry without a ``data`` field. Returns their ids."""
    publisher = Publisher(client, stream)
    ids: list[str] = []
    run: list[bytes] = []
    for item in payloads:
        if item is None:
            ids += publisher.publish(run)
            run = []
            ids.append(client.xadd(stream, {"note": "no data field"}).decode())
        else:
            run.append(item)
    return ids + publisher.publish(run)


def group(client: redis.Redis, ns: Namespace, stream: str | None = None) -> dict | None:
    """The group's XINFO GROUPS record with text keys, or None when stream or group is missing."""
    try:
        groups = client.xinfo_groups(stream or ns.stream)
    except redis.ResponseError:
        return None
    for g in groups:
        record = {(k.decode() if isinstance(k, bytes) else k): v for k, v in g.items()}
        name = record["name"].decode() if isinstance(record["name"], bytes) else record["name"]
        if name == ns.group:
            return record
    return None


def last_id(client: redis.Redis, stream: str) -> str:
    entries = client.xrevrange(stream, count=1)
    return entries[0][0].decode() if entries else "0-0"


def fully_drained(client: redis.Redis, ns: Namespace, shards: int = 1) -> bool:
    """Every entry of the stream (of each of its ``shards``) delivered to the group and acked.

    Compares ids rather than trusting the group's ``lag``, which Redis cannot always compute.
    """
    for stream in (shard_stream(ns.stream, shards, k) for k in range(shards)):
        info = group(client, ns, stream)
        if info is None:
            return False
        delivered = info["last-delivered-id"]
        delivered = delivered.decode() if isinstance(delivered, bytes) else delivered
        if info["pending"] != 0 or _id(delivered) < _id(last_id(client, stream)):
            return False
    return True


def _id(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def dlq(client: redis.Redis, ns: Namespace) -> list[dict[str, bytes]]:
    """Dead letters in order, fields as text keys."""
    return [{k.decode(): v for k, v in fields.items()} for _id, fields in client.xrange(ns.dlq_stream)]


def alerts(client: redis.Redis, ns: Namespace) -> list[dict]:
    return [orjson.loads(fields[b"data"]) for _id, fields in client.xrange(ns.fraud_stream)]


def pending_deliveries(client: redis.Redis, ns: Namespace) -> dict[str, int]:
    """Entry id -> delivery count of every pending entry."""
    rows = client.xpending_range(ns.stream, ns.group, "-", "+", 100_000)
    return {row["message_id"].decode(): row["times_delivered"] for row in rows}
