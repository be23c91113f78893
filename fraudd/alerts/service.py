"""``fraudd alerts``: the alert sender as a batch handler of the shared stream consumer.

Per read of the fraud stream (consumer group ``--alerts-group``): poison and entries that are no
alert become dead letters; every alert is routed and recorded in ``alert_deliveries``; then one
Redis call writes the dead letters and acks the read (``DeadLetterSettler``: on a Redis Cluster,
the letters first, then the ack). Recording before the ack means a
crash never loses an alert; the delivery itself happens from the table (``sender.py``), so it
never holds up the stream.
"""

from __future__ import annotations

import logging
import time

import psycopg

from ..runtime import metrics
from ..runtime.consumer import Entries, StreamConsumer, consume
from ..runtime.deadletters import REASON_MAX_DELIVERIES, DeadLetterSettler
from ..runtime.health import Housekeeper, health_problems
from ..runtime.process import WorkerProcess
from ..runtime.redis_clients import REDIS_FAILURES, connect_redis
from ..runtime.retention import trim_acked
from ..runtime.supervisor import Service
from ..schema import connect, one_row
from .config import AlertConfigError, AlertsConfig, load
from .deliveries import purge_settled
from .sender import REASON_INVALID_ALERT, AlertSender, SenderSettings
from .settings import AlertSettings

log = logging.getLogger(__name__)

PURGE_INTERVAL_S = 600.0  # settled deliveries age by days: no need to look more often

OUTCOMES = ("delivered", "failed", "dead_lettered")


class AlertWorker:
    """The batch handler of one ``fraudd alerts`` worker process."""

    def __init__(self, settings: AlertSettings, config: AlertsConfig, process: WorkerProcess) -> None:
        self.settings = settings
        self.config = config
        self.consumer = StreamConsumer(
            connect_redis(settings.redis.url, settings.redis.cluster),
            settings.consumer,
            settings.consumer.consumer_name(process.index),
            process,
        )
        self.settler = DeadLetterSettler(self.consumer, settings.dlq_stream)
        self.sender = self._sender(config)

    def _sender(self, config: AlertsConfig) -> AlertSender:
        s = self.settings
        return AlertSender(
            config,
            SenderSettings(
                s.redis.url,
                s.postgres.url,
                s.postgres.schema,
                s.fraud_stream,
                s.dlq_stream,
                s.max_attempts,
                self.consumer.name,
                s.redis.cluster,
            ),
        )

    def boot(self) -> None:
        for channel in self.config.channels:
            for outcome in OUTCOMES:
                metrics.alert_deliveries.labels(channel.name, outcome)
        # Wait for PostgreSQL before reading (as the scoring worker does): re-reading pending
        # entries during an outage would count deliveries towards --max-deliveries for nothing.
        self.consumer.until_done(self._check_postgres, "postgres")
        self.sender.start()

    def _check_postgres(self) -> None:
        with connect(self.settings.postgres.url, self.settings.postgres.schema, connect_timeout=5) as conn:
            conn.execute("SELECT 1 FROM alert_deliveries LIMIT 1")

    def reload(self) -> None:
        """Re-read the channels file; a bad one is refused and the running channels kept."""
        try:
            config = load(self.settings.config)
        except AlertConfigError as exc:
            metrics.reloads.labels("refused").inc()
            log.error("reload refused, keeping the running channels", extra={"event": "reload_refused", "reason": str(exc)})
            return
        self.sender.stop(self.settings.consumer.shutdown_timeout_s / 2)
        self.config, self.sender = config, self._sender(config)
        self.boot()
        metrics.reloads.labels("ok").inc()
        log.info("channels reloaded", extra={"event": "reloaded", "channels": [c.name for c in config.channels]})

    def process(self, entries: Entries) -> None:
        fresh, poison = self.consumer.split_poison(entries)
        rejected = self.consumer.until_done(lambda: self.sender.handle(fresh.ids, fresh.payloads), "postgres")
        letters = self.settler.poison_letters(poison, entries)
        letters += [
            self.settler.letter(
                r.entry_id,
                r.payload,
                r.reason,
                r.detail,
                entries.deliveries.get(r.entry_id, 1),
                entries.kept_fields(r.entry_id, r.payload),
            )
            for r in rejected
        ]
        self.consumer.until_done(lambda: self.settler.settle(entries.ids, letters), "redis")
        self.consumer.release(entries)
        if letters:
            metrics.dead_letters.labels(REASON_INVALID_ALERT).inc(len(rejected))
            metrics.dead_letters.labels(REASON_MAX_DELIVERIES).inc(len(poison))
            log.warning("dead-lettered", extra={"event": "dead_lettered", "entries": len(letters)})

    def drain(self) -> None:
        """Nothing settles in the background: a read is recorded and acked before the next."""

    def close(self) -> None:
        self.sender.stop(self.settings.consumer.shutdown_timeout_s / 2)


def service(settings: AlertSettings, config: AlertsConfig) -> Service:
    """``fraudd alerts``: the supervisor's view of the alert workers."""
    housekeeper = Housekeeper(settings.redis, settings.postgres, settings.consumer, [settings.fraud_stream])
    backlog: list[int] = []  # the last count, for the status line
    next_purge = [0.0]

    def housekeeping() -> None:
        housekeeper.run_once()
        try:
            trim_acked(housekeeper.redis, settings.fraud_stream, settings.fraud_retention_s)
        except (*REDIS_FAILURES, OSError):
            pass  # the housekeeper reports Redis down
        try:
            with connect(settings.postgres.url, settings.postgres.schema, connect_timeout=2, autocommit=True) as conn:
                (count,) = one_row(conn.execute("SELECT count(*) FROM alert_deliveries WHERE status IN ('pending', 'digest')"))
                if settings.deliveries_retention_days and time.monotonic() >= next_purge[0]:
                    next_purge[0] = time.monotonic() + PURGE_INTERVAL_S
                    purged = purge_settled(conn, settings.deliveries_retention_days)
                    if purged:
                        log.info(
                            "settled alert deliveries purged",
                            extra={
                                "event": "deliveries_purged",
                                "rows": purged,
                                "days": settings.deliveries_retention_days,
                            },
                        )
        except (psycopg.Error, OSError):
            return  # the housekeeper reports PostgreSQL down
        metrics.alert_backlog.set(count)
        backlog[:] = [count]

    def summary() -> str:
        return housekeeper.summary() + (f", {backlog[0]:,} deliveries to make" if backlog else "")

    return Service(
        name="fraudd alerts",
        workers=settings.consumer.workers,
        run_worker=lambda process: worker_main(settings, config, process),
        worker_name=settings.consumer.consumer_name,
        shutdown_timeout_s=settings.consumer.shutdown_timeout_s,
        log_level=settings.log_level,
        metrics_listen=settings.metrics.listen,
        housekeeping=housekeeping,
        health_problems=lambda: health_problems(settings.postgres, housekeeper.redis),
        summary=summary,
    )


def worker_main(settings: AlertSettings, config: AlertsConfig, process: WorkerProcess) -> int:
    """Entry point of a forked alert worker; returns its exit code."""
    worker = AlertWorker(settings, config, process)
    return consume(process, worker.consumer, worker)
