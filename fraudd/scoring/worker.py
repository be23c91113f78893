"""One worker process: a consumer of the group that scores batch after batch.

The batch loop, top to bottom (DESIGN.md):

    read      XREADGROUP COUNT (own pending first, then reclaimed, then new entries)
    decode    one orjson call; invalid entries become dead letters
    features  numpy over the users' states from one MGET, committed by one atomic Function call
              (compare-and-set of the states, dedup markers, blocklist lookups)
    inference one ONNX call for the batch, then vectorized rules and thresholds
    copy      one COPY of every decision into PostgreSQL (durable first)
    settle    one Redis script call: alerts, dead letters, XACK (ack last)

With ``--pipeline-depth 2`` the last two stages of a read run in a settling thread while the main
thread reads and scores the next one: the waits on PostgreSQL and Redis overlap with work, and no
more than two reads are ever in flight. It pays where a worker waits on a distant database; with
as many workers as cores on one box the cores are busy anyway and the default of 1 is cheaper.

Failures are handled per kind. An unreachable Redis or PostgreSQL is waited out: the batch stays
pending, nothing new is read, and the same batch is retried with bounded, jittered back-off. A
batch that fails for any other reason is bisected, so only the entries that cause the failure are
dead-lettered. A worker that cannot start (bad model or rules) exits with ``EXIT_BOOT_ERROR`` and
the supervisor stops instead of respawning it in a loop.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import psycopg
import redis

from ..config import Settings
from ..keys import Keys
from ..runtime import metrics
from .decode import (
    REASON_MAX_DELIVERIES,
    REASON_PROCESSING,
    DecodedBatch,
    Rejected,
    decode_batch,
)
from .features import FEATURE_NAMES, Features, FeatureStore
from .model import FraudModel, ModelError
from .rules import DECISIONS, Rules, RulesError, decide
from .sinks import (
    DeadLetter,
    DecisionStore,
    ScoredBatch,
    Settled,
    Settler,
    alert_documents,
)

log = logging.getLogger(__name__)

EXIT_BOOT_ERROR = 3
_PR_SET_PDEATHSIG = 1
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 5.0

# Errors that mean "a dependency is away", not "this batch is bad": the batch is retried as is.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)
POSTGRES_DOWN = (
    psycopg.OperationalError,
    psycopg.errors.ReadOnlySqlTransaction,
    psycopg.errors.InsufficientPrivilege,
)
_T = TypeVar("_T")
_Part = TypeVar("_Part", DecodedBatch, ScoredBatch)


class BootError(RuntimeError):
    """The worker cannot start with this configuration; respawning it would not help."""


class Stopping(Exception):
    """Shutdown was requested while the current batch could not be settled; it stays pending."""


@dataclass(slots=True)
class Entries:
    """One read, as parallel lists: a batch costs a few comprehensions, not an object per entry."""

    ids: list[str]
    payloads: list[bytes | None]  # None: the entry has no ``data`` field (a dead letter) or was deleted
    deleted: set[str]  # trimmed or XDEL'd while pending: nothing to score, only to ack
    deliveries: dict[str, int]  # known only for re-read and reclaimed entries; 1 for the rest

    def __len__(self) -> int:
        return len(self.ids)


def read_entries(raw_entries: list, deliveries: dict[str, int] | None = None) -> Entries:
    """Entries from a raw (RESP2, undecoded) XREADGROUP/XAUTOCLAIM reply."""
    ids = [entry_id.decode() for entry_id, _fields in raw_entries]
    # The origin producer writes exactly one field, ``data``: look further only when it did not.
    payloads = [fields[1] if fields and fields[0] == b"data" else _data_field(fields) for _id, fields in raw_entries]
    deleted = {i for i, (_id, fields) in zip(ids, raw_entries) if fields is None} if deliveries is not None else set()
    return Entries(ids, payloads, deleted, deliveries or {})


def _data_field(fields: list | None) -> bytes | None:
    if not fields:
        return None
    return dict(zip(fields[::2], fields[1::2])).get(b"data")


@dataclass(slots=True)
class Settlement:
    """One read on its way to PostgreSQL and the ack: what ``_settle`` needs, and nothing shared."""

    ids: list[str]  # every entry of the read: all are acked together at the end
    scored: list[ScoredBatch]
    dead: list[DeadLetter]
    payloads: dict[str, bytes]  # for dead letters found while storing
    deliveries: dict[str, int]


class Worker:
    """Consumer ``<consumer-id>-<index>``; run() returns the process exit code."""

    def __init__(self, settings: Settings, index: int, status_fd: int | None = None,
                 parent_pid: int | None = None) -> None:
        self.settings = settings
        self._status_fd = status_fd
        self.consumer = settings.consumer_name(index)
        self.keys = Keys(settings.stream, settings.fraud_stream, settings.dlq_stream)
        self.stopping = False
        self._reload_requested = False
        # The supervisor's pid as it knew it before the fork: had it died before this line, getppid()
        # would already name the process that adopted the orphan, which then never looks orphaned.
        self._parent = parent_pid if parent_pid is not None else os.getppid()
        # Start with this consumer's own pending entries: a respawned worker finishes what its
        # previous life read but never acked.
        self._own_pending_cursor: str | None = "0"
        self._next_claim = 0.0
        self._claim_cursor = "0-0"
        # Entries read but not yet acked, for keeping them claimed while an outage is waited out.
        self._preparing: list[str] = []
        self._settling_ids: list[str] = []
        self._settling: Future | None = None
        self._settling_thread = (ThreadPoolExecutor(1, thread_name_prefix="settle")
                                 if settings.pipeline_depth > 1 else None)

    # -- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        try:
            self._boot()
        except BootError as exc:
            log.error("worker cannot start", extra={"event": "boot_error", "reason": str(exc)})
            self._report(f"E{exc}")
            return EXIT_BOOT_ERROR
        except Stopping:
            # Told to stop while still waiting for a dependency to boot: nothing was read yet.
            log.warning("stopped before start-up completed", extra={"event": "stopped_booting"})
            return 0
        self._report("R")
        log.info("worker started", extra={"event": "worker_started", "consumer": self.consumer})
        metrics.workers_alive.set(1)
        try:
            while not self.stopping and self._parent_alive():
                if self._reload_requested:
                    self._reload()
                entries = self._read()
                if entries:
                    self._process(entries)
            self._wait_for_settling()
        except Stopping:
            log.warning("stopped with a batch unsettled; it stays pending for the next worker",
                        extra={"event": "stopped_unsettled", "entries": len(self._preparing) + len(self._settling_ids)})
        finally:
            if self._settling_thread is not None:
                self._settling_thread.shutdown(wait=True)
            self.store.close()
        log.info("worker stopped", extra={"event": "worker_stopped", "consumer": self.consumer})
        return 0

    def _report(self, status: str) -> None:
        """Tell the supervisor this worker is ready ("R") or why it cannot start ("E<reason>")."""
        if self._status_fd is not None:
            try:
                os.write(self._status_fd, (status.replace("\n", " ") + "\n").encode())
            except BrokenPipeError:
                # The supervisor died while this worker was booting: an orphan must not consume.
                self.stopping = True

    def _install_signals(self) -> None:
        # Die with the supervisor: a worker outliving it would keep consuming under a name the
        # next supervisor reuses.
        try:
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    def _on_stop(self, signum, frame) -> None:
        self.stopping = True

    def _on_reload(self, signum, frame) -> None:
        self._reload_requested = True

    def _parent_alive(self) -> bool:
        return os.getppid() == self._parent

    def _boot(self) -> None:
        s = self.settings
        self.model = _load_model(s)
        self.rules = _load_rules(s)
        self.redis = connect_redis(s.redis_url)
        self.store = DecisionStore(s.postgres_url, s.pg_schema)
        window_ms = s.dedup_window_s * 1000
        self.features = self._until_done(lambda: FeatureStore(self.redis, self.keys, window_ms), "redis")
        self.settler = Settler(self.redis, self.keys, s.group, self.consumer, window_ms)
        # Wait for PostgreSQL before reading anything: re-reading this consumer's pending entries
        # counts a delivery each time, so a worker respawned again and again during an outage would
        # otherwise push valid entries past --max-deliveries and dead-letter them as poison.
        self._until_done(self.store.connect, "postgres")
        self._publish_versions()

    def _reload(self) -> None:
        """Swap rules and model at a batch boundary; a bad file is refused and the old one kept."""
        self._reload_requested = False
        try:
            model, rules = _load_model(self.settings), _load_rules(self.settings)
        except BootError as exc:
            metrics.reloads.labels("refused").inc()
            log.error("reload refused, keeping the running model and rules",
                      extra={"event": "reload_refused", "reason": str(exc)})
            return
        metrics.model_info.labels(self.model.version).set(0)
        metrics.rules_info.labels(self.rules.version).set(0)
        self.model, self.rules = model, rules
        self._publish_versions()
        metrics.reloads.labels("ok").inc()
        log.info("model and rules reloaded", extra={"event": "reloaded", "model_version": model.version,
                                                     "rules_version": rules.version})

    def _publish_versions(self) -> None:
        metrics.model_info.labels(self.model.version).set(1)
        metrics.rules_info.labels(self.rules.version).set(1)

    # -- the batch loop --------------------------------------------------------------------

    def _read(self) -> Entries:
        started = time.perf_counter()
        entries = self._until_done(self._next_entries, "redis")
        if entries:
            metrics.stage_duration.labels("read").observe(time.perf_counter() - started)
            metrics.batch_size.observe(len(entries))
        return entries

    def _next_entries(self) -> Entries:
        if self._own_pending_cursor is not None:
            reply = self._xreadgroup(self._own_pending_cursor, block=False)
            if reply:
                self._own_pending_cursor = reply[-1][0].decode()
                return read_entries(reply, self._deliveries(reply))
            self._own_pending_cursor = None
        if time.monotonic() >= self._next_claim:
            entries = self._claim()
            if entries:
                return entries
        return read_entries(self._xreadgroup(">", block=True))

    def _xreadgroup(self, start: str, block: bool) -> list:
        s = self.settings
        args = ["GROUP", s.group, self.consumer, "COUNT", s.batch_size]
        if block:
            args += ["BLOCK", s.block_ms]
        try:
            reply = self.redis.execute_command("XREADGROUP", *args, "STREAMS", s.stream, start)
        except redis.ResponseError as exc:
            self._recreate_lost_group(exc)
            return []
        return reply[0][1] if reply else []

    def _recreate_lost_group(self, exc: redis.ResponseError) -> None:
        """Re-raise ``exc`` unless it says the consumer group is gone; then recreate the group.

        The group vanishes when Redis loses its data, and the entries read from it with it: the
        daemon goes on scoring what arrives next instead of stopping.
        """
        if "NOGROUP" not in str(exc):
            raise exc
        log.error("consumer group missing, recreating it", extra={"event": "group_recreated"})
        ensure_group(self.redis, self.settings.stream, self.settings.group)

    def _claim(self) -> Entries | None:
        """Take over entries idle for longer than ``--claim-idle-ms`` (their consumer died or hung)."""
        s = self.settings
        cursor, raw, _deleted = self.redis.execute_command(
            "XAUTOCLAIM", s.stream, s.group, self.consumer, s.claim_idle_ms, self._claim_cursor, "COUNT", s.batch_size
        )
        self._claim_cursor = cursor.decode()
        if self._claim_cursor == "0-0":
            # A full pass over the pending list is done; the next one can wait a while.
            self._next_claim = time.monotonic() + s.claim_idle_ms / 2000.0
        raw = [item for item in raw if item]
        if not raw:
            return None
        metrics.reclaimed.inc(len(raw))
        log.info("reclaimed pending entries", extra={"event": "reclaimed", "entries": len(raw)})
        return read_entries(raw, self._deliveries(raw))

    def _deliveries(self, raw: list) -> dict[str, int]:
        """Delivery counts of entries this consumer holds, for the poison check."""
        first, last = raw[0][0], raw[-1][0]
        pending = self.redis.execute_command(
            "XPENDING", self.settings.stream, self.settings.group, first, last, len(raw), self.consumer
        )
        return {entry_id.decode(): int(count) for entry_id, _consumer, _idle, count in pending}

    def _process(self, entries: Entries) -> None:
        """Decode and score this read, then hand it to ``_settle``: in the settling thread when
        ``--pipeline-depth`` is 2, so its COPY and settle overlap the scoring of the next read."""
        self._preparing = entries.ids
        ids, payloads, deliveries = entries.ids, entries.payloads, entries.deliveries
        dead: list[DeadLetter] = []
        if deliveries or entries.deleted:
            # Re-read or reclaimed entries: drop deleted ones, dead-letter poison before decoding.
            limit = self.settings.max_deliveries
            dead = [DeadLetter(Rejected(i, p or b"", REASON_MAX_DELIVERIES, f"delivered {deliveries[i]} times"), deliveries[i])
                    for i, p in zip(ids, payloads) if deliveries.get(i, 1) > limit and i not in entries.deleted]
            fresh = [(i, p) for i, p in zip(ids, payloads) if deliveries.get(i, 1) <= limit and i not in entries.deleted]
            ids, payloads = [i for i, _p in fresh], [p for _i, p in fresh]

        started = time.perf_counter()
        batch = decode_batch(ids, payloads)
        metrics.stage_duration.labels("decode").observe(time.perf_counter() - started)
        dead += [DeadLetter(r, deliveries.get(r.entry_id, 1)) for r in batch.rejected]
        work = Settlement(entries.ids, [], dead, dict(zip(ids, payloads)), deliveries)
        scored, failed = self._bisected(batch, self._score, work.payloads)
        work.scored = scored
        work.dead += [DeadLetter(r, deliveries.get(r.entry_id, 1)) for r in failed]

        # At most two reads in flight: the previous one settles before this one may start to.
        self._wait_for_settling()
        self._preparing, self._settling_ids = [], work.ids
        if self._settling_thread is None:
            self._settle(work)
            self._settling_ids = []
        else:
            self._settling = self._settling_thread.submit(self._settle, work)

    def _wait_for_settling(self) -> None:
        if self._settling is not None:
            settling, self._settling = self._settling, None
            settling.result()  # re-raises what the settling thread met, Stopping included
            self._settling_ids = []

    def _settle(self, work: Settlement) -> None:
        """Durable first, ack last: COPY every decision, then one atomic Redis call for the read."""
        stored: list[ScoredBatch] = []
        for scored in work.scored:
            ok, failed = self._bisected(scored, self._store, work.payloads)
            stored += ok
            work.dead += [DeadLetter(r, work.deliveries.get(r.entry_id, 1)) for r in failed]
        started = time.perf_counter()
        alerts = [doc for scored in stored for doc in alert_documents(scored)]
        settled = self._until_done(lambda: self._settle_in_redis(work, alerts), "redis")
        committed_at = time.time()
        metrics.stage_duration.labels("settle").observe(time.perf_counter() - started)
        self._count(stored, work.dead, settled.alerts, committed_at)

    def _settle_in_redis(self, work: Settlement, alerts: list[tuple[str, bytes]]) -> Settled:
        try:
            return self.settler.settle(work.ids, alerts, work.dead)
        except redis.ResponseError as exc:
            self._recreate_lost_group(exc)
        # Alerts and dead letters are guarded by their markers, so settling again writes each
        # once; acking the recreated group's absent entries is a no-op.
        return self.settler.settle(work.ids, alerts, work.dead)

    def _bisected(self, part: _Part, attempt: Callable[[_Part], _Part], payloads: dict[str, bytes]
                  ) -> tuple[list[_Part], list[Rejected]]:
        """``attempt(part)``; when it fails as a whole, bisect down to the entries at fault.

        Outages never get here (``_until_done`` waits them out), so what fails is the data: the
        entries that fail alone are dead-lettered and the rest go on.
        """
        if len(part) == 0:
            return [], []
        try:
            return [attempt(part)], []
        except Stopping:
            raise
        except Exception as exc:
            if len(part) == 1:
                entry_id = part.entry_ids[0]
                log.error("entry cannot be processed", extra={"event": "dead_lettered", "reason": REASON_PROCESSING,
                                                              "entry_id": entry_id, "error": repr(exc)})
                return [], [Rejected(entry_id, payloads[entry_id], REASON_PROCESSING, repr(exc)[:500])]
            metrics.batch_failures.inc()
            log.warning("batch failed, bisecting", extra={"event": "batch_bisected", "entries": len(part), "error": repr(exc)})
            middle = len(part) // 2
            left = self._bisected(part.take(range(middle)), attempt, payloads)
            right = self._bisected(part.take(range(middle, len(part))), attempt, payloads)
            return left[0] + right[0], left[1] + right[1]

    def _score(self, batch: DecodedBatch) -> ScoredBatch:
        started = time.perf_counter()
        features = self._until_done(lambda: self.features.compute(batch), "redis")
        after_features = time.perf_counter()
        model, s = self.model, self.settings
        review = s.review_threshold if s.review_threshold is not None else model.review_threshold
        decline = s.decline_threshold if s.decline_threshold is not None else model.decline_threshold
        scores, decision, reasons = score_batch(model, self.rules, features, review, decline)
        metrics.stage_duration.labels("features").observe(after_features - started)
        metrics.stage_duration.labels("inference").observe(time.perf_counter() - after_features)
        metrics.duplicates.inc(int(features.seen.sum()))
        return ScoredBatch(
            batch=batch,
            event_ms=features.event_ms,
            seen=features.seen,
            score=scores,
            decision=decision,
            reasons=reasons,
            model_version=model.version,
            scored_at_ms=int(time.time() * 1000),
        )

    def _store(self, scored: ScoredBatch) -> ScoredBatch:
        started = time.perf_counter()
        self._until_done(lambda: self.store.store(scored), "postgres")
        metrics.stage_duration.labels("copy").observe(time.perf_counter() - started)
        return scored

    def _count(self, stored: list[ScoredBatch], dead: list[DeadLetter], alerts: int, committed_at: float) -> None:
        for scored in stored:
            counts = np.bincount(scored.decision, minlength=len(DECISIONS))
            for name, count in zip(DECISIONS, counts.tolist()):
                if count:
                    metrics.transactions.labels(name).inc(count)
            accepted_ms = np.array([int(i[: i.index("-")]) for i in scored.batch.entry_ids], dtype=np.float64)
            metrics.observe_many(metrics.e2e_latency, committed_at - accepted_ms / 1000.0)
        if dead:
            # One line per batch, not per entry: a producer sending garbage must not flood the logs
            # (each entry, with its reason and detail, is in the DLQ stream).
            reasons = collections.Counter(letter.rejected.reason for letter in dead)
            for reason, count in reasons.items():
                metrics.dead_letters.labels(reason).inc(count)
            log.warning("dead-lettered", extra={"event": "dead_lettered", "entries": len(dead), "reasons": dict(reasons)})
        metrics.alerts_written.inc(alerts)

    # -- waiting out outages ---------------------------------------------------------------

    def _until_done(self, attempt: Callable[[], _T], component: str) -> _T:
        """Run ``attempt`` until it succeeds, waiting out Redis/PostgreSQL outages with back-off.

        While waiting, the batch in flight is kept claimed (its idle time reset) so that no other
        worker takes over a batch this live worker is still responsible for.
        """
        delay = _BACKOFF_FIRST_S
        down_since = None
        while True:
            try:
                result = attempt()
            except REDIS_DOWN + POSTGRES_DOWN as exc:
                kind = "redis" if isinstance(exc, REDIS_DOWN) else "postgres"
                metrics.errors.labels(kind, type(exc).__name__).inc()
                if kind == "postgres":
                    self.store.close()
                if down_since is None:
                    down_since = time.monotonic()
                    log.error(f"{kind} unavailable, retrying", extra={"event": "outage", "component": kind, "error": str(exc)})
                if self.stopping and time.monotonic() - down_since > self.settings.shutdown_timeout_s / 2:
                    raise Stopping() from exc
                self._wait_keeping_claimed(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, _BACKOFF_MAX_S)
                continue
            if down_since is not None:
                log.info(f"{component} back", extra={"event": "recovered", "component": component,
                                                     "down_s": round(time.monotonic() - down_since, 3)})
            return result

    def _wait_keeping_claimed(self, seconds: float) -> None:
        """Sleep ``seconds``, refreshing the claim on the batch in flight at least three times per
        ``--claim-idle-ms``: a back-off step may be longer than that, and a claim left to go idle
        would let another worker take over (and redo) a batch this one still holds."""
        deadline = time.monotonic() + seconds
        step = self.settings.claim_idle_ms / 3000.0
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(step, left))
            self._keep_claimed()

    def _keep_claimed(self) -> None:
        in_flight = self._preparing + self._settling_ids
        if not in_flight:
            return
        try:
            self.redis.execute_command(
                "XCLAIM", self.settings.stream, self.settings.group, self.consumer, 0, *in_flight, "JUSTID"
            )
        except redis.RedisError:
            # Best effort: Redis is still away, or lost the group with these entries (the read or
            # the settle that is waiting recreates it).
            pass


def score_batch(model: FraudModel, rules: Rules, features: Features, review_threshold: float,
                decline_threshold: float) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """Scores, decisions and reason codes of a batch: one inference call, then the rules.

    The reasons of a row are the rules that fired, then, for non-approved rows, the model's top
    features. Offline scoring (training, tests) calls this too, so it decides as the daemon does.
    """
    scores = model.score(features.matrix)
    outcome = rules.evaluate(features)
    decision = decide(scores, review_threshold, decline_threshold, outcome)
    reasons = [list(codes) for codes in outcome.codes]
    flagged = np.flatnonzero(decision > 0)
    for i, codes in zip(flagged.tolist(), model.reasons(features.matrix[flagged])):
        reasons[i].extend(codes)
    return scores, decision, reasons


def _load_model(settings: Settings) -> FraudModel:
    try:
        return FraudModel.load(settings.model_path, FEATURE_NAMES)
    except ModelError as exc:
        raise BootError(str(exc)) from exc


def _load_rules(settings: Settings) -> Rules:
    try:
        return Rules.load(settings.rules_path)
    except RulesError as exc:
        raise BootError(str(exc)) from exc


def connect_redis(url: str) -> redis.Redis:
    """A client whose stream replies stay raw: decoding them per batch is cheaper than redis-py's per-entry dicts."""
    client = redis.Redis.from_url(url, protocol=2, socket_timeout=10, socket_connect_timeout=5,
                                  retry_on_timeout=False, health_check_interval=0)
    # XCLAIM too: redis-py parses its reply as entries, which a JUSTID reply (bare ids) is not.
    for command in ("XREADGROUP", "XAUTOCLAIM", "XPENDING", "XCLAIM"):
        client.set_response_callback(command, lambda response, **options: response)
    return client


def ensure_group(client: redis.Redis, stream: str, group: str) -> bool:
    """Create the consumer group from the stream's beginning if missing; True if it was created."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise
    return True


def worker_main(settings: Settings, index: int, status_fd: int | None = None, parent_pid: int | None = None) -> int:
    """Entry point of a forked worker process; ``status_fd`` is its pipe to ``parent_pid``, the supervisor."""
    return Worker(settings, index, status_fd, parent_pid).run()
