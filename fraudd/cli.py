"""The ``fraudd`` command line."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import click
import psycopg
import redis
from redis.cluster import RedisCluster

from .alerts import settings as alert_settings
from .console import settings as console_settings
from .ingest import settings as ingest_settings
from .keys import shard_streams
from .lazy_group import Lazy, LazyGroup
from .preflight import (
    check_dependencies,
    check_eviction,
    check_migrated,
    check_producer_shard_count,
    check_shard_count,
    connect_postgres,
    prepare_metrics_dir,
    redact,
)
from .runtime import logs
from .scoring import settings as scoring_settings
from .settings import (
    DEDUP_WINDOW_S,
    DLQ_STREAM,
    FRAUD_STREAM,
    GROUP,
    LOG_LEVEL,
    POSTGRES_OPTIONS,
    POSTGRES_URL,
    REDIS_OPTIONS,
    REDIS_URL,
    SHARDS,
    STREAM,
    ConfigError,
    PostgresSettings,
    RedisSettings,
    check_cluster,
    options,
)

if TYPE_CHECKING:  # the command line imports the runtime's metrics only once prometheus-client's directory is set
    from .runtime.groups import GroupState
    from .runtime.probes import RedisMemory


# The commands of other packages, imported only when invoked (fraudd/lazy_group.py): the rules' modules import numpy.
LAZY = {
    "simulate": Lazy(
        "fraudd.learning.cli:simulate",
        "Write a labelled history from the customers-and-terminals simulator (fraudd.learning.simulator).",
    ),
    "train": Lazy(
        "fraudd.learning.cli:train",
        "Train a model on labelled history with the daemon's own features; write it and its model card.",
    ),
    "calibrate": Lazy(
        "fraudd.learning.cli:calibrate",
        "Set review and decline thresholds from the scores of the team's own recent traffic (no labels needed).",
    ),
    "labels": Lazy(
        "fraudd.learning.cli:labels_service",
        "Store the labels stream (chargebacks, analyst verdicts) in the labels table, with --workers consumers.",
    ),
    "label": Lazy(
        "fraudd.learning.cli:label_file",
        "Record labels from a file in the labels table (idempotent: loading a file twice changes nothing) "
        "and in the confirmed-fraud counts the scoring reads.",
    ),
    "models": Lazy(
        "fraudd.learning.cli:models",
        "The deployed models: compare champion and challenger, promote or roll back by hand.",
    ),
    "retrain": Lazy(
        "fraudd.learning.cli:retrain",
        "Train a candidate on the recent labelled traffic and promote it only if it beats the champion.",
    ),
    "backtest": Lazy(
        "fraudd.learning.cli:backtest",
        "Replay stored transactions in time order through a candidate model and rules (scratch keys, behaviour "
        "recomputed); report the decisions that would change and recall/precision against labels.",
    ),
    "explain": Lazy(
        "fraudd.learning.cli:explain",
        "Why a stored transaction was decided as it was: each feature's exact contribution (log-odds) to the "
        "deciding model's score, with the feature's value.",
    ),
    "rules": Lazy(
        "fraudd.rulesets.cli:rules",
        "Rule sets as versioned data: write, test, shadow, publish and roll back without a restart.",
    ),
}


@click.group(cls=LazyGroup, lazy=LAZY, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """fraudd: real-time fraud scoring of a Redis Stream into PostgreSQL."""


@main.command()
@options(scoring_settings.OPTIONS)
def run(**params) -> None:
    """Score the input stream with a supervisor and --workers worker processes."""
    settings = scoring_settings.ScoringSettings.from_params(params)
    logs.setup(settings.log_level)
    if settings.metrics.listen is not None:
        prepare_metrics_dir()
    scoring_settings.check_files(settings)
    check_dependencies(settings.redis, settings.postgres, settings.input_streams, settings.consumer.group)
    check_shard_count(settings.redis, settings.consumer.stream, settings.shards, settings.consumer.group)
    # Both import prometheus-client, which reads the directory above.
    from .runtime.supervisor import Supervisor
    from .scoring.worker import service

    sys.exit(Supervisor(service(settings)).run())


@main.command()
@options(ingest_settings.OPTIONS)
def ingest(**params) -> None:
    """Serve the HTTP API that writes transactions onto the input stream (and answers /v1/score)."""
    settings = ingest_settings.IngestSettings.from_params(params)
    logs.setup(settings.log_level)
    # Every server process counts into this directory; any of them answers /metrics with the sum.
    prepare_metrics_dir()
    # What follows imports prometheus-client, which reads the directory above.
    check_eviction(settings.redis)
    check_producer_shard_count(settings.redis, settings.stream, settings.shards)
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
@options(console_settings.OPTIONS)
def console(**params) -> None:
    """Serve the analyst console: the review queue, cases with their evidence, verdicts that become labels."""
    from .runtime.listener import is_loopback

    settings = console_settings.ConsoleSettings.from_params(params)
    logs.setup(settings.log_level)
    if settings.metrics.listen is not None:
        prepare_metrics_dir()
    check_eviction(settings.redis)
    with connect_postgres(settings.postgres) as conn:
        check_migrated(conn, settings.postgres)
    if settings.tls_cert is None and not is_loopback(settings.listen[0]):
        click.echo(
            f"warning: --listen {settings.listen[0]} without --tls-cert: passwords and session cookies cross the network "
            "in clear unless a TLS proxy is in front",
            err=True,
        )
    # Both import prometheus-client, which reads the directory above.
    from .console.server import service
    from .runtime.supervisor import Supervisor

    sys.exit(Supervisor(service(settings)).run())


@main.group()
def users() -> None:
    """Console users: add, list, disable, enable, set-role, set-password."""


def _users_connection(params: dict) -> psycopg.Connection:
    postgres = PostgresSettings.from_params(params)
    conn = connect_postgres(postgres)
    check_migrated(conn, postgres)
    return conn


def _actor() -> str:
    """Who changed a user from the command line, for the audit trail."""
    return "cli:" + (os.environ.get("SUDO_USER") or os.environ.get("USER") or str(os.getuid()))


def _password(password_file: Path | None) -> str:
    from .console.passwords import MIN_LENGTH

    if password_file is not None:
        return next(iter(password_file.read_text().splitlines()), "")
    return click.prompt(f"Password (at least {MIN_LENGTH} characters)", hide_input=True, confirmation_prompt=True)


_ROLE = click.Choice(["analyst", "lead", "admin"])
_PASSWORD_FILE = click.option(
    "--password-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Read the password from this file (its first line); otherwise it is prompted for. Never a flag.",
)


@users.command("add")
@options(POSTGRES_OPTIONS)
@click.argument("name")
@click.option("--role", type=_ROLE, required=True)
@_PASSWORD_FILE
def users_add(name: str, role: str, password_file: Path | None, **params) -> None:
    """Add console user NAME with ROLE (analyst: queue, cases, verdicts; lead: also reassign, bulk, SLAs; admin: also users)."""
    from .console import users as console_users
    from .console.passwords import PasswordError, hash_password

    try:
        hashed = hash_password(_password(password_file))
    except PasswordError as exc:
        raise click.ClickException(str(exc)) from None
    _change_user(params, console_users.add, name, role, hashed)
    click.echo(f"user {name} added as {role}")


@users.command("list")
@options(POSTGRES_OPTIONS)
def users_list(**params) -> None:
    """List console users: name, role, status."""
    from .console import users as console_users

    with _users_connection(params) as conn:
        for user in console_users.all_users(conn):
            click.echo(f"{user.username:<24} {user.role:<8} {'disabled' if user.disabled else 'active'}")


def _change_user(params: dict, change: Callable[..., None], name: str, *args: str) -> None:
    """One of ``fraudd.console.users``' changes (``add``, ``disable`` …) of user NAME, audited as the
    command line's; its refusal (no such user, the last active admin) is the command's error."""
    from .console import users as console_users

    with _users_connection(params) as conn, conn.transaction():
        try:
            change(conn, _actor(), name, *args)
        except console_users.UserError as exc:
            raise click.ClickException(str(exc)) from None


@users.command("disable")
@options(POSTGRES_OPTIONS)
@click.argument("name")
def users_disable(name: str, **params) -> None:
    """Disable user NAME: their sessions end and they cannot sign in."""
    from .console import users as console_users

    _change_user(params, console_users.disable, name)
    click.echo(f"user {name} disabled")


@users.command("enable")
@options(POSTGRES_OPTIONS)
@click.argument("name")
def users_enable(name: str, **params) -> None:
    """Enable user NAME again."""
    from .console import users as console_users

    _change_user(params, console_users.enable, name)
    click.echo(f"user {name} enabled")


@users.command("set-role")
@options(POSTGRES_OPTIONS)
@click.argument("name")
@click.argument("role", type=_ROLE)
def users_set_role(name: str, role: str, **params) -> None:
    """Give user NAME the ROLE (their sessions end)."""
    from .console import users as console_users

    _change_user(params, console_users.set_role, name, role)
    click.echo(f"user {name} is now {role}")


@users.command("set-password")
@options(POSTGRES_OPTIONS)
@click.argument("name")
@_PASSWORD_FILE
def users_set_password(name: str, password_file: Path | None, **params) -> None:
    """Set user NAME's password (their sessions end)."""
    from .console import users as console_users
    from .console.passwords import PasswordError, hash_password

    try:
        hashed = hash_password(_password(password_file))
    except PasswordError as exc:
        raise click.ClickException(str(exc)) from None
    _change_user(params, console_users.set_password, name, hashed)
    click.echo(f"password of {name} set")


@main.command()
@options(alert_settings.OPTIONS)
def alerts(**params) -> None:
    """Deliver every alert of --fraud-stream to the channels of --config (Slack, e-mail, signed webhooks)."""
    from .alerts.config import AlertConfigError, load

    settings = alert_settings.AlertSettings.from_params(params)
    logs.setup(settings.log_level)
    try:
        config = load(settings.config)
    except AlertConfigError as exc:
        raise ConfigError(f"--config / FRAUDD_ALERTS_CONFIG: {exc}") from None
    if settings.metrics.listen is not None:
        prepare_metrics_dir()
    # A new group starts at the present: a deployment scoring for a while does not alert its history.
    start = "0" if settings.from_beginning else "$"
    check_dependencies(settings.redis, settings.postgres, [settings.fraud_stream], settings.consumer.group, start)
    # Both import prometheus-client, which reads the directory above.
    from .alerts.service import service
    from .runtime.supervisor import Supervisor

    sys.exit(Supervisor(service(settings, config)).run())


@main.command()
@options(POSTGRES_OPTIONS, [LOG_LEVEL])
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
def migrate(compress_after_days: int, retention_days: int, log_level: str, **params) -> None:
    """Apply pending schema migrations, set up TimescaleDB where loaded, create the coming days' partitions (idempotent)."""
    from .schema import MigrationError
    from .schema import migrate as apply

    postgres = PostgresSettings.from_params(params)
    logs.setup(log_level)
    with connect_postgres(postgres) as conn:
        try:
            report = apply(conn, postgres.schema, compress_after_days=compress_after_days, retention_days=retention_days)
        except MigrationError as exc:
            raise click.ClickException(f"schema {postgres.schema}: {exc}") from None
    click.echo(f"schema {postgres.schema}: " + (f"applied {', '.join(report.applied)}" if report.applied else "up to date"))
    click.echo(f"transactions: {report.storage}")


@dataclass(frozen=True, slots=True)
class StreamsSettings:
    """What ``fraudd status`` and ``fraudd dlq`` read: the servers and the streams."""

    redis: RedisSettings
    postgres: PostgresSettings
    stream: str
    fraud_stream: str
    dlq_stream: str
    shards: int

    @classmethod
    def from_params(cls, params: dict) -> StreamsSettings:
        settings = cls(
            RedisSettings.from_params(params),
            PostgresSettings.from_params(params),
            params["stream"],
            params["fraud_stream"],
            params["dlq_stream"],
            params["shards"],
        )
        check_cluster(settings.redis, settings.shards)
        return settings

    @property
    def input_streams(self) -> list[str]:
        return shard_streams(self.stream, self.shards)


DLQ_OPTIONS = [*REDIS_OPTIONS, *POSTGRES_OPTIONS, STREAM, SHARDS, FRAUD_STREAM, DLQ_STREAM]
STATUS_OPTIONS = [*DLQ_OPTIONS, GROUP, DEDUP_WINDOW_S]


# `fraudd status` exit codes (README: Operations): a monitoring script tells "down" from "behind".
STATUS_OK, STATUS_DOWN, STATUS_BEHIND = 0, 1, 3  # 2: a bad option (click's usage error)


@main.command()
@options(STATUS_OPTIONS)
@click.option(
    "--lag-limit",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Exit 3 when the group's lag (over every shard) is above this.",
)
def status(lag_limit: int, group: str, dedup_window_s: int, **params) -> None:
    """Say what is up and what is down: Redis, PostgreSQL, the group's lag, pending and consumers (per node on a cluster).

    Exit status: 0 all up and the lag within --lag-limit; 1 Redis or PostgreSQL down, or Redis full or
    evicting; 2 a bad option; 3 up, but the lag is above --lag-limit or entries wait on a stream only
    another --shards reads."""
    from . import shard_counts
    from .keys import Keys
    from .runtime.groups import combined, group_state
    from .runtime.probes import NEARLY_FULL, check_postgres, memory_problem, redis_memory
    from .runtime.redis_clients import REDIS_FAILURES, redis_client

    settings = StreamsSettings.from_params(params)
    healthy, behind = True, False
    try:
        # A Redis Cluster client asks for the slot map as it is made: a cluster down fails here.
        client = redis_client(settings.redis.url, settings.redis.cluster, decode_responses=True, socket_timeout=3)
        states = [group_state(client, stream, group) for stream in settings.input_streams]
        state = combined(states)
        click.echo(f"redis      up    {redact(settings.redis.url)}")
        shards = f" ({settings.shards} shards)" if settings.shards > 1 else ""
        click.echo(
            f"group      {group} on {settings.stream}{shards}: lag {state.lag}, pending {state.pending}, "
            f"oldest pending {state.oldest_pending_age_s:.1f}s"
        )
        if state.lag > lag_limit:
            behind = True
            click.echo(f"           behind: lag {state.lag} is above --lag-limit {lag_limit}")
        left = shard_counts.stranded(client, settings.stream, settings.shards, group)
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
            owners = Counter(str(lease).split(":", 1)[1] for lease in leases if lease)
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
            f"{dedup_window_s} s window need ≈ {_marker_need(sum(rates), dedup_window_s, memory)}"
        )
        if isinstance(client, RedisCluster):
            _echo_nodes(client, settings, states, rates, dedup_window_s)
        # A full Redis refuses a write whose arguments do not fit, so INFO may still show a little room.
        problem = memory_problem(memory, refusing=memory.maximum > 0 and memory.used > NEARLY_FULL * memory.maximum)
        if problem:
            healthy = False
            click.echo(f"           {problem}")
    except REDIS_FAILURES as exc:
        healthy = False
        click.echo(f"redis      DOWN  {redact(settings.redis.url)}: {exc}")
    try:
        check_postgres(settings.postgres)
        click.echo(f"postgres   up    {redact(settings.postgres.url)}")
    except (psycopg.Error, OSError) as exc:
        healthy = False
        click.echo(f"postgres   DOWN  {redact(settings.postgres.url)}: {' '.join(str(exc).split())}")
    sys.exit(STATUS_DOWN if not healthy else STATUS_BEHIND if behind else STATUS_OK)


def _echo_nodes(
    client: RedisCluster, settings: StreamsSettings, states: list[GroupState], rates: list[float], dedup_window_s: int
) -> None:
    """One line per primary of a cluster: the shards it serves (their lag, pending and input rate, the
    dedup markers they need) and its memory. Each primary holds its own shards' markers and states,
    so one node full or lagging is visible here while the totals above still look fine."""
    from .runtime.probes import primary_memory

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
        click.echo(f"           memory {memory.describe()}, markers need ≈ {_marker_need(rate, dedup_window_s, memory)}")


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


# What XRANGE answers a client that does not decode: (entry id, fields).
_RawEntries = list[tuple[bytes, dict[bytes, bytes]]]


def _dlq_entries(client: redis.Redis | RedisCluster, settings: StreamsSettings, start: str = "-", end: str = "+") -> _RawEntries:
    return cast(_RawEntries, client.xrange(settings.dlq_stream, start, end))


def _dlq_client(settings: StreamsSettings) -> redis.Redis | RedisCluster:
    from .runtime.redis_clients import redis_client

    return redis_client(settings.redis.url, settings.redis.cluster)


def _dlq_selection(
    client: redis.Redis | RedisCluster,
    settings: StreamsSettings,
    entry_ids: tuple[str, ...],
    reason: str | None,
    select_all: bool,
) -> list[tuple[str, dict[bytes, bytes]]]:
    if not (entry_ids or reason or select_all):
        raise click.UsageError("name entry ids, or select with --reason or --all")
    if entry_ids:
        entries: _RawEntries = []
        for entry_id in entry_ids:
            entries += _dlq_entries(client, settings, entry_id, entry_id)
    else:
        entries = _dlq_entries(client, settings)
    return [(i.decode(), f) for i, f in entries if reason is None or f.get(b"reason", b"").decode() == reason]


@dlq.command("list")
@options(DLQ_OPTIONS)
@click.option("--reason", default=None, help="Only entries with this reason.")
@click.option("--count", default=50, show_default=True, help="At most this many entries.")
def dlq_list(reason: str | None, count: int, **params) -> None:
    """List dead letters: id, reason, detail, original entry, deliveries and the payload's start."""
    settings = StreamsSettings.from_params(params)
    client = _dlq_client(settings)
    shown = 0
    for entry_id, fields in _dlq_entries(client, settings):
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
@options(DLQ_OPTIONS)
@click.argument("entry_ids", nargs=-1)
@click.option("--reason", default=None, help="Replay every entry with this reason.")
@click.option("--all", "select_all", is_flag=True, help="Replay every entry.")
def dlq_replay(entry_ids: tuple[str, ...], reason: str | None, select_all: bool, **params) -> None:
    """Put dead letters back on the stream they were read from (after a fix), then remove them from the DLQ.

    Transactions go through the ingest's routing, so each lands on its shard. A replayed transaction
    that was already scored is recognised as a duplicate, so replaying twice never yields two rows. An
    undeliverable alert (reason alert_undeliverable) is instead given to `fraudd alerts` again: its
    delivery is due now, with a fresh count of attempts.
    """
    from .alerts.deliveries import REASON_UNDELIVERABLE, retry_failed
    from .ingest import Publisher
    from .runtime.deadletters import restored_fields

    settings = StreamsSettings.from_params(params)
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
            pipe.xadd(source, kept)  # type: ignore[arg-type]  # redis-py types the fields as an invariant dict of unions
        pipe.execute()
    if alerts:
        with connect_postgres(settings.postgres) as conn:
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
@options(DLQ_OPTIONS)
@click.argument("entry_ids", nargs=-1)
@click.option("--reason", default=None, help="Purge every entry with this reason.")
@click.option("--all", "select_all", is_flag=True, help="Purge every entry.")
def dlq_purge(entry_ids: tuple[str, ...], reason: str | None, select_all: bool, **params) -> None:
    """Delete dead letters for good."""
    settings = StreamsSettings.from_params(params)
    client = _dlq_client(settings)
    selected = _dlq_selection(client, settings, entry_ids, reason, select_all)
    if selected:
        client.xdel(settings.dlq_stream, *[entry_id for entry_id, _ in selected])
    click.echo(f"purged {len(selected)} entries from {settings.dlq_stream}")


@main.command()
@options([REDIS_URL, POSTGRES_URL])
@click.option("--transactions", default=100_000, show_default=True, help="Generated transactions to send.")
@click.option("--workers", default=2, show_default=True, help="Scoring worker processes.")
@click.option("--seed", default=7, show_default=True)
@click.option(
    "--console/--no-console",
    default=None,
    help="At the end, serve the analyst console on the demo's cases until Ctrl-C (default: when run from a terminal).",
)
def demo(redis_url: str, postgres_url: str, transactions: int, workers: int, seed: int, console: bool | None) -> None:
    """The whole system on generated traffic: HTTP ingest, scoring, alerts to a local webhook receiver.

    Uses the servers at --redis-url / --postgres-url when they answer (streams fraudd_demo:transactions:*,
    schema fraudd_demo), otherwise throwaway ones; stops everything it started on exit or Ctrl-C."""
    from .demo import run_demo

    offer = sys.stdin.isatty() if console is None else console
    result = run_demo(redis_url, postgres_url, transactions, workers, seed, click.echo, console=offer)
    sys.exit(0 if result.consistent else 1)
