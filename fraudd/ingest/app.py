"""The HTTP API between the payment gateway and the input stream (aiohttp on uvloop).

``make_app`` is the application factory; ``Api`` holds the handlers, one method per endpoint.
What every write route requires (key, backpressure, media type, size, signature) is checked in one
place, ``Ingest.receive``, against the route's ``WriteRoute``, so a write handler only judges each
transaction with the worker's own checks (``scoring.decode.check_payload``), hands the valid ones
to the coalescing ``Publisher``, and answers. Everything that could fail on bad input answers 4xx
with a JSON body naming the field and the problem; ``openapi.json`` next to this module is the
contract.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import redis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from redis.cluster import RedisCluster

from ..keys import Keys
from ..learning.labels import label_entries, parse_labels
from ..runtime.groups import group_state
from ..runtime.health import HEALTH_CACHE_S, HealthProblem, health_body, log_health_change
from ..runtime.redis_clients import NO_SUCH_KEY, REDIS_FAILURES, AsyncNodes, redis_client, redis_error_code
from ..runtime.redis_wire import pack
from ..scoring.decode import (
    MAX_PAYLOAD_BYTES,
    REASON_NOT_JSON,
    REASON_NOT_UTF8,
    REASON_TOO_LARGE,
    Problem,
    check_payload,
    check_transaction,
    json_value,
)
from . import auth
from . import metrics as ingest_metrics
from .decisions import Decisions, StoredDecisions, instance_name
from .publisher import Accepted, CoalescingPublisher, Submission, fingerprint
from .settings import IngestSettings

log = logging.getLogger(__name__)

OPENAPI_PATH = Path(__file__).with_name("openapi.json")
JSON = "application/json"
NDJSON = "application/x-ndjson"
LAG_CHECK_INTERVAL_S = 0.5
# How far a label's reported_at may be ahead of this host's clock (the reporter's clock may be).
REPORTED_AT_SKEW = timedelta(minutes=5)
RETRY_AFTER_S = "1"
# Per batch item beyond its own JSON: separators and the array brackets.
_BATCH_OVERHEAD_BYTES = 16
_PROBLEM_STATUS = {REASON_NOT_JSON: 400, REASON_NOT_UTF8: 400, REASON_TOO_LARGE: 413}

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class Refusal(Exception):
    """Answer the request with ``status`` and a JSON error body, and stop handling it."""

    def __init__(
        self, status: int, error: str, detail: str | None = None, field: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(error)
        self.status, self.error, self.detail, self.field, self.headers = status, error, detail, field, headers

    def response(self) -> web.Response:
        body = {"error": self.error}
        if self.field is not None:
            body["field"] = self.field
        if self.detail is not None:
            body["detail"] = self.detail
        return web.Response(status=self.status, body=orjson.dumps(body), content_type=JSON, headers=self.headers)


def _problem_refusal(problem: Problem) -> Refusal:
    return Refusal(_PROBLEM_STATUS.get(problem.reason, 422), problem.reason, problem.message, problem.field)


def _conflict(transaction_id: str, earlier_id: str | None) -> Refusal:
    return Refusal(
        409,
        "conflict",
        f"transaction_id {transaction_id} was accepted earlier (entry {earlier_id}) with another body; "
        "a retry must send the same transaction, another transaction needs its own transaction_id",
        "transaction_id",
    )


def _unavailable(detail: str) -> Refusal:
    return Refusal(503, "unavailable", detail, headers={"Retry-After": RETRY_AFTER_S})


@dataclass(slots=True)
class Backpressure:
    """Whether the consumer group lags too far behind for more writes, refreshed in the background."""

    overloaded: bool = False
    lag: int = 0


class Ingest:
    """One process's state: Redis clients, the publisher, the decision channel, auth."""

    def __init__(self, settings: IngestSettings, authenticator: auth.Authenticator) -> None:
        self.settings = settings
        self.auth = authenticator
        # The unsharded keys hold what is not per shard (signature markers).
        self.keys = Keys(settings.stream, settings.fraud_stream, settings.dlq_stream)
        # Every call touches one slot and goes to the node serving it (on a Redis Cluster).
        self.nodes = AsyncNodes(settings.redis.url, settings.redis.cluster, socket_timeout=5, socket_connect_timeout=3)
        # Group state is read with the runtime's (synchronous) helper, in a thread, with a client
        # made there on first use (a cluster client connects when made, and Redis may be away).
        self._lag_client: redis.Redis | RedisCluster | None = None
        self._lag_unknown = False
        shard_keys = [Keys(stream, settings.fraud_stream, settings.dlq_stream) for stream in settings.input_streams]
        self.publisher = CoalescingPublisher(self.nodes, shard_keys, instance_name(), settings.dedup_window_s * 1000)
        self.decisions = Decisions(self.nodes, self.publisher.channels)
        self.stored = StoredDecisions(settings.postgres.url, settings.postgres.schema)
        self.backpressure = Backpressure()
        self.tally = ingest_metrics.Tally()
        self.max_batch_bytes = settings.max_batch * (MAX_PAYLOAD_BYTES + _BATCH_OVERHEAD_BYTES)
        self._watch: asyncio.Task | None = None
        # /healthz probes at most once per HEALTH_CACHE_S; requests arriving meanwhile share the answer.
        self._health_lock = asyncio.Lock()
        self._health: list[HealthProblem] = []
        self._health_expires = 0.0

    async def start(self) -> None:
        self.decisions.start()
        self._watch = asyncio.create_task(self._watch_lag())

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        self.tally.flush()
        await self.decisions.stop()
        await self.stored.close()
        await self.nodes.aclose()
        if self._lag_client is not None:
            self._lag_client.close()

    def _lag(self) -> int:
        """The largest lag of the scoring group over the input shards (a shard not created yet lags 0)."""
        s = self.settings
        if self._lag_client is None:
            self._lag_client = redis_client(
                s.redis.url, s.redis.cluster, decode_responses=True, socket_timeout=5, socket_connect_timeout=3
            )
        lags = [0]
        for stream in s.input_streams:
            try:
                lags.append(group_state(self._lag_client, stream, s.group).lag)
            except redis.ResponseError as exc:
                if redis_error_code(exc) != NO_SUCH_KEY:
                    raise
        return max(lags)

    async def _watch_lag(self) -> None:
        s = self.settings
        while True:
            lag = None
            try:
                lag = await asyncio.to_thread(self._lag)
            except (*REDIS_FAILURES, OSError) as exc:
                if not self._lag_unknown:
                    log.warning("group lag unknown", extra={"event": "lag_unknown", "error": str(exc)})
                self._lag_unknown = True
            if lag is not None:
                self._lag_unknown = False
                self.backpressure.lag = lag
                overloaded = lag > s.max_lag
                if overloaded != self.backpressure.overloaded:
                    log.warning(
                        "backpressure " + ("on" if overloaded else "off"),
                        extra={"event": "backpressure", "on": overloaded, "lag": lag},
                    )
                self.backpressure.overloaded = overloaded
            self.tally.flush()
            await asyncio.sleep(LAG_CHECK_INTERVAL_S)

    # -- the checks every write route shares ------------------------------------------------

    def authorize(self, request: web.BaseRequest, scope: str) -> auth.ApiKey | None:
        """The caller's key (None when auth is off); refuses a missing or unknown key with 401, a
        key without ``scope`` with 403."""
        if not self.auth.enabled:
            return None
        key = self.auth.key_for(request.headers.get("Authorization"))
        if key is None:
            raise Refusal(401, "unauthorized", headers={"WWW-Authenticate": 'Bearer realm="fraudd"'})
        if scope not in key.scopes:
            raise Refusal(403, "forbidden", f"this API key lacks the scope {scope}")
        return key

    async def check_signature(self, request: web.BaseRequest, key: auth.ApiKey | None, body: bytes) -> None:
        """With ``--require-signature``: a valid, fresh, never-seen signature of the method, the
        request target and the body, else 403."""
        if not self.settings.require_signature or key is None:
            return
        signature = request.headers.get(auth.SIGNATURE_HEADER)
        problem = auth.signature_problem(
            key,
            request.headers.get(auth.TIMESTAMP_HEADER),
            signature,
            request.method,
            request.raw_path,
            body,
            self.settings.signature_window_s,
        )
        if problem is None and signature is not None:  # (a missing signature is a problem)
            marker = self.keys.signature_prefix + signature[len(auth.SIGNATURE_VERSION) :]
            # Kept until its timestamp leaves the window (plus a second): a replay after that is
            # refused by the timestamp alone, so markers live at most one window on average.
            expires_ms = (int(request.headers[auth.TIMESTAMP_HEADER]) + self.settings.signature_window_s + 1) * 1000
            try:
                fresh = await self.nodes.on_node(marker, lambda node: node.set(marker, b"1", nx=True, pxat=expires_ms))
            except (*REDIS_FAILURES, OSError) as exc:
                raise _unavailable("redis: " + type(exc).__name__) from None
            problem = None if fresh else "replayed"
        if problem is not None:
            log.info("request signature refused", extra={"event": "signature_refused", "reason": problem, "key_id": key.key_id})
            raise Refusal(403, "forbidden")

    def observed(self, route: WriteRoute) -> Handler:
        """``route``'s handler behind the shared checks, answering refusals as JSON and counted in
        ``/metrics`` by route and status."""
        handler, tally = route.handler, self.tally

        async def observed(request: web.BaseRequest) -> web.Response:
            started = time.monotonic()
            try:
                response = await handler(await self.receive(request, route, started))
            except Refusal as refusal:
                response = refusal.response()
            tally.request(route.path, response.status, time.monotonic() - started)
            return response

        return observed

    async def receive(self, request: web.BaseRequest, route: WriteRoute, started: float) -> Received:
        """The checks every write route shares, in order: key (401) and its scope (403),
        backpressure (503), media type and size (415, 413, 408), signature (403)."""
        key = self.authorize(request, route.scope)
        if route.admit:
            self.admit()
        body = await self.body(request, route.media_types, route.max_bytes)
        await self.check_signature(request, key, body)
        return Received(request, body, started)

    def admit(self) -> None:
        if self.backpressure.overloaded:
            raise Refusal(
                503,
                "overloaded",
                f"consumer group lag {self.backpressure.lag} > {self.settings.max_lag}",
                headers={"Retry-After": RETRY_AFTER_S},
            )

    async def body(self, request: web.BaseRequest, kinds: tuple[str, ...], limit: int) -> bytes:
        """The body, if its media type is one of ``kinds`` and it fits in ``limit`` bytes, read
        within ``--client-timeout-s`` (a client trickling its body ties up no more than that)."""
        if request.content_type not in kinds:
            raise Refusal(415, "unsupported_media_type", f"Content-Type must be {' or '.join(kinds)}")
        if request.content_length is not None and request.content_length > limit:
            raise Refusal(413, REASON_TOO_LARGE, f"{request.content_length} bytes > {limit}")
        if request.content_length is not None and request.content.total_bytes >= request.content_length:
            # Already received in full (the common case for small bodies): nothing to wait for.
            return await request.content.read(request.content_length)
        try:
            async with asyncio.timeout(self.settings.client_timeout_s):
                body = await request.content.read(limit + 1)
                # A chunked body may be longer than one read returns.
                while len(body) <= limit and not request.content.at_eof():
                    body += await request.content.read(limit + 1 - len(body))
        except TimeoutError:
            raise Refusal(408, "request_timeout", f"body not received within {self.settings.client_timeout_s} s") from None
        if len(body) > limit:
            raise Refusal(413, REASON_TOO_LARGE, f"body > {limit} bytes")
        return body

    async def publish(self, submissions: list[Submission]) -> list[Accepted]:
        try:
            accepted = await self.publisher.submit(submissions)
        except (*REDIS_FAILURES, OSError) as exc:
            raise _unavailable("redis: " + type(exc).__name__) from None
        duplicates = sum(a.duplicate for a in accepted)
        conflicts = sum(a.conflict for a in accepted)
        if duplicates:
            self.tally.transactions["duplicate"] += duplicates
        if conflicts:
            self.tally.transactions["conflict"] += conflicts
        if duplicates + conflicts < len(accepted):
            self.tally.transactions["written"] += len(accepted) - duplicates - conflicts
        return accepted

    async def publish_labels(self, documents: list) -> list[str]:
        """Put labels on the labels stream, all or none: a bad one is a 422 naming its position.
        A label is reported now or in the past: a ``reported_at`` beyond the clock skew is recorded
        as the clock plus the skew."""
        now = datetime.now(UTC)
        labels, errors = parse_labels(documents, default_source="api", now=now, not_after=now + REPORTED_AT_SKEW)
        if errors:
            position, reason = errors[0]
            raise Refusal(422, "invalid_label", f"item {position}: {reason}")
        stream = self.settings.labels_stream
        commands = [pack(command) for command in label_entries(stream, labels)]
        try:
            ids = await self.nodes.send(stream, commands, replicated=True) if commands else []
        except (*REDIS_FAILURES, OSError) as exc:
            raise _unavailable("redis: " + type(exc).__name__) from None
        return [i.decode() if isinstance(i, bytes) else i for i in ids]

    async def health(self) -> list[HealthProblem]:
        """What keeps this process from serving, as last probed (at most ``HEALTH_CACHE_S`` ago)."""
        async with self._health_lock:
            if time.monotonic() >= self._health_expires:
                problems = await self._probe_health()
                log_health_change(self._health, problems)
                self._health, self._health_expires = problems, time.monotonic() + HEALTH_CACHE_S
            return self._health

    async def _probe_health(self) -> list[HealthProblem]:
        """Every node serving this process's keys answers, and the decisions channel is subscribed."""
        s = self.settings
        keys = [*s.input_streams, s.labels_stream, *([self.keys.signature_prefix] if s.require_signature else [])]
        try:
            nodes = {await self.nodes.node(key): key for key in keys}
            await asyncio.gather(*(self.nodes.on_node(key, lambda node: node.ping()) for key in nodes.values()))
        except (*REDIS_FAILURES, OSError) as exc:
            return [HealthProblem("redis", "unavailable", str(exc))]
        if not self.decisions.subscribed:
            return [HealthProblem("decisions channel", "not subscribed yet")]
        return []

    async def decision(self, transaction_id: str, submission: Submission, started: float) -> dict:
        """Write ``submission`` and wait for its decision until ``--decision-timeout-ms``."""
        deadline = started + self.settings.decision_timeout_ms / 1000.0
        channel = self.publisher.channels[self.publisher.shard(submission.user_id)]
        future, first = self.decisions.expect(transaction_id, channel)
        try:
            (accepted,) = await self.publish([submission])
            if accepted.conflict:
                raise _conflict(transaction_id, accepted.id)
            decision = None
            if accepted.duplicate and first:
                # Written earlier, not by a request of this instance that is still waiting: its
                # decision is (or will shortly be) in PostgreSQL.
                self.decisions.forget(transaction_id, future)
                decision = await self.stored.wait_for(transaction_id, deadline)
            else:
                try:
                    decision = await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    pass
                else:
                    if decision is None:
                        # The channel was not subscribed (a node failed, a slot moved): the worker
                        # stores the decision before it publishes it, so PostgreSQL has it, or will.
                        decision = await self.stored.wait_for(transaction_id, deadline)
        finally:
            self.decisions.forget(transaction_id, future)
        answer = {"transaction_id": transaction_id, "duplicate": accepted.duplicate}
        if decision is None:
            self.tally.decisions["timed_out"] += 1
            answer.update(
                id=accepted.id,
                decision=self.settings.fallback_decision,
                score=None,
                reasons=[],
                model_version=None,
                explanation=None,
                timed_out=True,
            )
        else:
            self.tally.decisions["answered"] += 1
            answer.update(
                id=decision["id"],
                decision=decision["decision"],
                score=decision["score"],
                reasons=decision["reasons"],
                model_version=decision["model_version"],
                explanation=decision["explanation"],
                timed_out=False,
            )
        answer["latency_ms"] = round((time.monotonic() - started) * 1000.0, 3)
        return answer


@dataclass(frozen=True, slots=True)
class Received:
    """A write request that passed the checks every write route shares (``Ingest.receive``)."""

    request: web.BaseRequest
    body: bytes
    started: float  # time.monotonic() when handling began


WriteHandler = Callable[[Received], Awaitable[web.Response]]


@dataclass(frozen=True, slots=True)
class WriteRoute:
    """A ``POST`` route and what it accepts; ``Ingest.receive`` holds it to that before ``handler`` runs."""

    path: str
    handler: WriteHandler
    scope: str  # what the caller's API key must allow (auth.SCOPES)
    media_types: tuple[str, ...]
    max_bytes: int
    admit: bool = True  # refused with 503 while the scoring group lags (labels are not scored)


class Api:
    """The endpoints, one method each. A write handler gets its request already authorized, read
    and signature-checked (a ``Received``) and only judges, writes and answers; a refusal is a
    ``Refusal`` raised anywhere below it."""

    def __init__(self, ingest: Ingest, registry: CollectorRegistry) -> None:
        self.ingest = ingest
        self.registry = registry
        self.openapi_document = OPENAPI_PATH.read_bytes()

    async def transactions(self, received: Received) -> web.Response:
        submission = _valid_one(received.body, self.ingest.tally)
        transaction_id = submission.transaction_id
        (accepted,) = await self.ingest.publish([submission])
        if accepted.conflict:
            raise _conflict(transaction_id, accepted.id)
        if accepted.duplicate:
            return _json(200, {"duplicate": True, "id": accepted.id, "transaction_id": transaction_id})
        return _json(202, {"id": accepted.id, "transaction_id": transaction_id})

    async def transactions_batch(self, received: Received) -> web.Response:
        ingest = self.ingest
        checked = _batch_items(received.body, received.request.content_type == NDJSON, ingest.settings.max_batch)
        submissions = [c for c in checked if isinstance(c, Submission)]
        rejected = len(checked) - len(submissions)
        if rejected:
            ingest.tally.transactions["rejected"] += rejected
        accepted = iter(await ingest.publish(submissions) if submissions else ())
        results = []
        for index, item in enumerate(checked):
            if isinstance(item, Problem):
                status = _PROBLEM_STATUS.get(item.reason, 422)
                results.append(
                    {"index": index, "status": status, "error": item.reason, "field": item.field, "detail": item.message}
                )
            else:
                a = next(accepted)
                if a.conflict:
                    rejected += 1
                    refusal = _conflict(item.transaction_id, a.id)
                    results.append(
                        {
                            "index": index,
                            "status": 409,
                            "transaction_id": item.transaction_id,
                            "error": refusal.error,
                            "field": refusal.field,
                            "detail": refusal.detail,
                        }
                    )
                    continue
                results.append(
                    {
                        "index": index,
                        "status": 200 if a.duplicate else 202,
                        "id": a.id,
                        "transaction_id": item.transaction_id,
                        "duplicate": a.duplicate,
                    }
                )
        duplicates = sum(1 for r in results if r.get("duplicate"))
        accepted_count = len(checked) - duplicates - rejected
        return _json(200, {"accepted": accepted_count, "duplicates": duplicates, "rejected": rejected, "results": results})

    async def score(self, received: Received) -> web.Response:
        submission = _valid_one(received.body, self.ingest.tally, reply=True)
        return _json(200, await self.ingest.decision(submission.transaction_id, submission, received.started))

    async def labels(self, received: Received) -> web.Response:
        documents = _json_body(received.body)
        documents = documents if isinstance(documents, list) else [documents]
        max_batch = self.ingest.settings.max_batch
        if len(documents) > max_batch:
            raise Refusal(413, "too_many_items", f"{len(documents)} items > --max-batch {max_batch}")
        ids = await self.ingest.publish_labels(documents)
        return _json(202, {"accepted": len(ids), "ids": ids})

    async def healthz(self, request: web.BaseRequest) -> web.Response:
        problems = await self.ingest.health()
        return web.Response(status=503 if problems else 200, text=health_body(problems))

    async def metrics(self, request: web.BaseRequest) -> web.Response:
        self.ingest.tally.flush()
        body = await asyncio.to_thread(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, request: web.BaseRequest) -> web.Response:
        return web.Response(body=self.openapi_document, content_type=JSON)


class App:
    """Routes each request to its handler by method and path; 404 / 405 otherwise."""

    def __init__(self, ingest: Ingest, api: Api, routes: dict[tuple[str, str], Handler]) -> None:
        self.ingest = ingest
        self.api = api
        self._routes = routes
        self._allowed = {path: method for method, path in routes}

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        route = self._routes.get((request.method, request.path))
        if route is not None:
            return await route(request)
        if request.path in self._allowed:
            return web.Response(status=405, text="405: Method Not Allowed", headers={"Allow": self._allowed[request.path]})
        return web.Response(status=404, text="404: Not Found")


def make_app(settings: IngestSettings, authenticator: auth.Authenticator, registry: CollectorRegistry | None = None) -> App:
    """One ingest process's application: its state (to ``start`` before serving and ``stop``
    after) and the request handler for aiohttp's low-level server. Seven fixed routes need no
    router, and leaving out the Application layer saved 12-20% of the CPU of a small request
    (paired runs of a bare 202). ``registry`` is what ``/metrics`` exposes."""
    ingest = Ingest(settings, authenticator)
    api = Api(ingest, registry if registry is not None else REGISTRY)
    writes = (
        WriteRoute("/v1/transactions", api.transactions, "transactions", (JSON,), MAX_PAYLOAD_BYTES),
        WriteRoute("/v1/transactions/batch", api.transactions_batch, "transactions", (JSON, NDJSON), ingest.max_batch_bytes),
        WriteRoute("/v1/score", api.score, "score", (JSON,), MAX_PAYLOAD_BYTES),
        WriteRoute("/v1/labels", api.labels, "labels", (JSON,), ingest.max_batch_bytes, admit=False),
    )
    routes: dict[tuple[str, str], Handler] = {("POST", route.path): ingest.observed(route) for route in writes}
    routes |= {("GET", "/healthz"): api.healthz, ("GET", "/metrics"): api.metrics, ("GET", "/openapi.json"): api.openapi}
    return App(ingest, api, routes)


def _json(status: int, body: dict) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type=JSON)


def _submission(obj: dict, event_s: float, payload: bytes, reply: bool = False) -> Submission:
    return Submission(obj["transaction_id"], obj["user_id"], event_s, payload, fingerprint(obj), reply)


def _valid_one(body: bytes, tally: ingest_metrics.Tally, reply: bool = False) -> Submission:
    """The body as a submission; a refusal naming the problem when the API does not accept it."""
    checked = check_payload(body)
    if isinstance(checked, Problem):
        tally.transactions["rejected"] += 1
        raise _problem_refusal(checked)
    obj, event_s = checked
    return _submission(obj, event_s, body, reply)


def _json_body(body: bytes):
    """The body's JSON value; a 400 naming why when it is not JSON (or not even UTF-8)."""
    value = json_value(body)
    if isinstance(value, Problem):
        raise _problem_refusal(value)
    return value


def _batch_items(body: bytes, ndjson: bool, max_batch: int) -> list[Submission | Problem]:
    """Each item of a batch body, judged on its own: one invalid item never rejects the others.

    NDJSON lines are written as sent; JSON array items are written re-serialized (one compact
    object each), and judged by that size.
    """
    if ndjson:
        lines = [line for line in (raw.strip() for raw in body.split(b"\n")) if line]
        if len(lines) > max_batch:
            raise Refusal(413, "too_many_items", f"{len(lines)} items > --max-batch {max_batch}")
        checked: list[Submission | Problem] = []
        for line in lines:
            result = check_payload(line)
            if isinstance(result, Problem):
                checked.append(result)
            else:
                checked.append(_submission(*result, line))
        return checked
    items = _json_body(body)
    if not isinstance(items, list):
        raise Refusal(422, "not_an_array", f"body is a JSON {type(items).__name__}, not an array of transactions")
    if len(items) > max_batch:
        raise Refusal(413, "too_many_items", f"{len(items)} items > --max-batch {max_batch}")
    checked = []
    for obj in items:
        payload = orjson.dumps(obj)
        if len(payload) > MAX_PAYLOAD_BYTES:
            checked.append(Problem(REASON_TOO_LARGE, None, f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}"))
            continue
        event_s = check_transaction(obj)
        checked.append(event_s if isinstance(event_s, Problem) else _submission(obj, event_s, payload))
    return checked
