"""The alert service inside one worker process: from fraud-stream batches to delivered notifications.

A stream batch is only *recorded*: each alert is routed to its channels and written to
``alert_deliveries`` (one INSERT per batch) before the stream consumer acks it. Sending is the
job of one asyncio task set per channel, which claims due rows from the table, sends them with up
to ``concurrency`` requests in flight and records the outcomes in rounds. So PostgreSQL is the
durable record of every delivery still to make, a slow or dead channel delays only itself, never
the stream or the other channels, and retries need no state outside the table.

Everything asynchronous runs on one uvloop event loop in a thread of its own, so deliveries and
retries go on while the consumer thread blocks on its next read; the consumer hands each batch
over and waits for it to be recorded (``handle``).

A failed attempt, whatever the channel raised, is that alert's: it is retried on its own back-off
(or the ``Retry-After`` it was given) and dead-lettered after ``max_attempts``, while the other
alerts go on. The worker that made the attempt retries it itself, the row staying claimed, while
the retry fits in the claim's lease and the channel is not paused: a flaky peer then costs its
extra requests, not an outcome update and a new claim per attempt, nor a wait behind the channel's
backlog; the attempts are written with the final outcome. A retry that would not fit goes back
through the table. Per channel, a circuit breaker (``circuit.py``) keeps a channel that is down
from burning its backlog's attempts: it pauses the channel only on a high failure rate or a peer
that cannot be reached, then probes with one delivery until one succeeds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import orjson
import psycopg
import redis
import redis.asyncio.cluster
import uvloop

from ..keys import Keys
from ..runtime import deadletters, metrics
from ..runtime.deadletters import DeadLetter, Rejected
from ..runtime.redis_clients import REDIS_FAILURES, ReplicaWait, async_redis_client
from .channels import Alert, Channel, DeliveryFailed, describe, open_channel
from .circuit import Circuit, backoff
from .config import AlertsConfig, ChannelConfig
from .deliveries import REASON_UNDELIVERABLE, Claimed, DeliveryLog, NewDelivery, Outcome

log = logging.getLogger(__name__)

CRASH_EXIT_S = 5.0  # a worker whose task crashed stops gracefully within this, or exits regardless
EXIT_CRASHED = 70
POLL_S = 0.5  # how often a channel looks for rows made due by others (retries, other processes' leftovers)
DIGEST_MAX_ALERTS = 10_000
REASON_INVALID_ALERT = "invalid_alert"
_RECORD_BACKOFF_MAX_S = 5.0
_T = TypeVar("_T")
OUTAGES = (psycopg.Error, *REDIS_FAILURES, OSError)


@dataclass(frozen=True, slots=True)
class SenderSettings:
    redis_url: str
    postgres_url: str
    pg_schema: str
    fraud_stream: str
    dlq_stream: str
    max_attempts: int
    consumer: str
    redis_cluster: bool = False


class AlertSender:
    """Records stream batches and delivers them; ``start`` in the worker process, ``handle`` per batch, ``stop``."""

    def __init__(self, config: AlertsConfig, settings: SenderSettings) -> None:
        self.config = config
        self.settings = settings
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="alerts", daemon=True)
        self.log = DeliveryLog(settings.postgres_url, settings.pg_schema)
        self._storm_prefix = Keys(settings.fraud_stream, settings.fraud_stream, settings.dlq_stream).prefix + "alerts:storm:"
        self._dead_prefix = deadletters.marker_prefix(settings.fraud_stream, settings.dlq_stream)
        self._replicas = ReplicaWait()
        self._channels: dict[str, ChannelRunner] = {}
        self._recorder: Recorder | None = None

    # -- the consumer's side (its thread) --------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._call(self._open())

    def handle(self, entry_ids: list[str], payloads: list[bytes | None]) -> list[Rejected]:
        """Route and record one stream batch; returns the entries that are no alert. Raises what
        PostgreSQL or Redis raised, so the consumer waits the outage out and hands the batch again
        (recording is idempotent)."""
        return self._call(self.accept(entry_ids, payloads))

    def stop(self, grace_s: float) -> None:
        """Let in-flight deliveries finish (at most ``grace_s``), record them, release the rest."""
        try:
            self._call(self._close(grace_s))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def _call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        future: concurrent.futures.Future[_T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result()

    @property
    def recorder(self) -> Recorder:
        """The delivery log's writer, there once the event loop opened the sender."""
        if self._recorder is None:
            raise RuntimeError("the alert sender is not open")
        return self._recorder

    # -- the event loop's side -------------------------------------------------------------

    async def _open(self) -> None:
        self.redis = async_redis_client(
            self.settings.redis_url, self.settings.redis_cluster, socket_timeout=10, socket_connect_timeout=5
        )
        self._dead_letters = self.redis.register_script(deadletters.SCRIPT)
        await self.log.open()
        self._recorder = Recorder(self)
        for channel_config in self.config.channels:
            channel = open_channel(channel_config)
            await channel.open()
            self._channels[channel.name] = ChannelRunner(channel, self)
        self.recorder.start()
        for runner in self._channels.values():
            runner.start()

    async def _close(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        await asyncio.gather(*(runner.stop(grace_s) for runner in self._channels.values()))
        if self._recorder is not None:
            await self._recorder.stop(max(1.0, deadline - time.monotonic()))
        for runner in self._channels.values():
            await runner.channel.close()
        await self.log.close()
        await self.redis.aclose()

    async def accept(self, entry_ids: list[str], payloads: list[bytes | None]) -> list[Rejected]:
        alerts, rejected = parse_alerts(entry_ids, payloads)
        now = time.time()
        routed: dict[str, list[Alert]] = {name: [] for name in self._channels}
        for alert in alerts:
            for name, runner in self._channels.items():
                if runner.config.route.matches(alert.document):
                    routed[name].append(alert)
        rows: list[NewDelivery] = []
        for name, channel_alerts in routed.items():
            if channel_alerts:
                runner = self._channels[name]
                channel_rows = await self._storm_control(runner.config, channel_alerts, now)
                # As many as the channel has room for are claimed at once, by this worker, for
                # their first attempt; the rest wait in the table for any worker's claim.
                for row in [r for r in channel_rows if r.status == "pending"][: runner.room()]:
                    row.lease_s = runner.config.lease_s
                rows += channel_rows
        inserted = await self.log.add(rows)
        for row in rows:
            if row.lease_s is not None and (row.alert.transaction_id, row.channel) in inserted:
                self._channels[row.channel].enqueue(Claimed(row.alert, 1))
        for name, channel_alerts in routed.items():
            if channel_alerts:
                self._channels[name].wake()
        return rejected

    async def _storm_control(self, config: ChannelConfig, alerts: list[Alert], now: float) -> list[NewDelivery]:
        """Above ``digest_above`` alerts per interval (counted across every worker in Redis), the
        rest of the interval's alerts go into one digest, sent when the interval ends."""
        if config.digest_above is None:
            return [NewDelivery(a, config.name, "pending", now) for a in alerts]
        interval = config.digest_interval_s
        window = int(now // interval)
        key = f"{self._storm_prefix}{config.name}:{window}"
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.incrby(key, len(alerts))
            pipe.expire(key, int(interval * 2) + 1)
            total, _ = await pipe.execute()
        before = total - len(alerts)
        alone = max(0, min(len(alerts), config.digest_above - before))
        digest_id = f"{config.name}:{window}"
        due = (window + 1) * interval
        return [NewDelivery(a, config.name, "pending", now) for a in alerts[:alone]] + [
            NewDelivery(a, config.name, "digest", due, digest_id) for a in alerts[alone:]
        ]

    async def dead_letter(self, channel: str, deliveries: list[tuple[Alert, str, int]]) -> None:
        """Write given-up deliveries (alert, last error, attempts) to the DLQ, once each."""
        letters = [
            DeadLetter(
                f"{alert.transaction_id}:{channel}",
                {
                    "data": alert.body,
                    "reason": REASON_UNDELIVERABLE,
                    "detail": error,
                    "channel": channel,
                    "source_id": alert.stream_id,
                    "consumer": self.settings.consumer,
                    "attempts": attempts,
                },
            )
            for alert, error, attempts in deliveries
        ]
        dlq = self.settings.dlq_stream
        await self._dead_letters(
            keys=[dlq, dlq], args=deadletters.script_args("", self._dead_prefix, self.settings.fraud_stream, letters, [])
        )
        if isinstance(self.redis, redis.asyncio.cluster.RedisCluster):
            # The delivery is recorded failed next, for good: its dead letter must outlive the DLQ's master.
            await self._replicas.wait_async(self.redis, dlq)


def parse_alerts(entry_ids: list[str], payloads: list[bytes | None]) -> tuple[list[Alert], list[Rejected]]:
    """Alerts of a stream batch, one ``orjson`` call for all; entries that are no alert, rejected."""
    present = [(i, p) for i, p in zip(entry_ids, payloads) if p]
    rejected = [Rejected(i, b"", REASON_INVALID_ALERT, "no data field") for i, p in zip(entry_ids, payloads) if not p]
    try:
        documents = orjson.loads(b"[" + b",".join(p for _i, p in present) + b"]") if present else []
        if len(documents) != len(present):
            raise orjson.JSONDecodeError("entries do not split into one document each", "", 0)
    except orjson.JSONDecodeError:
        documents = [_loads_or_none(p) for _i, p in present]
    alerts = []
    for (entry_id, payload), document in zip(present, documents):
        txid = document.get("transaction_id") if isinstance(document, dict) else None
        if isinstance(txid, str) and txid:
            alerts.append(Alert(txid, entry_id, payload, document))
        else:
            rejected.append(Rejected(entry_id, payload, REASON_INVALID_ALERT, "not a JSON object with a transaction_id"))
    return alerts, rejected


def _loads_or_none(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


class ChannelRunner:
    """One channel in one worker process: claims due rows, sends them, reports outcomes to the recorder."""

    def __init__(self, channel: Channel, sender: AlertSender) -> None:
        self.channel = channel
        self.config = channel.config
        self.sender = sender
        self.name = channel.name
        self._ready: asyncio.Queue[Claimed] = asyncio.Queue()
        self._busy = 0
        self._backing_off: dict[str, tuple[Claimed, asyncio.TimerHandle]] = {}  # retried here, by transaction id
        self._stopping = False
        self._woken = asyncio.Event()
        # Whether the table may hold due rows of this channel that no claim has seen: rows were
        # inserted or handed back since the last claim that came back short, or POLL_S has passed.
        # A claim is a round trip: while the table holds nothing due, a send finishing (which
        # frees room) must not ask again, or a channel left with only retries waiting out their
        # back-off polls PostgreSQL once per request.
        self._rows_due = True
        self._poll_at = 0.0  # monotonic time of the next look for rows made due by others
        self.circuit = Circuit(self.config)
        self._failed_attempts = metrics.alert_deliveries.labels(self.name, "failed")
        self._tasks: list[asyncio.Task] = []
        self._digest_in_flight: asyncio.Task | None = None

    def start(self) -> None:
        self._tasks = [worker_task(self._claim_loop(), f"claim-{self.name}")]
        self._tasks += [worker_task(self._send_loop(), f"send-{self.name}") for _ in range(self.config.concurrency)]

    def wake(self) -> None:
        """New rows are in the table: claim what fits."""
        self._rows_due = True
        self._woken.set()

    def room(self) -> int:
        """Deliveries this worker may take on now: none while the circuit is open or probing."""
        if not self.circuit.closed:
            return 0
        return max(0, self.config.prefetch - self._ready.qsize() - self._busy)

    def enqueue(self, claimed: Claimed) -> None:
        self._ready.put_nowait(claimed)

    async def stop(self, grace_s: float) -> None:
        claimer, senders = self._tasks[0], self._tasks[1:]
        claimer.cancel()
        self._stopping = True  # from now on a failed attempt goes back to the table
        pending = [claimed for claimed in _drain(self._ready)]
        now, loop_now = time.time(), asyncio.get_running_loop().time()
        for claimed, timer in self._backing_off.values():
            timer.cancel()
            self._hand_back(claimed, now + max(0.0, timer.when() - loop_now))
        self._backing_off.clear()
        # Idle senders wait on the queue; busy ones finish their attempt within the grace period.
        deadline = time.monotonic() + grace_s
        while self._busy and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for task in senders:
            task.cancel()
        if self._digest_in_flight is not None:
            await asyncio.wait([self._digest_in_flight], timeout=max(0.0, deadline - time.monotonic()))
        await asyncio.gather(*self._tasks, return_exceptions=True)
        now = time.time()
        for claimed in pending:
            self._hand_back(claimed, now)

    def _hand_back(self, claimed: Claimed, retry_at: float) -> None:
        """Give a claimed delivery back to the table, due at ``retry_at``, its last attempt not made."""
        if claimed.retries:
            outcome = Outcome(
                self.name,
                claimed.alert.transaction_id,
                False,
                error=claimed.last_error,
                retry_at=retry_at,
                attempts=claimed.attempts - 1,
                attempted_at=claimed.attempted_at,
            )
        else:
            outcome = Outcome(self.name, claimed.alert.transaction_id, False, retry_at=retry_at, released=True)
        self.sender.recorder.add(outcome)
        self._rows_due = True

    async def _claim_loop(self) -> None:
        delay = 0.05
        while True:
            try:
                await self._claim_round()
                delay = 0.05
            except OUTAGES as exc:  # the rows wait in the table; claims resume when PostgreSQL is back
                metrics.errors.labels("postgres", type(exc).__name__).inc()
                log.warning(
                    "alert channel cannot claim deliveries",
                    extra={"event": "alerts_claim_failed", "channel": self.name, "error": str(exc)},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECORD_BACKOFF_MAX_S)

    async def _claim_round(self) -> None:
        now = time.time()
        wait = POLL_S
        if time.monotonic() >= self._poll_at:
            self._rows_due = True
        if self.circuit.is_open(now):
            wait = min(POLL_S, self.circuit.open_until - now)
        elif not self._rows_due:
            wait = self._poll_at - time.monotonic()
        else:
            probing = not self.circuit.closed
            queued = self._ready.qsize() + self._busy
            room = (1 if probing else self.config.prefetch) - queued
            # Claim in large chunks (a claim is a round trip); while probing a paused channel, one at a time.
            if room >= (1 if probing else self.config.prefetch // 2):
                self._rows_due = False  # set again by rows that arrive while the claim is on its way
                claimed = await self.sender.log.claim(self.name, "pending", room, self.config.lease_s)
                for item in claimed:
                    self._ready.put_nowait(item)
                if len(claimed) == room:
                    wait, self._rows_due = 0.0, True  # more may be due
                else:
                    self._poll_at = time.monotonic() + POLL_S
            if self.config.digest_above is not None and self._digest_in_flight is None:
                digest = await self.sender.log.claim(self.name, "digest", DIGEST_MAX_ALERTS, self.config.lease_s)
                if digest:
                    self._digest_in_flight = worker_task(self._send_digest(digest), f"digest-{self.name}")
        if wait > 0:
            try:
                await asyncio.wait_for(self._woken.wait(), wait)
            except TimeoutError:
                pass
        self._woken.clear()

    async def _send_loop(self) -> None:
        while True:
            claimed = await self._ready.get()
            self._busy += 1
            try:
                now = time.time()
                if (
                    self.circuit.is_open(now)
                    or (claimed.retries and not self.circuit.closed)
                    or time.monotonic() > self.config.send_by(claimed.claimed_at)
                ):
                    # The circuit opened while this one was queued (or, for a retry, is probing with
                    # another delivery), or it was queued so long that an attempt might outlast its
                    # claim: hand it back unattempted.
                    self._hand_back(claimed, max(now, self.circuit.open_until))
                    continue
                await self._attempt([claimed], self.channel.send(claimed.alert), None)
            finally:
                self._busy -= 1
                self._woken.set()

    async def _send_digest(self, claimed: list[Claimed]) -> None:
        digest_id = f"{self.name}:{claimed[0].alert.transaction_id}:{int(time.time())}"
        try:
            await self._attempt(claimed, self.channel.send_digest([c.alert for c in claimed], digest_id), digest_id)
        finally:
            self._digest_in_flight = None

    async def _attempt(self, claimed: list[Claimed], sending: Coroutine[Any, Any, None], digest_id: str | None) -> None:
        recorder = self.sender.recorder
        try:
            await sending
        except DeliveryFailed as exc:
            # Without its traceback: kept with it, the exception would hold this frame and the
            # sending coroutine's (the response with them) in a cycle only the garbage collector frees.
            failure = exc.with_traceback(None)
            if exc.permanent:
                self.circuit.succeeded()  # the peer answered: the channel is up, this alert is refused
            else:
                self.circuit.failed(self.channel.redact(exc.reason), exc.unreachable, exc.retry_after)
        except Exception as exc:  # noqa: BLE001  e.g. an id with a line break cannot be a header: this alert's fault
            failure = DeliveryFailed(describe(exc))
        else:
            self.circuit.succeeded()
            now = time.time()
            for c in claimed:
                outcome = Outcome(self.name, c.alert.transaction_id, True, digest_id=digest_id)
                if c.retries:  # the attempts retried here are news to the table
                    outcome.error, outcome.attempts, outcome.attempted_at = c.last_error, c.attempts, now
                recorder.add(outcome, c.alert)
            return
        self._failed_attempts.inc(len(claimed))
        reason = self.channel.redact(failure.reason)
        attempts = max(c.attempts for c in claimed)
        now = time.time()
        if failure.permanent or attempts >= self.sender.settings.max_attempts:
            for c in claimed:
                recorder.add(
                    Outcome(self.name, c.alert.transaction_id, False, reason, attempts=c.attempts, attempted_at=now),
                    c.alert,
                    c.attempts,
                )
            return
        wait = failure.retry_after if failure.retry_after is not None else backoff(self.config, attempts)
        if digest_id is None and self._retry_here(claimed[0], wait, reason, now):
            return
        for c in claimed:
            recorder.add(
                Outcome(self.name, c.alert.transaction_id, False, reason, now + wait, attempts=c.attempts, attempted_at=now)
            )

    def _retry_here(self, claimed: Claimed, wait: float, error: str, now: float) -> bool:
        """Retry a transient failure from this worker after ``wait``, the row staying claimed, if the
        retry still fits in the claim's lease and the channel is not paused; False otherwise."""
        if self._stopping or not self.circuit.closed or time.monotonic() + wait > self.config.send_by(claimed.claimed_at):
            return False
        txid = claimed.alert.transaction_id
        retry = Claimed(claimed.alert, claimed.attempts + 1, claimed.claimed_at, claimed.retries + 1, error, now)
        self._backing_off[txid] = (retry, asyncio.get_running_loop().call_later(wait, self._retry_due, txid))
        return True

    def _retry_due(self, txid: str) -> None:
        retry, _timer = self._backing_off.pop(txid)
        self._ready.put_nowait(retry)


class Recorder:
    """Writes outcomes to the delivery log in rounds (one transaction each), dead letters first.

    An outcome that cannot be recorded yet (PostgreSQL or Redis away) is kept and retried; should
    this process die meanwhile, the row's lease runs out and the delivery is made again under the
    same ``webhook-id`` (the documented window of a repeat).
    """

    def __init__(self, sender: AlertSender) -> None:
        self.sender = sender
        self._outcomes: list[tuple[Outcome, Alert | None, int]] = []
        self._woken = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._failing = False
        self._recording = 0  # outcomes taken from the buffer and not yet written

    def start(self) -> None:
        self._task = worker_task(self._run(), "record")

    def add(self, outcome: Outcome, alert: Alert | None = None, attempts: int = 0) -> None:
        self._outcomes.append((outcome, alert, attempts))
        self._woken.set()

    async def stop(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while (self._outcomes or self._recording) and time.monotonic() < deadline:
            self._woken.set()
            await asyncio.sleep(0.02)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        delay = 0.05
        while True:
            await self._woken.wait()
            self._woken.clear()
            batch, self._outcomes = self._outcomes, []
            if not batch:
                continue
            self._recording = len(batch)
            try:
                await self._record(batch)
            except OUTAGES as exc:  # keep the outcomes and try again
                self._outcomes = batch + self._outcomes
                self._recording = 0
                if not self._failing:
                    self._failing = True
                    log.error(
                        "cannot record alert outcomes, retrying", extra={"event": "alerts_record_failed", "error": str(exc)}
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECORD_BACKOFF_MAX_S)
                self._woken.set()
                continue
            self._recording = 0
            if self._failing:
                self._failing = False
                log.info("alert outcomes recorded again", extra={"event": "alerts_record_recovered"})
            delay = 0.05

    async def _record(self, batch: list[tuple[Outcome, Alert | None, int]]) -> None:
        given_up: dict[str, list[tuple[Alert, str, int]]] = {}
        for outcome, alert, attempts in batch:
            if not outcome.delivered and not outcome.released and outcome.retry_at is None and alert is not None:
                given_up.setdefault(outcome.channel, []).append((alert, outcome.error or "", attempts))
        for channel, deliveries in given_up.items():
            await self.sender.dead_letter(channel, deliveries)
        await self.sender.log.record([outcome for outcome, _a, _n in batch])
        _count(batch, given_up)


def _count(batch: list[tuple[Outcome, Alert | None, int]], given_up: dict[str, list[tuple[Alert, str, int]]]) -> None:
    now = time.time()
    delivered: dict[str, list[float]] = {}
    for outcome, alert, _attempts in batch:
        if outcome.delivered and alert is not None:
            delivered.setdefault(outcome.channel, []).append(now - int(alert.stream_id.split("-", 1)[0]) / 1000.0)
    for channel, latencies in delivered.items():
        metrics.alert_deliveries.labels(channel, "delivered").inc(len(latencies))
        metrics.observe_many(metrics.alert_delivery_latency.labels(channel), np.array(latencies))
    for channel, deliveries in given_up.items():
        metrics.alert_deliveries.labels(channel, "dead_lettered").inc(len(deliveries))
        log.error(
            "alerts dead-lettered after their last attempt",
            extra={"event": "alerts_dead_lettered", "channel": channel, "alerts": len(deliveries), "reason": deliveries[-1][1]},
        )


def worker_task(coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task:
    """A task whose unexpected death stops the worker process (the supervisor starts a new one)
    rather than leaving it alive and silently not delivering."""
    task = asyncio.create_task(coroutine, name=name)
    task.add_done_callback(_stop_process_on_crash)
    return task


def _stop_process_on_crash(task: asyncio.Task) -> None:
    if task.cancelled() or task.exception() is None:
        return
    log.critical(
        "alert task crashed, stopping this worker",
        exc_info=task.exception(),
        extra={"event": "worker_crashed", "task": task.get_name()},
    )
    # A graceful stop first, so that the deliveries in hand are recorded; but the crash may have left
    # the event loop or the main thread stuck, so the process ends after CRASH_EXIT_S regardless
    # (from a thread of its own) and the supervisor starts a new one.
    threading.Timer(CRASH_EXIT_S, os._exit, (EXIT_CRASHED,)).start()
    os.kill(os.getpid(), signal.SIGTERM)


def _drain(queue: asyncio.Queue[_T]) -> list[_T]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items
