"""``fraudd alerts``: the alert sender as a batch handler of the shared stream consumer.

Per read of the fraud stream (consumer group ``--alerts-group``): poison and entries that are no
alert become dead letters; every alert is routed and recorded in ``alert_deliveries``; then one
Redis call writes the dead letters and acks the read (``DeadLetterSettler``: on a Redis Cluster,
the letters first, then the ack). Recording before the ack means a
crash never loses an alert; the delivery itself happens from the table (``sender.py``), so it
never holds up the stream.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import psycopg
import redis

from ..config import AlertSettings, Settings
from ..runtime import metrics
from ..runtime.consumer import REASON_MAX_DELIVERIES, Entries, StreamConsumer, consume
from ..runtime.deadletters import DeadLetterSettler
from ..runtime.health import Housekeeper, health_problems
from ..runtime.process import WorkerProcess
from ..runtime.redis_clients import connect_redis
from ..runtime.retention import trim_acked
from ..runtime.supervisor import Service
from ..schema import connect
from .config import AlertConfigError, AlertsConfig, load
from .deliveries import purge_settled
from .sender import REASON_INVALID_ALERT, AlertSender, SenderSettings

log = logging.getLogger(__name__)

PURGE_INTERVAL_S = 600.0  # settled deliveries age by days: no need to look more often

OUTCOMES = ("delivered", "failed", "dead_lettered")


def consumer_view(settings: Settings, alert_settings: AlertSettings) -> Settings:
    """The settings as the alert consumer and its housekeeping see them: its stream is the fraud
    stream (never sharded: --shards splits the input), its group the alerts group, its consumers
    ``<consumer-id>-alerts-<i>``."""
    return dataclasses.replace(
        settings,
        stream=settings.fraud_stream,
        group=alert_settings.alerts_group,
        consumer_id=f"{settings.consumer_id}-alerts",
        shards=1,
    )


class AlertWorker:
    """The batch handler of one ``fraudd alerts`` worker process."""

    def __init__(self, settings: Settings, alert_settings: AlertSettings, config: AlertsConfig, process: WorkerProcess) -> None:
        self.view = consumer_view(settings, alert_settings)
        self.alert_settings = alert_settings
        self.config = config
        self.consumer = StreamConsumer(
            connect_redis(settings.redis_url, settings.redis_cluster), self.view, self.view.consumer_name(process.index), process
        )
        self.settler = DeadLetterSettler(self.consumer, settings.dlq_stream)
        self.sender = self._sender(config)

    def _sender(self, config: AlertsConfig) -> AlertSender:
        s = self.view
        return AlertSender(
            config,
            SenderSettings(
                s.redis_url,
                s.postgres_url,
                s.pg_schema,
                s.fraud_stream,
                s.dlq_stream,
                self.alert_settings.max_attempts,
                self.consumer.name,
                s.redis_cluster,
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
        with connect(self.view.postgres_url, self.view.pg_schema, connect_timeout=5) as conn:
            conn.execute("SELECT 1 FROM alert_deliveries LIMIT 1")

    def reload(self) -> None:
        """Re-read the channels file; a bad one is refused and the running channels kept."""
        try:
            config = load(self.alert_settings.config)
        except AlertConfigError as exc:
            metrics.reloads.labels("refused").inc()
            log.error("reload refused, keeping the running channels", extra={"event": "reload_refused", "reason": str(exc)})
            return
        self.sender.stop(self.view.shutdown_timeout_s / 2)
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
                REASON_INVALID_ALERT,
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
        self.sender.stop(self.view.shutdown_timeout_s / 2)


def service(settings: Settings, alert_settings: AlertSettings, config: AlertsConfig) -> Service:
    """``fraudd alerts``: the supervisor's view of the alert workers."""
    view = consumer_view(settings, alert_settings)
    housekeeper = Housekeeper(view)
    backlog: list[int] = []  # the last count, for the status line
    next_purge = [0.0]

    def housekeeping() -> None:
        housekeeper.run_once()
        try:
            trim_acked(housekeeper.redis, view.stream, alert_settings.fraud_retention_s)
        except (redis.RedisError, OSError):
            pass  # the housekeeper reports Redis down
        try:
            with connect(view.postgres_url, view.pg_schema, connect_timeout=2, autocommit=True) as conn:
                (count,) = conn.execute("SELECT count(*) FROM alert_deliveries WHERE status IN ('pending', 'digest')").fetchone()
                if alert_settings.deliveries_retention_days and time.monotonic() >= next_purge[0]:
                    next_purge[0] = time.monotonic() + PURGE_INTERVAL_S
                    purged = purge_settled(conn, alert_settings.deliveries_retention_days)
                    if purged:
                        log.info(
                            "settled alert deliveries purged",
                            extra={
                                "event": "deliveries_purged",
                                "rows": purged,
                                "days": alert_settings.deliveries_retention_days,
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
        workers=settings.workers,
        run_worker=lambda process: worker_main(settings, alert_settings, config, process),
        worker_name=view.consumer_name,
        shutdown_timeout_s=settings.shutdown_timeout_s,
        log_level=settings.log_level,
        metrics_port=settings.metrics_port,
        housekeeping=housekeeping,
        health_problems=lambda: health_problems(view, housekeeper.redis),
        summary=summary,
    )


def worker_main(settings: Settings, alert_settings: AlertSettings, config: AlertsConfig, process: WorkerProcess) -> int:
    """Entry point of a forked alert worker; returns its exit code."""
    worker = AlertWorker(settings, alert_settings, config, process)
    return consume(process, worker.consumer, worker)
