"""The ``fraudd`` command line."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import click
import psycopg
import redis
from redis.cluster import RedisCluster

from .config import (
    ConfigError,
    Settings,
    alert_options,
    alert_settings_from,
    check_postgres_url,
    check_redis_url,
    ingest_options,
    ingest_settings_from,
    settings_from,
    settings_options,
)
from .learning import cli as learning_cli
from .rulesets import cli as rulesets_cli
from .runtime import logs

if TYPE_CHECKING:  # the command line imports the runtime's metrics only once prometheus-client's directory is set
    from .config import IngestSettings
    from .runtime.health import GroupState, RedisMemory


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """fraudd: real-time fraud scoring of a Redis Stream into PostgreSQL."""


main.add_command(learning_cli.simulate)
main.add_command(learning_cli.train)
main.add_command(learning_cli.calibrate)
main.add_command(learning_cli.labels_service)
main.add_command(learning_cli.label_file)
main.add_command(learning_cli.models)
main.add_command(learning_cli.retrain)
main.add_command(learning_cli.backtest)
main.add_command(learning_cli.explain)
main.add_command(rulesets_cli.rules)


@main.command()
@settings_options
def run(**params) -> None:
    """Score the input stream with a supervisor and --workers worker processes."""
    settings = settings_from(params)
    check_thresholds(settings)
    logs.setup(settings.log_level)
    if settings.metrics_port:
        prepare_metrics_dir()
    preflight(settings)
    # Both import prometheus-client, which reads the directory above.
    from .runtime.supervisor import Supervisor
    from .scoring.worker import service

    sys.exit(Supervisor(service(settings)).run())


@main.command()
@ingest_options
def ingest(**params) -> None:
    """Serve the HTTP API that writes transactions onto the input stream (and answers /v1/score)."""
    settings = ingest_settings_from(params)
    logs.setup(settings.log_level)
    # Every server process counts into this directory; any of them answers /metrics with the sum.
    prepare_metrics_dir()
    # What follows imports prometheus-client, which reads the directory above.
    check_eviction(settings.redis_url, settings.redis_cluster)
    check_ingest_shard_count(settings)
    from .ingest.auth import Authenticator, KeysError

    try:
        authenticator = Authenticator(settings.api_keys_file, settings.api_keys, settings.require_signature)
    except KeysError as exc:
        raise ConfigError(str(exc)) from None
    from .ingest.server import check_exposure, service
    from .runtime.supervisor import Supervisor

    check_exposure(settings, authenticator)
    sys.exit(Supervisor(service(settings, authenticator)).run())


@main.command()
@settings_options
@alert_options
def alerts(**params) -> None:
    """Deliver every alert of --fraud-stream to the channels of --config (Slack, e-mail, signed webhooks)."""
    from .alerts.config import AlertConfigError, load

    settings, alert_settings = settings_from(params), alert_settings_from(params)
    logs.setup(settings.log_level)
    try:
        config = load(alert_settings.config)
    except AlertConfigError as exc:
        raise ConfigError(f"--config / FRAUDD_ALERTS_CONFIG: {exc}") from None
    if settings.metrics_port:
        prepare_metrics_dir()
    # A new group starts at the present: a deployment scoring for a while does not alert its history.
    start = "0" if alert_settings.from_beginning else "$"
    check_dependencies(settings, [settings.fraud_stream], alert_settings.alerts_group, start)
    # Both import prometheus-client, which reads the directory above.
    from .alerts.service import service
    from .runtime.supervisor import Supervisor

    sys.exit(Supervisor(service(settings, alert_settings, config)).run())


@main.command()
@settings_options
@click.option(
    "--compress-after-days",
    envvar="FRAUDD_COMPRESS_AFTER_DAYS",
    default=7,
    show_default=True,
    show_envvar=True,
    type=click.IntRange(min=0),
    help="TimescaleDB: compress chunks older than this (0: no compression policy).",
)
@click.option(
    "--retention-days",
    envvar="FRAUDD_RETENTION_DAYS",
    default=0,
    show_default=True,
    show_envvar=True,
    type=click.IntRange(min=0),
    help="TimescaleDB: drop chunks older than this (0: keep every row).",
)
def migrate(compress_after_days: int, retention_days: int, **params) -> None:
    """Apply pending schema migrations, set up TimescaleDB where loaded, create the coming days' partitions (idempotent)."""
    from .schema import MigrationError
    from .schema import migrate as apply

    settings = settings_from(params)
    logs.setup(settings.log_level)
    with _connect_postgres(settings) as conn:
        try:
            report = apply(conn, settings.pg_schema, compress_after_days=compress_after_days, retention_days=retention_days)
        except MigrationError as exc:
            raise click.ClickException(f"schema {settings.pg_schema}: {exc}") from None
    click.echo(f"schema {settings.pg_schema}: " + (f"applied {', '.join(report.applied)}" if report.applied else "up to date"))
    click.echo(f"transactions: {report.storage}")


def check_thresholds(settings: Settings) -> None:
    """A ``--thresholds`` file must load and belong to the model (workers re-read it on SIGHUP)."""
    from .scoring import thresholds
    from .scoring.features import FEATURE_NAMES
    from .scoring.model import FraudModel, ModelError

    if settings.thresholds is None:
        return
    if settings.review_threshold is not None or settings.decline_threshold is not None:
        raise ConfigError(
            "--thresholds / FRAUDD_THRESHOLDS: give either a thresholds file or --review-threshold/--decline-threshold"
        )
    try:
        thresholds.load(settings.thresholds).check_model(
            FraudModel.load(settings.model_path, FEATURE_NAMES).version, settings.thresholds
        )
    except thresholds.ThresholdsError as exc:
        raise ConfigError(f"--thresholds / FRAUDD_THRESHOLDS: {exc}") from None
    except ModelError as exc:
        raise ConfigError(f"--model-path / ML_MODEL_PATH: {exc}") from None


def preflight(settings: Settings) -> None:
    """Check every dependency before forking, so a bad setting is one clear line, not a crash loop."""
    from .scoring.features import FEATURE_NAMES
    from .scoring.model import FraudModel, ModelError
    from .scoring.rules import Rules, RulesError

    try:
        FraudModel.load(settings.model_path, FEATURE_NAMES)
    except ModelError as exc:
        raise ConfigError(f"--model-path / ML_MODEL_PATH: {exc}") from None
    if settings.shadow_model is not None:
        try:
            FraudModel.load(settings.shadow_model, FEATURE_NAMES)
        except ModelError as exc:
            raise ConfigError(f"--shadow-model / FRAUDD_SHADOW_MODEL: {exc}") from None
    try:
        Rules.load(settings.rules_path)
    except RulesError as exc:
        raise ConfigError(f"--rules-path: {exc}") from None
    check_dependencies(settings, settings.input_streams, settings.group)
    check_shard_count(settings)


def check_shard_count(settings: Settings) -> None:
    """Refuse a --shards that leaves entries on streams only another count reads; otherwise record it."""
    from . import shard_counts
    from .runtime.redis_clients import redis_client

    client = redis_client(settings.redis_url, settings.redis_cluster, decode_responses=True)
    try:
        left = shard_counts.stranded(client, settings.stream, settings.shards, settings.group)
        if not left:
            shard_counts.record(client, settings.stream, settings.shards, int(time.time() * 1000))
    finally:
        client.close()
    if left:
        raise ConfigError(shard_counts.describe(left, settings.shards))


def check_dependencies(settings: Settings, streams: list[str], group: str, start: str = "0") -> None:
    """Redis answers without an evicting policy (and ``group`` exists on each of ``streams``, created
    at ``start`` if new), PostgreSQL answers with every migration applied."""
    from .runtime.consumer import ensure_group
    from .runtime.health import redis_memory
    from .runtime.redis_clients import connect_redis
    from .schema import MigrationError, pending_migrations

    client = connect_redis(settings.redis_url, settings.redis_cluster)
    try:
        client.ping()
        eviction = redis_memory(client).eviction_problem()
        for stream in streams:
            ensure_group(client, stream, group, start)
    except redis.RedisError as exc:
        raise ConfigError(f"--redis-url / REDIS_URL: cannot use {_redact(settings.redis_url)}: {exc}") from None
    finally:
        client.close()
    if eviction:
        raise ConfigError(f"--redis-url / REDIS_URL: {eviction}")
    with _connect_postgres(settings) as conn:
        try:
            pending = pending_migrations(conn)
        except MigrationError as exc:
            raise ConfigError(str(exc)) from None
    if pending:
        raise ConfigError(f"schema {settings.pg_schema} lacks migrations {', '.join(pending)}: run `fraudd migrate` first")


def check_ingest_shard_count(settings: IngestSettings) -> None:
    """Refuse a --shards other than the one scoring last ran with: its streams would have no reader.
    A Redis that does not answer yet is let be, as in ``check_eviction``."""
    from redis.exceptions import RedisClusterException

    from . import shard_counts
    from .runtime.redis_clients import redis_client

    try:
        client = redis_client(settings.redis_url, settings.redis_cluster, socket_timeout=3, socket_connect_timeout=3)
        try:
            scored_with = shard_counts.latest(client, settings.stream)
        finally:
            client.close()
    except (redis.RedisError, RedisClusterException):
        return
    if scored_with is not None and scored_with != settings.shards:
        raise ConfigError(
            f"--shards {settings.shards}: fraudd run scores {settings.stream} with --shards {scored_with}, so nobody would "
            f"read what this ingest writes; use --shards {scored_with} (README: Changing the shard count)"
        )


def check_eviction(url: str, cluster: bool) -> None:
    """Refuse a Redis whose maxmemory-policy can evict fraudd's keys. One that does not answer yet is
    let be: the ingest starts anyway and answers 503 until Redis is back."""
    from redis.exceptions import RedisClusterException

    from .runtime.health import redis_memory
    from .runtime.redis_clients import redis_client

    try:
        client = redis_client(url, cluster, socket_timeout=3, socket_connect_timeout=3)
        try:
            eviction = redis_memory(client).eviction_problem()
        finally:
            client.close()
    except (redis.RedisError, RedisClusterException):
        return
    if eviction:
        raise ConfigError(f"--redis-url / REDIS_URL: {eviction}")


def _connect_postgres(settings: Settings) -> psycopg.Connection:
    from .schema import connect

    try:
        return connect(settings.postgres_url, settings.pg_schema, connect_timeout=5, autocommit=True)
    except psycopg.Error as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(
            f"--postgres-url / POSTGRES_URL: cannot connect to {_redact(settings.postgres_url)}: {reason}"
        ) from None


def _redact(url: str) -> str:
    """The URL without its password, fit for an error message."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url


def prepare_metrics_dir() -> None:
    """Give prometheus-client an empty multiprocess directory before anything imports it.

    It picks its storage at import time, and every forked worker then writes its own files there
    for the supervisor's ``/metrics`` to sum. Without ``--metrics-port`` nothing is exported and
    the metrics stay in process memory.
    """
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    directory = Path(configured) if configured else Path(tempfile.mkdtemp(prefix="fraudd-metrics-"))
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    atexit.register(shutil.rmtree, directory, True)


# `fraudd status` exit codes (README: Operations): a monitoring script tells "down" from "behind".
STATUS_OK, STATUS_DOWN, STATUS_BEHIND = 0, 1, 3  # 2: a bad option (click's usage error)


@main.command()
@settings_options
@click.option(
    "--lag-limit",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Exit 3 when the group's lag (over every shard) is above this.",
)
def status(lag_limit: int, **params) -> None:
    """Say what is up and what is down: Redis, PostgreSQL, the group's lag, pending and consumers (per node on a cluster).

    Exit status: 0 all up and the lag within --lag-limit; 1 Redis or PostgreSQL down, or Redis full or
    evicting; 2 a bad option; 3 up, but the lag is above --lag-limit or entries wait on a stream only
    another --shards reads."""
    from . import shard_counts
    from .keys import Keys
    from .runtime.health import NEARLY_FULL, check_postgres, combined, group_state, memory_problem, redis_memory
    from .runtime.redis_clients import redis_client

    settings = settings_from(params)
    healthy, behind = True, False
    client = redis_client(settings.redis_url, settings.redis_cluster, decode_responses=True, socket_timeout=3)
    try:
        states = [group_state(client, stream, settings.group) for stream in settings.input_streams]
        state = combined(states)
        click.echo(f"redis      up    {_redact(settings.redis_url)}")
        shards = f" ({settings.shards} shards)" if settings.shards > 1 else ""
        click.echo(
            f"group      {settings.group} on {settings.stream}{shards}: lag {state.lag}, pending {state.pending}, "
            f"oldest pending {state.oldest_pending_age_s:.1f}s"
        )
        if state.lag > lag_limit:
            behind = True
            click.echo(f"           behind: lag {state.lag} is above --lag-limit {lag_limit}")
        left = shard_counts.stranded(client, settings.stream, settings.shards, settings.group)
        if left:
            behind = True
            click.echo(f"stranded   {shard_counts.describe(left, settings.shards)}")
        for consumer in state.consumers:
            click.echo(f"  consumer {consumer['name']}: pending {consumer['pending']}, idle {consumer['idle'] / 1000:.1f}s")
        if settings.shards > 1:
            # One GET per shard: the leases live in as many slots (nodes, on a cluster).
            leases = [
                client.get(Keys(stream, settings.fraud_stream, settings.dlq_stream).lease) for stream in settings.input_streams
            ]
            owners = Counter(lease.split(":", 1)[1] for lease in leases if lease)
            click.echo(
                f"shards     {settings.shards}: {sum(owners.values())} owned, "
                + (", ".join(f"{owner} {count}" for owner, count in sorted(owners.items())) or "no owner")
            )
        click.echo(f"dlq        {client.xlen(settings.dlq_stream)} entries in {settings.dlq_stream}")
        memory = redis_memory(client)
        rates = _input_rates(client, settings.input_streams)
        click.echo(f"memory     {memory.describe()}")
        click.echo(
            f"           input {sum(rates):,.0f} tx/s over the last second: dedup markers for the "
            f"{settings.dedup_window_s} s window need ≈ {_marker_need(sum(rates), settings.dedup_window_s, memory)}"
        )
        if isinstance(client, RedisCluster):
            _echo_nodes(client, settings, states, rates)
        # A full Redis refuses a write whose arguments do not fit, so INFO may still show a little room.
        problem = memory_problem(memory, refusing=memory.maximum > 0 and memory.used > NEARLY_FULL * memory.maximum)
        if problem:
            healthy = False
            click.echo(f"           {problem}")
    except redis.RedisError as exc:
        healthy = False
        click.echo(f"redis      DOWN  {_redact(settings.redis_url)}: {exc}")
    try:
        check_postgres(settings)
        click.echo(f"postgres   up    {_redact(settings.postgres_url)}")
    except (psycopg.Error, OSError) as exc:
        healthy = False
        click.echo(f"postgres   DOWN  {_redact(settings.postgres_url)}: {' '.join(str(exc).split())}")
    sys.exit(STATUS_DOWN if not healthy else STATUS_BEHIND if behind else STATUS_OK)


def _echo_nodes(client: RedisCluster, settings: Settings, states: list[GroupState], rates: list[float]) -> None:
    """One line per primary of a cluster: the shards it serves (their lag, pending and input rate, the
    dedup markers they need) and its memory. Each primary holds its own shards' markers and states,
    so one node full or lagging is visible here while the totals above still look fine."""
    from .runtime.health import primary_memory

    served: dict[str, list[int]] = {}
    for k, stream in enumerate(settings.input_streams):
        served.setdefault(client.get_node_from_key(stream).name, []).append(k)
    single: dict[str, list[str]] = {}
    for stream in (settings.fraud_stream, settings.dlq_stream):
        single.setdefault(client.get_node_from_key(stream).name, []).append(stream)
    for name, memory in sorted(primary_memory(client).items()):
        shards = served.get(name, [])
        rate = sum(rates[k] for k in shards)
        others = "".join(f", {stream}" for stream in single.get(name, []))
        click.echo(
            f"node       {name}: shards {' '.join(map(str, shards)) or 'none'}{others}: "
            f"lag {sum(states[k].lag for k in shards)}, pending {sum(states[k].pending for k in shards)}, "
            f"input {rate:,.0f} tx/s"
        )
        click.echo(f"           memory {memory.describe()}, markers need ≈ {_marker_need(rate, settings.dedup_window_s, memory)}")


def _marker_need(rate: float, window_s: int, memory: RedisMemory) -> str:
    """What the dedup markers need at ``rate`` tx/s, and how that compares with ``memory``'s maxmemory."""
    from .scoring.dedup import projected_marker_bytes

    need = projected_marker_bytes(rate, window_s)
    if not memory.maximum:
        return f"{need / 2**20:,.1f} MiB"
    return f"{need / 2**20:,.1f} MiB" + (
        " (more than maxmemory)" if need > memory.maximum else f" ({need / memory.maximum:.0%} of maxmemory)"
    )


def _input_rates(client: redis.Redis | RedisCluster, streams: list[str], sample_s: float = 1.0) -> list[float]:
    """Entries added to each of ``streams`` per second, sampled over ``sample_s`` (none to a stream not written yet)."""

    def added() -> list[int]:
        pipe = client.pipeline(transaction=False)
        for stream in streams:
            pipe.xinfo_stream(stream)
        return [
            0 if isinstance(info, redis.ResponseError) else info["entries-added"] for info in pipe.execute(raise_on_error=False)
        ]

    before = added()
    time.sleep(sample_s)
    return [(after - then) / sample_s for after, then in zip(added(), before)]


@main.group()
def dlq() -> None:
    """Inspect, replay or purge the dead-letter stream."""


def _dlq_client(settings: Settings) -> redis.Redis | RedisCluster:
    from .runtime.redis_clients import redis_client

    return redis_client(settings.redis_url, settings.redis_cluster)


def _dlq_selection(
    client: redis.Redis, settings: Settings, entry_ids: tuple[str, ...], reason: str | None, select_all: bool
) -> list[tuple[str, dict]]:
    if not (entry_ids or reason or select_all):
        raise click.UsageError("name entry ids, or select with --reason or --all")
    if entry_ids:
        entries = []
        for entry_id in entry_ids:
            entries += client.xrange(settings.dlq_stream, entry_id, entry_id)
    else:
        entries = client.xrange(settings.dlq_stream)
    return [(i.decode(), f) for i, f in entries if reason is None or f.get(b"reason", b"").decode() == reason]


@dlq.command("list")
@settings_options
@click.option("--reason", default=None, help="Only entries with this reason.")
@click.option("--count", default=50, show_default=True, help="At most this many entries.")
def dlq_list(reason: str | None, count: int, **params) -> None:
    """List dead letters: id, reason, detail, original entry, deliveries and the payload's start."""
    settings = settings_from(params)
    client = _dlq_client(settings)
    shown = 0
    for entry_id, fields in client.xrange(settings.dlq_stream):
        text = {k.decode(): v for k, v in fields.items()}
        if reason is not None and text.get("reason", b"").decode() != reason:
            continue
        preview = text.get("data", b"")[:80].decode("utf-8", "replace")
        source = b" ".join(text[name] for name in ("source_stream", "source_id") if name in text).decode()
        click.echo(
            f"{entry_id.decode()}  {text.get('reason', b'').decode():<20} source {source:<16} "
            f"deliveries {text.get('deliveries', b'?').decode():>2}  {text.get('detail', b'').decode()[:60]}  {preview!r}"
        )
        shown += 1
        if shown >= count:
            break
    click.echo(f"{shown} shown, {client.xlen(settings.dlq_stream)} in {settings.dlq_stream}", err=True)


@dlq.command("replay")
@settings_options
@click.argument("entry_ids", nargs=-1)
@click.option("--reason", default=None, help="Replay every entry with this reason.")
@click.option("--all", "select_all", is_flag=True, help="Replay every entry.")
def dlq_replay(entry_ids: tuple[str, ...], reason: str | None, select_all: bool, **params) -> None:
    """Put dead letters back on the stream they were read from (after a fix), then remove them from the DLQ.

    Transactions go through the ingest's routing, so each lands on its shard. A replayed transaction that was already scored is recognised as a duplicate, so replaying
    twice never yields two rows. An undeliverable alert (reason alert_undeliverable) is instead
    given to `fraudd alerts` again: its delivery is due now, with a fresh count of attempts.
    """
    from .alerts.deliveries import REASON_UNDELIVERABLE, retry_failed
    from .ingest import Publisher
    from .runtime.deadletters import restored_fields

    settings = settings_from(params)
    client = _dlq_client(settings)
    selected = _dlq_selection(client, settings, entry_ids, reason, select_all)
    # An entry that had no data field goes back as it was, to the stream it came from.
    restored = [(f.get(b"source_stream", settings.stream.encode()), restored_fields(f)) for _i, f in selected]
    alerts = [(i, f) for i, f in selected if f.get(b"reason") == REASON_UNDELIVERABLE.encode()]
    inputs = {stream.encode() for stream in settings.input_streams}
    # Letters naming no stream were written by the scoring workers before letters named theirs.
    transactions = [
        (i, f)
        for (i, f), (source, kept) in zip(selected, restored)
        if f.get(b"reason") != REASON_UNDELIVERABLE.encode() and source in inputs and kept is None
    ]
    others = [
        (i, f)
        for (i, f), (source, kept) in zip(selected, restored)
        if f.get(b"reason") != REASON_UNDELIVERABLE.encode() and source not in inputs and kept is None
    ]
    as_they_were = [(source, kept) for source, kept in restored if kept is not None]
    if transactions:
        Publisher(client, settings.stream, settings.shards).publish([fields.get(b"data", b"") for _id, fields in transactions])
    if others or as_they_were:
        pipe = client.pipeline(transaction=False)
        for _id, fields in others:
            pipe.xadd(fields[b"source_stream"], {"data": fields.get(b"data", b"")})
        for source, kept in as_they_were:
            pipe.xadd(source, kept)
        pipe.execute()
    if alerts:
        with _connect_postgres(settings) as conn:
            retry_failed(conn, client, settings.fraud_stream, settings.dlq_stream, [fields for _id, fields in alerts])
    if selected:
        client.xdel(settings.dlq_stream, *[entry_id for entry_id, _ in selected])
    elsewhere = Counter(fields[b"source_stream"].decode() for _id, fields in others)
    elsewhere.update(source.decode() for source, _kept in as_they_were)
    click.echo(
        f"replayed {len(transactions)} entries onto {settings.stream}"
        + "".join(f", {n} onto {stream}" for stream, n in sorted(elsewhere.items()))
        + (f", {len(alerts)} alert deliveries due again" if alerts else "")
    )


@dlq.command("purge")
@settings_options
@click.argument("entry_ids", nargs=-1)
@click.option("--reason", default=None, help="Purge every entry with this reason.")
@click.option("--all", "select_all", is_flag=True, help="Purge every entry.")
def dlq_purge(entry_ids: tuple[str, ...], reason: str | None, select_all: bool, **params) -> None:
    """Delete dead letters for good."""
    settings = settings_from(params)
    client = _dlq_client(settings)
    selected = _dlq_selection(client, settings, entry_ids, reason, select_all)
    if selected:
        client.xdel(settings.dlq_stream, *[entry_id for entry_id, _ in selected])
    click.echo(f"purged {len(selected)} entries from {settings.dlq_stream}")


@main.command()
@click.option("--redis-url", envvar="REDIS_URL", default="redis://127.0.0.1:6379/0", show_default=True, callback=check_redis_url)
@click.option(
    "--postgres-url",
    envvar="POSTGRES_URL",
    default="postgresql://127.0.0.1:5432/postgres",
    show_default=True,
    callback=check_postgres_url,
)
@click.option("--transactions", default=100_000, show_default=True, help="Generated transactions to send.")
@click.option("--workers", default=2, show_default=True, help="Scoring worker processes.")
@click.option("--seed", default=7, show_default=True)
def demo(redis_url: str, postgres_url: str, transactions: int, workers: int, seed: int) -> None:
    """The whole system on generated traffic: HTTP ingest, scoring, alerts to a local webhook receiver.

    Uses the servers at --redis-url / --postgres-url when they answer (streams fraudd_demo:transactions:*,
    schema fraudd_demo), otherwise throwaway ones; stops everything it started on exit or Ctrl-C."""
    from .demo import format_summary, run_demo

    result = run_demo(redis_url, postgres_url, transactions, workers, seed, click.echo)
    click.echo(format_summary(result))
    sys.exit(0 if result.consistent else 1)
