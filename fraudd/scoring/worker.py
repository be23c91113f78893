"""The scoring worker: what a consumer of the input stream does with each batch.

The batch loop, top to bottom (DESIGN.md):

    read      XREADGROUP COUNT (own pending first, then reclaimed, then new entries; the runtime's
              ``StreamConsumer``); new entries of all the worker's owned shards in one XREADGROUP
              (``ShardReader``), so a read spans shards
    models    the deployment's champion and challenger, swapped here when a promotion changed them
              (``model_deployment`` polled at most once a second): one read, one set of models
    decode    one orjson call per read (part by part when it holds an invalid entry); invalid
              entries become dead letters
    features  numpy over the users' states, read in one round trip and committed with the dedup
              markers in one more (the shard's ``FeatureStore``: a compare-and-set Function call on
              the shared state; on owned shards every shard of the read at once, one MULTI/EXEC
              fenced by each shard's lease, ``compute_owned``)
    inference one ONNX call per read, its shards' parts joined (``joined``: one more for a
              --shadow-model challenger), then vectorized rules and thresholds, and the result
              split back into the parts; the scores and the features' drift from the champion's
              training sample go to the metrics (numpy over the read)
    copy      one COPY of every decision of the read into PostgreSQL (durable first)
    settle    one Redis script call per shard of the read, sent in one round trip: alerts, dead
              letters, XACK (ack last), each fenced by its own shard's lease

With ``--pipeline-depth 2`` the last two stages of a read run in a settling thread while the main
thread reads and scores the next one: the waits on PostgreSQL and Redis overlap with work, and no
more than two reads are ever in flight. It pays where a worker waits on a distant database; with
as many workers as cores on one box the cores are busy anyway and the default of 1 is cheaper.
With owned shards each part of the settling read stays fenced by its own shard's lease (the next
read may be other shards'), and the reads of one shard still commit their features and settle in
order. A shard lost mid-read loses only its part: the other shards' parts are settled.

Failures are handled per kind. An unreachable Redis or PostgreSQL is waited out by the consumer:
the batch stays pending, nothing new is read, and the same batch is retried with bounded, jittered
back-off. A batch that fails for any other reason is bisected, so only the entries that cause the
failure are dead-lettered. A worker that cannot start (bad model or rules) raises ``BootError`` and
the supervisor stops instead of respawning it in a loop.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, cast

import numpy as np
import psycopg
import redis
from redis.cluster import RedisCluster

from .. import shard_counts
from ..rulesets.store import RuleSetError
from ..runtime import metrics
from ..runtime.consumer import Entries, Stopping, consume
from ..runtime.deadletters import REASON_MAX_DELIVERIES, Rejected
from ..runtime.health import Housekeeper, health_problems
from ..runtime.process import BootError, WorkerProcess, keep_freed_memory
from ..runtime.redis_clients import connect_redis
from ..runtime.supervisor import Service
from . import joined, thresholds, vectors
from .decode import DEAD_LETTER_REASONS, REASON_PROCESSING, DecodedBatch, decode_batch
from .dedup import CarriedOver
from .deployment import Deployed, DeploymentWatch
from .drift import Drift
from .features import FEATURE_NAMES, Features
from .features_owned import OwnedFeatureStore, compute_owned
from .leases import Fenced
from .model import FraudModel, ModelError
from .precision import FlaggedPrecision
from .rulebook import RuleBook, RuleSets
from .rules import ACTION_NAMES, DECISIONS, Rules, RulesError, decide, model_decision
from .settings import ScoringSettings
from .shards import Shard, ShardReader
from .sinks import (
    AlertDocument,
    DecisionStore,
    ScoredBatch,
    Settled,
    Shadow,
    ShadowRules,
    alert_documents,
    decision_replies,
    settle_together,
)

if TYPE_CHECKING:
    from prometheus_client import Counter

log = logging.getLogger(__name__)
_YOUNG_GENERATION = 20_000  # allocations between young collections (the default is 700)

# What ``_bisected`` splits, and what each attempt on a part makes of it.
_Part = TypeVar("_Part", DecodedBatch, ScoredBatch)
_Done = TypeVar("_Done")

# Series that exist from the start, at 0: a rate over them is 0 rather than absent, so dashboards
# and alerts see "nothing declined" instead of "no data".
for _label in DECISIONS:
    metrics.transactions.labels(_label)
for _label in DEAD_LETTER_REASONS:
    metrics.dead_letters.labels(_label)


@dataclass(frozen=True, slots=True)
class Models:
    """What scores a read: the champion with the thresholds it decides with, and the challenger."""

    champion: FraudModel
    thresholds: tuple[float, float]  # (review, decline)
    shadow: FraudModel | None
    shadow_thresholds: tuple[float, float]


@dataclass(slots=True, eq=False)
class Settlement:
    """One read on its way to PostgreSQL and the ack: what ``_settle`` needs, and nothing shared."""

    shard: Shard
    entries: Entries  # every entry of the read: all are acked together at the end
    scored: list[ScoredBatch]
    dead: list[Rejected]
    payloads: dict[str, bytes | None]  # for dead letters found while storing (None: no data field)


class ScoringWorker:
    """The batch handler of consumer ``<consumer-id>-<index>`` of the scoring group."""

    def __init__(self, settings: ScoringSettings, process: WorkerProcess) -> None:
        self.settings = settings
        # Owned shards: a paused owner's COPY must not hold its successor's rows locked for long.
        self.store = DecisionStore(
            settings.postgres.url, settings.postgres.schema, settings.lease_ms // 2 if settings.shards > 1 else 0
        )
        self.redis = connect_redis(settings.redis.url, settings.redis.cluster)
        self.reader = ShardReader(self.redis, settings, settings.consumer.consumer_name(process.index), process, self._on_outage)
        self.deployment = DeploymentWatch(settings.postgres.url, settings.postgres.schema)
        self._deployed: Deployed | None = None
        self._settling: Future[list[tuple[Settlement, Fenced]]] | None = None
        self._settling_thread = ThreadPoolExecutor(1, thread_name_prefix="settle") if settings.pipeline_depth > 1 else None

    # -- lifecycle -------------------------------------------------------------------------

    def boot(self) -> None:
        s = self.settings
        self._use(_load_models(s, None))
        self.rulebook = _rulebook(s)
        self.reader.until_done(self.reader.start, "redis")
        earlier = self.reader.until_done(lambda: shard_counts.recorded(self.redis, s.consumer.stream), "redis")
        self.carried_over = CarriedOver(
            s.consumer.stream, {count: last for count, last in earlier.items() if count != s.shards}, s.dedup_window_s * 1000
        )
        # Wait for PostgreSQL before reading anything: re-reading this consumer's pending entries
        # counts a delivery each time, so a worker respawned again and again during an outage would
        # otherwise push valid entries past --max-deliveries and dead-letter them as poison.
        self.reader.until_done(self.store.connect, "postgres")
        self.reader.until_done(lambda: _load_rule_sets(self.rulebook), "postgres")
        deployed = self.deployment.poll()
        if deployed is not None:
            self._deployed = deployed
            self._use(_load_models(s, deployed))
        self._publish_versions()

    def reload(self) -> None:
        """Swap rules, model and thresholds at a batch boundary; bad files are refused and the old
        ones kept (a thresholds file calibrated for another model is a bad file)."""
        try:
            models = _load_models(self.settings, self._deployed)
            rules = _load_rule_sets(self.rulebook).live  # last: it takes effect once loaded
        except (BootError, psycopg.Error) as exc:
            metrics.reloads.labels("refused").inc()
            log.error(
                "reload refused, keeping the running model and rules", extra={"event": "reload_refused", "reason": str(exc)}
            )
            return
        metrics.rules_info.labels(self._rules_in_use).set(0)
        self._use(models)
        self._publish_versions()
        metrics.reloads.labels("ok").inc()
        log.info(
            "model and rules reloaded",
            extra={
                "event": "reloaded",
                "model_version": models.champion.version,
                "rules_version": rules.version,
                "review_threshold": models.thresholds[0],
                "decline_threshold": models.thresholds[1],
            },
        )

    def _follow_deployment(self) -> None:
        """Swap to the deployment's models when a promotion or rollback changed them (checked at
        most once a second); files that cannot be loaded are refused, the running models kept, and
        the deployment tried again at the next poll."""
        deployed = self.deployment.poll()
        if deployed is None:
            return
        try:
            models = _load_models(self.settings, deployed)
        except BootError as exc:
            if self.deployment.refused(deployed):
                metrics.reloads.labels("refused").inc()
                log.error(
                    "deployment refused, keeping the running models until it loads",
                    extra={"event": "deployment_refused", "generation": deployed.generation, "reason": str(exc)},
                )
            return
        self._deployed = deployed
        self._use(models)
        self._publish_versions()
        log.info(
            "deployment followed",
            extra={
                "event": "deployment_followed",
                "generation": deployed.generation,
                "model_version": models.champion.version,
                "shadow_model_version": models.shadow.version if models.shadow else None,
                "review_threshold": models.thresholds[0],
                "decline_threshold": models.thresholds[1],
            },
        )

    def _use(self, models: Models) -> None:
        previous = getattr(self, "models", None)
        if previous is not None:
            metrics.model_info.labels(previous.champion.version).set(0)
        self.models = models
        # Drift is measured against the training sample of the model that decides.
        self.drift = Drift(models.champion)

    def drain(self) -> None:
        self._wait_for_settling()

    def close(self) -> None:
        if self._settling_thread is not None:
            self._settling_thread.shutdown(wait=True)
        self.reader.release_all()
        self.store.close()
        self.deployment.close()

    def _publish_versions(self) -> None:
        self._rules_in_use = self.rulebook.current.live.version
        metrics.model_info.labels(self.models.champion.version).set(1)
        metrics.rules_info.labels(self._rules_in_use).set(1)

    def _on_outage(self, kind: str) -> None:
        if kind == "postgres":
            self.store.close()

    # -- the batch loop --------------------------------------------------------------------

    def process(self, entries: Entries) -> None:
        """Decode this read, compute the features of all its shards together, score them
        together, then hand the read to ``_settle``: in the settling thread when
        ``--pipeline-depth`` is 2, so its COPY and settle overlap the scoring of the next read."""
        self._follow_deployment()
        decoded = self._decoded(self._live_parts())
        works = self._scored(decoded, self._features_of_read(decoded))
        # At most two reads in flight: the previous one settles before this one may start to.
        self._wait_for_settling()
        if not works:
            return
        if self._settling_thread is None:
            self._lost_all(self._settle(works))
        else:
            self._settling = self._settling_thread.submit(self._settle, works)

    def _lost(self, shard: Shard, entries: Entries, exc: Fenced) -> None:
        shard.consumer.release(entries)
        self.reader.lost(shard, str(exc))

    def _lost_all(self, fenced: list[tuple[Settlement, Fenced]]) -> None:
        # In the batch loop's thread: the settling thread only reports the shards it found lost.
        for work, exc in fenced:
            self._lost(work.shard, work.entries, exc)

    def _live_parts(self) -> list[tuple[Settlement, Entries]]:
        """The read's parts of the shards still this worker's, each with its poison set aside as
        dead letters, and the entries left to decode."""
        parts = []
        for shard, entries in self.reader.parts:
            try:
                shard.check()
            except Fenced as exc:
                self._lost(shard, entries, exc)
                continue
            fresh, poison = shard.consumer.split_poison(entries)
            dead = [
                Rejected(
                    p.entry_id,
                    p.payload,
                    REASON_MAX_DELIVERIES,
                    p.detail,
                    p.deliveries,
                    entries.kept_fields(p.entry_id, p.payload),
                )
                for p in poison
            ]
            parts.append((Settlement(shard, entries, [], dead, dict(zip(fresh.ids, fresh.payloads))), fresh))
        return parts

    def _decoded(self, parts: list[tuple[Settlement, Entries]]) -> list[tuple[Settlement, DecodedBatch]]:
        """Every part decoded, its invalid entries set aside as dead letters: in one call over the
        read, cut back into the parts; when that call rejects an entry, part by part, so that each
        rejection stays with its part (two shards' streams may hold the same entry id)."""
        started = time.perf_counter()
        whole = None
        if len(parts) > 1:
            whole = decode_batch(
                [i for _w, fresh in parts for i in fresh.ids], [p for _w, fresh in parts for p in fresh.payloads]
            )
        if whole is not None and not whole.rejected:
            bounds = list(itertools.accumulate((len(fresh) for _w, fresh in parts), initial=0))
            batches = [whole.take(range(start, end)) for start, end in zip(bounds, bounds[1:])]
        else:
            batches = [decode_batch(fresh.ids, fresh.payloads) for _w, fresh in parts]
        metrics.stage_duration.labels("decode").observe(time.perf_counter() - started)
        for (work, _fresh), batch in zip(parts, batches):
            work.dead += _delivered(batch.rejected, work.entries)
        return [(work, batch) for (work, _fresh), batch in zip(parts, batches)]

    def _features_of_read(self, decoded: list[tuple[Settlement, DecodedBatch]]) -> list[Features | Fenced | None]:
        """Every shard's features, computed together (owned shards: one read and one fenced commit
        for them all, ``features_owned.compute_owned``); ``Fenced`` for a shard lost meanwhile, and
        None for all when that failed as a whole: each shard's batch is then scored apart, bisected
        down to the entries at fault."""
        if not decoded:
            return []
        started = time.perf_counter()
        try:
            features = decoded[0][0].shard.consumer.until_done(lambda: self._features_together(decoded), "redis")
        except (Stopping, Fenced):
            raise
        except Exception as exc:  # noqa: BLE001 - the data is at fault: find it shard by shard
            log.warning(
                "read failed to compute its features, scoring shard by shard", extra={"event": "batch_split", "error": repr(exc)}
            )
            return [None] * len(decoded)
        metrics.stage_duration.labels("features").observe(time.perf_counter() - started)
        return list(features)

    def _features_together(self, decoded: list[tuple[Settlement, DecodedBatch]]) -> list[Features | Fenced]:
        for work, batch in decoded:
            self._adopt_carried_over(work.shard, batch)
        owned = [(work.shard.features, batch) for work, batch in decoded]
        if all(isinstance(store, OwnedFeatureStore) for store, _batch in owned):
            return compute_owned(cast(list[tuple[OwnedFeatureStore, DecodedBatch]], owned))
        return [store.compute(batch) for store, batch in owned]

    def _scored(
        self, decoded: list[tuple[Settlement, DecodedBatch]], features: list[Features | Fenced | None]
    ) -> list[Settlement]:
        """The read's parts scored; returns those whose shard is still this worker's. The parts with
        their features are scored together, in one inference call over their rows joined
        (``joined``), and the result split back into the parts; a part without features, or every
        part when scoring them together fails, is scored on its own (``_score_part``)."""
        works: list[Settlement] = []
        together: list[tuple[Settlement, DecodedBatch, Features]] = []
        apart: list[tuple[Settlement, DecodedBatch, Features | None]] = []
        for (work, batch), computed in zip(decoded, features):
            if isinstance(computed, Fenced):
                self._lost(work.shard, work.entries, computed)
                continue
            works.append(work)
            if not len(batch):  # every entry was poison or invalid: dead letters only
                continue
            if computed is None:
                apart.append((work, batch, None))
            else:
                together.append((work, batch, computed))
        if together:
            parts = [batch for _work, batch, _features in together]
            try:
                scored = self._decided(joined.batches(parts), joined.features([f for _w, _b, f in together]))
                for (work, _batch, _features), part in zip(together, joined.split(scored, parts)):
                    work.scored = [part]
            except (Stopping, Fenced):
                raise
            except Exception as exc:  # noqa: BLE001 - the data is at fault: find it shard by shard
                log.warning("read failed to score, scoring shard by shard", extra={"event": "batch_split", "error": repr(exc)})
                apart += together
        for work, batch, computed in apart:
            try:
                self._score_part(work, batch, computed)
            except Fenced as exc:
                works.remove(work)
                self._lost(work.shard, work.entries, exc)
        return works

    def _score_part(self, work: Settlement, batch: DecodedBatch, features: Features | None) -> None:
        """A shard's batch scored on its own with the features of its read, or, without them or
        when scoring fails, bisected down to the entries at fault (dead-lettered); ``Fenced`` when
        its shard was lost meanwhile."""
        if features is not None:
            try:
                work.scored = [self._decided(batch, features)]
                return
            except (Stopping, Fenced):
                raise
            except Exception as exc:  # noqa: BLE001 - the data is at fault: find it by bisecting
                log.warning("batch failed to score, bisecting", extra={"event": "batch_split", "error": repr(exc)})
        scored, failed = self._bisected(batch, lambda part: self._score(work.shard, part), work.payloads)
        work.scored = scored
        work.dead += _delivered(failed, work.entries)

    def _wait_for_settling(self) -> None:
        if self._settling is not None:
            settling, self._settling = self._settling, None
            self._lost_all(settling.result())  # re-raises what the settling thread met, Stopping included

    def _settle(self, works: list[Settlement]) -> list[tuple[Settlement, Fenced]]:
        """Durable first, ack last: one COPY of every decision of the read, then one Redis round
        trip in which each shard's part is settled atomically, fenced by that shard's lease.
        Returns the parts whose shard was lost (nothing of them was acked)."""
        fenced: list[tuple[Settlement, Fenced]] = []
        live = []
        for work in works:
            try:
                work.shard.check()
                live.append(work)
            except Fenced as exc:
                fenced.append((work, exc))
        stored = self._store_all(live, fenced)
        live = [work for work in live if work in stored]
        if not live:
            return fenced
        started = time.perf_counter()
        alerts = {work: [doc for scored in stored[work] for doc in alert_documents(scored)] for work in live}
        replies = {work: decision_replies(stored[work], _reply_channels(work.entries)) for work in live}
        outcomes = self._settle_in_redis(live, alerts, replies)
        committed_at = time.time()
        settled: list[tuple[Settlement, Settled]] = []
        for work, outcome in zip(live, outcomes):
            if isinstance(outcome, Fenced):
                fenced.append((work, outcome))
                continue
            work.shard.consumer.release(work.entries)
            settled.append((work, outcome))
        # Counted once for the read, whatever the number of its shards.
        self._count(
            [scored for work, _outcome in settled for scored in stored[work]],
            [rejected for work, _outcome in settled for rejected in work.dead],
            sum(outcome.alerts for _work, outcome in settled),
            committed_at,
        )
        metrics.stage_duration.labels("settle").observe(time.perf_counter() - started)
        return fenced

    def _store_all(self, works: list[Settlement], fenced: list[tuple[Settlement, Fenced]]) -> dict[Settlement, list[ScoredBatch]]:
        """Every decision of ``works`` in one COPY; when that fails as a whole, each shard's part
        apart, bisected down to the entries at fault (dead-lettered), and the parts whose shard
        was lost meanwhile left out (added to ``fenced``)."""
        batches = [scored for work in works for scored in work.scored]
        if len(works) > 1 and batches:
            started = time.perf_counter()
            try:
                works[0].shard.consumer.until_done(lambda: self._store_checked(works, batches), "postgres")
                metrics.stage_duration.labels("copy").observe(time.perf_counter() - started)
                return {work: work.scored for work in works}
            except Stopping:
                raise
            except Fenced:
                pass  # one shard was lost while the COPY waited: the others' parts are stored apart
            except Exception as exc:  # noqa: BLE001 - the data is at fault: find it part by part
                log.warning("read failed to store, storing shard by shard", extra={"event": "batch_split", "error": repr(exc)})
        stored: dict[Settlement, list[ScoredBatch]] = {}
        for work in works:
            try:
                stored[work] = self._store_part(work)
            except Fenced as exc:
                fenced.append((work, exc))
        return stored

    def _store_part(self, work: Settlement) -> list[ScoredBatch]:
        stored: list[ScoredBatch] = []
        for scored in work.scored:
            ok, failed = self._bisected(scored, lambda part: self._store(work.shard, part), work.payloads)
            stored += ok
            work.dead += _delivered(failed, work.entries)
        return stored

    def _store_checked(self, works: list[Settlement], batches: list[ScoredBatch]) -> None:
        for work in works:
            work.shard.check()
        self.store.store_all(batches)

    def _settle_in_redis(
        self, works: list[Settlement], alerts: dict[Settlement, list[AlertDocument]], replies: dict[Settlement, dict[str, bytes]]
    ) -> list[Settled | Fenced]:
        """Each part's settle, sent together in one round trip when the shards share one Redis."""
        calls = [(work.shard.settler, work.entries.ids, alerts[work], work.dead, replies[work]) for work in works]
        outcomes: list[Settled | Fenced | redis.ResponseError | None] = [None] * len(works)
        for i, work in enumerate(works):
            try:
                work.shard.check()
            except Fenced as exc:
                outcomes[i] = exc
        together = [i for i, outcome in enumerate(outcomes) if outcome is None]
        client = self.redis
        if len(together) > 1 and not isinstance(client, RedisCluster):
            sent = works[together[0]].shard.consumer.until_done(
                lambda: settle_together(client, [calls[i] for i in together]), "redis"
            )
            for i, reply in zip(together, sent):
                outcomes[i] = reply
        settled: list[Settled | Fenced] = []
        for work, call, outcome in zip(works, calls, outcomes):
            # Alone (a Redis Cluster, or the script or the group to be restored first): a part
            # settles atomically on its own, so settling it again writes each alert once.
            alone = outcome is None or isinstance(outcome, redis.ResponseError)
            settled.append(self._settle_alone(work, *call[2:]) if alone else cast(Settled | Fenced, outcome))
        return settled

    def _settle_alone(
        self, work: Settlement, alerts: list[AlertDocument], dead: list[Rejected], replies: dict[str, bytes]
    ) -> Settled | Fenced:
        settler = work.shard.settler

        def attempt() -> Settled:
            try:
                return settler.settle(work.entries.ids, alerts, dead, replies)
            except redis.ResponseError as exc:
                work.shard.consumer.recreate_lost_group(exc)
            # Alerts and dead letters are guarded by their markers, so settling again writes each
            # once; acking the recreated group's absent entries is a no-op.
            return settler.settle(work.entries.ids, alerts, dead, replies)

        try:
            work.shard.check()
            return work.shard.consumer.until_done(attempt, "redis")
        except Fenced as exc:
            return exc

    def _bisected(
        self, part: _Part, attempt: Callable[[_Part], _Done], payloads: dict[str, bytes | None]
    ) -> tuple[list[_Done], list[Rejected]]:
        """``attempt(part)``; when it fails as a whole, bisect down to the entries at fault.

        Outages never get here (``until_done`` waits them out), so what fails is the data: the
        entries that fail alone are dead-lettered and the rest go on.
        """
        if len(part) == 0:
            return [], []
        try:
            return [attempt(part)], []
        except (Stopping, Fenced):
            raise
        except Exception as exc:
            if len(part) == 1:
                entry_id = part.entry_ids[0]
                log.error(
                    "entry cannot be processed",
                    extra={"event": "dead_lettered", "reason": REASON_PROCESSING, "entry_id": entry_id, "error": repr(exc)},
                )
                return [], [Rejected(entry_id, payloads[entry_id] or b"", REASON_PROCESSING, repr(exc)[:500])]
            metrics.batch_failures.inc()
            log.warning("batch failed, bisecting", extra={"event": "batch_bisected", "entries": len(part), "error": repr(exc)})
            middle = len(part) // 2
            left = self._bisected(part.take(range(middle)), attempt, payloads)
            right = self._bisected(part.take(range(middle, len(part))), attempt, payloads)
            return left[0] + right[0], left[1] + right[1]

    def _adopt_carried_over(self, shard: Shard, batch: DecodedBatch) -> None:
        """Adopt the dedup markers an earlier shard count wrote for the batch's transactions."""
        now_ms = int(time.time() * 1000)
        adopted = self.carried_over.adopt(self.redis, shard.keys, batch.transaction_id, batch.user_id, batch.timestamp, now_ms)
        if adopted:
            log.info(
                "transactions seen under an earlier shard count",
                extra={"event": "carried_over", "transactions": adopted},
            )

    def _features(self, shard: Shard, batch: DecodedBatch) -> Features:
        """The batch's features, after adopting the dedup markers of an earlier shard count."""
        self._adopt_carried_over(shard, batch)
        return shard.features.compute(batch)

    def _score(self, shard: Shard, batch: DecodedBatch) -> ScoredBatch:
        """A part of a shard's batch on its own: its features, then ``_decided``."""
        started = time.perf_counter()
        features = shard.consumer.until_done(lambda: self._features(shard, batch), "redis")
        metrics.stage_duration.labels("features").observe(time.perf_counter() - started)
        return self._decided(batch, features)

    def _decided(self, batch: DecodedBatch, features: Features) -> ScoredBatch:
        """The batch scored: one inference call, the live rules (and the shadow model and rules)."""
        started = time.perf_counter()
        models = self.models
        model = models.champion
        # One pointer read per batch picks the rule sets: the whole batch is decided by one version.
        rule_sets = self.rulebook.for_batch(features.published_rules)
        if rule_sets.live.version != self._rules_in_use:
            metrics.rules_info.labels(self._rules_in_use).set(0)
            self._publish_versions()
        rules = rule_sets.live
        decided = score_batch(model, rules, features, *models.thresholds)
        for rule, count in rules.take_hits():
            metrics.rule_hits.labels(rule.code, ACTION_NAMES[rule.action]).inc(count)
        shadow = None
        if models.shadow is not None:
            challenger = score_batch(models.shadow, rules, features, *models.shadow_thresholds, explain=False)
            shadow = Shadow(challenger.scores, challenger.decision, models.shadow.version)
            rules.take_hits()  # the same rules fired again for the challenger: counted once above
        shadow_rules = None
        if rule_sets.shadow is not None:
            shadow_rules = ShadowRules(
                decide(decided.model_decision, rule_sets.shadow.evaluate(features).action), rule_sets.shadow.version
            )
            for rule, count in rule_sets.shadow.take_hits():
                metrics.shadow_rule_hits.labels(rule_sets.shadow.version, rule.code).inc(count)
        metrics.stage_duration.labels("inference").observe(time.perf_counter() - started)
        metrics.observe_many(metrics.scores, decided.scores)
        self.drift.observe(features)
        metrics.duplicates.inc(int(features.seen.sum()))
        return scored_batch(batch, features, decided, model.version, rules.version, shadow, shadow_rules)

    def _store(self, shard: Shard, scored: ScoredBatch) -> ScoredBatch:
        started = time.perf_counter()

        def attempt() -> None:
            shard.check()
            self.store.store(scored)

        shard.consumer.until_done(attempt, "postgres")
        metrics.stage_duration.labels("copy").observe(time.perf_counter() - started)
        return scored

    def _count(self, stored: list[ScoredBatch], dead: list[Rejected], alerts: int, committed_at: float) -> None:
        if stored:
            decision = np.concatenate([scored.decision for scored in stored])
            counts = np.bincount(decision, minlength=len(DECISIONS))
            for name, count in zip(DECISIONS, counts.tolist()):
                if count:
                    metrics.transactions.labels(name).inc(count)
            for counter, challenger in ((metrics.shadow_decisions, "shadow"), (metrics.shadow_rules_decisions, "shadow_rules")):
                pairs = [(s.decision, getattr(s, challenger).decision) for s in stored if getattr(s, challenger) is not None]
                if pairs:
                    acting, shadow = zip(*pairs)
                    _count_pairs(counter, np.concatenate(acting), np.concatenate(shadow))
            # An entry id is "<ms>-<seq>": one join and one split give every id's milliseconds.
            entry_ids = "-".join(["-".join(scored.batch.entry_ids) for scored in stored if scored.batch.entry_ids])
            accepted_ms = np.array(entry_ids.split("-")[::2], dtype=np.int64).astype(np.float64)
            metrics.observe_many(metrics.e2e_latency, committed_at - accepted_ms / 1000.0)
        if dead:
            # One line per batch, not per entry: a producer sending garbage must not flood the logs
            # (each entry, with its reason and detail, is in the DLQ stream).
            reasons = collections.Counter(rejected.reason for rejected in dead)
            for reason, count in reasons.items():
                metrics.dead_letters.labels(reason).inc(count)
            log.warning("dead-lettered", extra={"event": "dead_lettered", "entries": len(dead), "reasons": dict(reasons)})
        metrics.alerts_written.inc(alerts)


def _delivered(rejected: list[Rejected], entries: Entries) -> list[Rejected]:
    """``rejected`` with how often each entry was delivered (1 for those read once), and the fields
    an entry without data keeps (``Entries.kept_fields``)."""
    return [
        dataclasses.replace(r, deliveries=entries.deliveries.get(r.entry_id, 1), kept=entries.kept_fields(r.entry_id, r.payload))
        for r in rejected
    ]


def _count_pairs(counter: Counter, acting: np.ndarray, shadow: np.ndarray) -> None:
    """Count rows by (acting decision, shadow decision): one bincount, then one increment per pair seen."""
    pairs = np.bincount(acting.astype(np.intp) * len(DECISIONS) + shadow, minlength=len(DECISIONS) ** 2)
    for pair, count in enumerate(pairs.tolist()):
        if count:
            first, second = divmod(pair, len(DECISIONS))
            counter.labels(DECISIONS[first], DECISIONS[second]).inc(count)


def _reply_channels(entries: Entries) -> dict[str, str]:
    """Entry id -> decisions channel of the entries written by ``/v1/score`` (field ``reply``)."""
    return {entry_id: fields[b"reply"].decode() for entry_id, fields in entries.extra.items() if b"reply" in fields}


class BatchDecisions(NamedTuple):
    """What the model and the rules decided for a batch, row by row."""

    scores: np.ndarray  # float32
    decision: np.ndarray  # int8 index into DECISIONS
    reasons: list[list[str]]
    explanations: list[dict[str, Any] | None]  # the model's explanation of each non-approved row
    model_decision: np.ndarray  # int8: the model's thresholds alone, before the rules


def score_batch(
    model: FraudModel,
    rules: Rules,
    features: Features,
    review_threshold: float,
    decline_threshold: float,
    explain: bool = True,
) -> BatchDecisions:
    """Scores, decisions, reason codes and explanations of a batch: one inference call, then the rules.

    The reasons of a row are the rules that fired, then, for non-approved rows, the features that
    pushed its score up most. Only non-approved rows are explained, so the cost follows the flag
    rate, not the traffic; ``explain=False`` (a shadow model, a backtest) skips it. Offline scoring
    (training, tests) calls this too, so it decides as the daemon does.
    """
    inputs = model.inputs(features)
    scores = model.score(inputs)
    outcome = rules.evaluate(features)
    by_model = model_decision(scores, review_threshold, decline_threshold)
    decision = decide(by_model, outcome.action)
    reasons = [list(codes) for codes in outcome.codes]
    explanations: list[dict[str, Any] | None] = [None] * len(scores)
    if explain:
        flagged = np.flatnonzero(decision > 0)
        model_reasons, documents = model.explain(inputs[flagged])
        for i, codes, document in zip(flagged.tolist(), model_reasons, documents):
            reasons[i].extend(codes)
            explanations[i] = document
    return BatchDecisions(scores, decision, reasons, explanations, by_model)


def scored_batch(
    batch: DecodedBatch,
    features: Features,
    decided: BatchDecisions,
    model_version: str,
    rules_version: str,
    shadow: Shadow | None = None,
    shadow_rules: ShadowRules | None = None,
) -> ScoredBatch:
    """A batch with what was decided for it and the feature vectors it was decided from, stamped
    now: what the settle stores."""
    return ScoredBatch(
        batch=batch,
        event_ms=features.event_ms,
        seen=features.seen,
        score=decided.scores,
        decision=decided.decision,
        reasons=decided.reasons,
        explanations=decided.explanations,
        model_version=model_version,
        scored_at_ms=int(time.time() * 1000),
        rules_version=rules_version,
        vectors=vectors.pack(features, decided.model_decision),
        shadow=shadow,
        shadow_rules=shadow_rules,
    )


def _load_models(settings: ScoringSettings, deployed: Deployed | None) -> Models:
    """The deployment's models with their registered thresholds; without one, the flags'."""
    if deployed is None:
        champion = _load_model(settings.model_path, "--model-path")
        shadow = None if settings.shadow_model is None else _load_model(settings.shadow_model, "--shadow-model")
        return Models(
            champion,
            _thresholds(settings, champion),
            shadow,
            (shadow.review_threshold, shadow.decline_threshold) if shadow else (1.0, 1.0),
        )
    chosen, challenger = deployed.champion, deployed.shadow
    champion = _load_model(chosen.path, f"deployed model {chosen.version}")
    shadow = None if challenger is None else _load_model(challenger.path, f"deployed shadow model {challenger.version}")
    return Models(
        champion,
        (chosen.review_threshold, chosen.decline_threshold),
        shadow,
        (challenger.review_threshold, challenger.decline_threshold) if challenger else (1.0, 1.0),
    )


def _load_model(path: Path, what: str) -> FraudModel:
    try:
        return FraudModel.load(path, FEATURE_NAMES)
    except ModelError as exc:
        raise BootError(f"{what}: {exc}") from exc


def _thresholds(settings: ScoringSettings, model: FraudModel) -> tuple[float, float]:
    """(review, decline): from --thresholds (re-read at every reload), the flags, or the model's own."""
    if settings.thresholds is not None:
        try:
            chosen = thresholds.load(settings.thresholds)
            chosen.check_model(model.version, settings.thresholds)
        except thresholds.ThresholdsError as exc:
            raise BootError(str(exc)) from exc
        return chosen.review_threshold, chosen.decline_threshold
    review = settings.review_threshold if settings.review_threshold is not None else model.review_threshold
    decline = settings.decline_threshold if settings.decline_threshold is not None else model.decline_threshold
    return review, decline


def _rulebook(settings: ScoringSettings) -> RuleBook:
    try:
        return RuleBook(settings.postgres, settings.rules_path)
    except RulesError as exc:
        raise BootError(str(exc)) from exc


def _load_rule_sets(rulebook: RuleBook) -> RuleSets:
    """The stored live and shadow sets (else the rules file); an unusable one stops the worker's start."""
    try:
        return rulebook.load()
    except (RulesError, RuleSetError) as exc:
        raise BootError(str(exc)) from exc


def service(settings: ScoringSettings) -> Service:
    """``fraudd run``: the supervisor's view of the scoring workers."""
    housekeeper = Housekeeper(settings.redis, settings.postgres, settings.consumer, settings.input_streams, partitions=True)
    precision = FlaggedPrecision(settings.postgres.url, settings.postgres.schema)

    def housekeeping() -> None:
        housekeeper.run_once()
        housekeeper.keep_input(settings.consumer.stream, settings.shards, settings.retention_s)
        precision.run_once()

    return Service(
        name="fraudd",
        workers=settings.consumer.workers,
        run_worker=lambda process: worker_main(settings, process),
        worker_name=settings.consumer.consumer_name,
        shutdown_timeout_s=settings.consumer.shutdown_timeout_s,
        log_level=settings.log_level,
        metrics_listen=settings.metrics.listen,
        housekeeping=housekeeping,
        health_problems=lambda: health_problems(settings.postgres, housekeeper.redis),
        summary=housekeeper.summary,
    )


def worker_main(settings: ScoringSettings, process: WorkerProcess) -> int:
    """Entry point of a forked scoring worker; returns its exit code."""
    worker = ScoringWorker(settings, process)
    # A batch holds a few thousand fresh containers (a dict per payload, lists per column) until it
    # is done: at the default threshold (700) the collector ran several times per batch, scanning
    # them and, in its older generations, the whole start-up heap (modules, model, clients), ≈ 2 µs
    # of CPU per transaction. Frozen, the start-up heap leaves every collection; a young generation
    # larger than a batch lets most of a batch die by reference count before a collection sees it.
    gc.freeze()
    gc.set_threshold(max(_YOUNG_GENERATION, 20 * settings.consumer.batch_size), *gc.get_threshold()[1:])
    keep_freed_memory()
    return consume(process, worker.reader, worker)
