"""``fraudd labels``: the consumer of the labels stream, a small batch handler on the runtime's
stream consumer (own pending first, reclaim, poison, outage waits and graceful stop come from it).

Per batch: one ``loads`` per entry and validation (``parse_label``), one PostgreSQL transaction
(``store_labels``, idempotent, so a redelivered batch changes nothing), the confirmed-fraud counts
of the labelled transactions' merchants, devices, IPs and cards (``confirm``, idempotent too, in
each input shard's slot), then the dead letters of the invalid and poison entries, once each, and
the ack of the whole read (``DeadLetterSettler``: durable first, ack last, on one Redis or a cluster).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import orjson
import psycopg

from fraudd.runtime.consumer import Entries, StreamConsumer, consume
from fraudd.runtime.deadletters import DeadLetterSettler
from fraudd.runtime.process import WorkerProcess
from fraudd.runtime.redis_clients import connect_redis
from fraudd.runtime.supervisor import Service
from fraudd.schema import connect
from fraudd.scoring.decode import REASON_INVALID, REASON_NO_DATA, REASON_NOT_JSON

from .labels import Label, LabelError, confirm, confirmed_shards, parse_label, store_labels
from .settings import LabelSettings

log = logging.getLogger(__name__)


class LabelsWorker:
    """The batch handler of consumer ``<consumer-id>-<index>`` on the labels stream."""

    def __init__(self, settings: LabelSettings, process: WorkerProcess) -> None:
        self.settings = settings
        self.consumer = StreamConsumer(
            connect_redis(settings.redis.url, settings.redis.cluster),
            settings.consumer,
            settings.consumer.consumer_name(process.index),
            process,
            on_outage=self._on_outage,
        )
        self.settler = DeadLetterSettler(self.consumer, settings.dlq_stream)
        self._conn: psycopg.Connection | None = None
        self.confirmed = confirmed_shards(self.consumer.redis, settings.stream, settings.shards)

    def boot(self) -> None:
        self.consumer.until_done(self._connection, "postgres")

    def reload(self) -> None:
        """Nothing to re-read: labels have no configuration of their own."""

    def process(self, entries: Entries) -> None:
        work, poison = self.consumer.split_poison(entries)
        labels: list[Label] = []
        dead = self.settler.poison_letters(poison, entries)
        for entry_id, payload in zip(work.ids, work.payloads):
            deliveries = work.deliveries.get(entry_id, 1)
            if payload is None:
                kept = entries.kept_fields(entry_id, None)
                dead.append(self.settler.letter(entry_id, b"", REASON_NO_DATA, "entry has no 'data' field", deliveries, kept))
                continue
            try:
                # Without its own reported_at, a label was reported when the stream accepted it: the
                # same on every redelivery, so storing it again changes nothing.
                accepted = datetime.fromtimestamp(int(entry_id.split("-")[0]) / 1000.0, UTC)
                labels.append(parse_label(orjson.loads(payload), now=accepted))
            except orjson.JSONDecodeError as exc:
                dead.append(self.settler.letter(entry_id, payload, REASON_NOT_JSON, str(exc)[:200], deliveries))
            except LabelError as exc:
                dead.append(self.settler.letter(entry_id, payload, REASON_INVALID, str(exc)[:200], deliveries))
        new = self.consumer.until_done(lambda: store_labels(self._connection(), labels), "postgres") if labels else 0
        if labels:
            self.consumer.until_done(lambda: confirm(self._connection(), self.confirmed, labels), "redis")
        self.consumer.until_done(lambda: self.settler.settle(entries.ids, dead), "redis")
        self.consumer.release(entries)
        if dead:
            log.warning("dead-lettered labels", extra={"event": "dead_lettered", "entries": len(dead)})
        log.debug("labels stored", extra={"event": "labels_stored", "labels": len(labels), "new": new})

    def drain(self) -> None:
        """Every batch settles before the next read: nothing in flight."""

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.settings.postgres.url, self.settings.postgres.schema, connect_timeout=5, autocommit=True)
        return self._conn

    def _on_outage(self, kind: str) -> None:
        if kind == "postgres":
            self.close()


def service(settings: LabelSettings) -> Service:
    """``fraudd labels``: the supervisor's view of the labels workers."""
    return Service(
        name="fraudd labels",
        workers=settings.consumer.workers,
        run_worker=lambda process: worker_main(settings, process),
        worker_name=settings.consumer.consumer_name,
        shutdown_timeout_s=settings.consumer.shutdown_timeout_s,
        log_level=settings.log_level,
        metrics_listen=settings.metrics.listen,
    )


def worker_main(settings: LabelSettings, process: WorkerProcess) -> int:
    worker = LabelsWorker(settings, process)
    return consume(process, worker.consumer, worker)
