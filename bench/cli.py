"""``python -m bench``: the command line.

Everything after the mode's own options is passed to ``fraudd run`` unchanged
(``python -m bench throughput -n 200000 --workers 2 --batch-size 500``); the baselines take their
process count and batch size from the same flags, so they always match fraudd's.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import orjson
import redis

from bench import (
    alerts,
    console,
    copy_growth,
    copy_indexes,
    latency,
    plots,
    redis_instructions,
    report,
    services,
    soak,
    throughput,
)
from bench.namespace import DEFAULT_POSTGRES_URL, DEFAULT_REDIS_URL
from bench.runners import Setup
from bench.usage import redis_nodes
from fraudd.runtime.redis_clients import redis_client
from fraudd.scoring.settings import DEFAULT_MODEL

Command = Callable[..., None]
PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


def _flag(args: list[str], name: str, env: str, default: str) -> str:
    """The value ``fraudd run`` will use for ``--name``: the flag, else its environment variable."""
    for i, arg in enumerate(args):
        if arg == f"--{name}" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return os.environ.get(env, default)


def _all(*decorators: Callable[[Command], Command]) -> Callable[[Command], Command]:
    """One decorator applying ``decorators`` in the order they are written."""

    def decorate(function: Command) -> Command:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return decorate


_servers = _all(
    click.option("--redis-url", envvar="REDIS_URL", default=DEFAULT_REDIS_URL, show_default=True),
    click.option("--postgres-url", envvar="POSTGRES_URL", default=DEFAULT_POSTGRES_URL, show_default=True),
)
_SEED = click.option("--seed", default=7, show_default=True, help="Generator seed: same seed, same transactions.")
_PRIVATE_SERVICES = click.option(
    "--private-services",
    is_flag=True,
    help="Run on a private redis-server and PostgreSQL cluster (configured like the shared ones, "
    "plus track_commit_timestamp) so other work on the machine cannot blur the figures.",
)
_PG_SETTINGS = click.option(
    "--pg-setting",
    "pg_settings",
    multiple=True,
    metavar="NAME=VALUE",
    help="With --private-services: a setting of the private PostgreSQL to price (wal_compression=lz4, shared_buffers=1GB, say).",
)
_OUT_DIR = click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=report.OUT_DIR,
    show_default=True,
    help="Where reports and logs go.",
)


@dataclass(frozen=True, slots=True)
class Invocation:
    """The options every mode that runs ``fraudd run`` takes (``_common``)."""

    redis_url: str
    postgres_url: str
    seed: int
    private_services: bool
    out_dir: Path
    fraudd_args: tuple[str, ...]  # everything after the mode's own options, passed to ``fraudd run``


_common_options = _all(
    _servers,
    _SEED,
    _PRIVATE_SERVICES,
    _OUT_DIR,
    click.option(
        "--pictures-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=plots.HERE,
        show_default=True,
        expose_value=False,
        callback=lambda ctx, _param, value: ctx.meta.setdefault("pictures_dir", value),
        help="Where throughput.png, latency.png and soak.png go (next to RESULTS.md).",
    ),
    click.argument("fraudd_args", nargs=-1, type=click.UNPROCESSED),
)


def _common(mode: Command) -> Command:
    """The options of a mode that runs ``fraudd run``; ``mode`` receives them as its first
    argument, an ``Invocation``, and its own options by name."""

    def command(
        redis_url: str,
        postgres_url: str,
        seed: int,
        private_services: bool,
        out_dir: Path,
        fraudd_args: tuple[str, ...],
        **own: Any,
    ) -> None:
        mode(Invocation(redis_url, postgres_url, seed, private_services, out_dir, fraudd_args), **own)

    return _common_options(functools.update_wrapper(command, mode))


# The modes at a fraction of the maximum rate (``_max_rate``).
_max_rate_options = _all(
    click.option("--max-rate", type=float, default=None, help="Maximum rate (tx/s) the offered load refers to."),
    click.option(
        "--from-report",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="Take the maximum from this throughput report.",
    ),
    click.option(
        "--calibrate-transactions",
        default=200_000,
        show_default=True,
        help="Without --max-rate or a matching report: drain this many to measure the maximum first.",
    ),
)


@contextmanager
def _setup(invocation: Invocation, cluster_masters: int = 0, cluster_replicas: int = 0) -> Iterator[Setup]:
    """The invocation's Setup, on the shared servers or on a private pair that lives as long as it;
    ``cluster_masters``: the private Redis is a cluster of that many masters, and ``fraudd run``
    is told so (``--redis-cluster``)."""
    fraudd_args, out_dir = invocation.fraudd_args, invocation.out_dir
    if cluster_masters:
        fraudd_args = (*fraudd_args, "--redis-cluster") if "--redis-cluster" not in fraudd_args else fraudd_args
    if invocation.private_services or cluster_masters:
        with services.private(
            invocation.redis_url,
            invocation.postgres_url,
            lambda line: click.echo(line, err=True),
            cluster_masters,
            cluster_replicas,
        ) as (r, p, settings):
            yield _make_setup(r, p, {"private": True, **settings}, out_dir, fraudd_args, bool(cluster_masters))
    else:
        yield _make_setup(invocation.redis_url, invocation.postgres_url, {"private": False}, out_dir, fraudd_args)


def _make_setup(
    redis_url: str, postgres_url: str, services_info: dict, out_dir: Path, fraudd_args: tuple[str, ...], cluster: bool = False
) -> Setup:
    args = list(fraudd_args)
    model_path = _flag(args, "model-path", "ML_MODEL_PATH", str(DEFAULT_MODEL))
    if not Path(model_path).is_file():
        raise click.ClickException(f"no model at {model_path}: train one first (fraudd train)")
    shards = int(_flag(args, "shards", "FRAUDD_SHARDS", "1"))
    if cluster and shards < 2:
        raise click.ClickException("a Redis Cluster needs --shards S > 1: one shard lives in one slot, on one node")
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    return Setup(
        client=redis_client(redis_url, cluster, decode_responses=True),
        redis_url=redis_url,
        postgres_url=postgres_url,
        fraudd_args=args,
        workers=int(_flag(args, "workers", "FRAUDD_WORKERS", str(os.cpu_count() or 1))),
        batch_size=int(_flag(args, "batch-size", "FRAUDD_BATCH_SIZE", "500")),
        shards=shards,
        model_path=model_path,
        services=services_info,
        out_dir=out_dir,
        log_dir=log_dir,
        echo=lambda line: click.echo(line, err=True),
        cluster=cluster,
    )


def _finish(mode: str, setup: Setup, started: float, result: dict, summary: str) -> None:
    document = report.document(
        mode,
        started,
        lambda: report.machine(next(iter(redis_nodes(setup.client).values())), setup.postgres_url),
        result,
        fraudd_args=setup.fraudd_args,
        workers=setup.workers,
        batch_size=setup.batch_size,
        services=setup.services,
    )
    path = report.write(report.out_path(setup.out_dir, mode), document)
    click.echo(summary)
    draw = {"throughput": plots.throughput, "latency": plots.latency, "soak": plots.soak}.get(mode)
    if draw is not None:
        title = f"{' '.join(document['command'])}  ({document['started_at']})"
        click.echo(f"\npicture: {draw(result, title, click.get_current_context().meta['pictures_dir'])}")
    click.echo(f"\nreport: {path}")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """fraudd's benchmark: throughput, latency and soak runs against a real `fraudd run`."""


@main.command(context_settings=PASS_THROUGH)
@click.option("-n", "--transactions", default=500_000, show_default=True, help="Prefilled transactions per drain.")
@click.option("--naive-transactions", default=20_000, show_default=True, help="Transactions for the (slow) naive baseline.")
@click.option("--baselines/--no-baselines", default=True, show_default=True, help="Also drain with the bare and naive consumers.")
@click.option(
    "--event-rate",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Event-time pace of the generated transactions (tx/s; users in proportion, each at its usual "
    "pace). Default: the generator's natural 1 tx/s, where a batch of 500 spans 8 minutes of event "
    "time; production's rates put a batch in one or two minutes (e.g. 10).",
)
@click.option(
    "--redis-cluster-masters",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Run on a private Redis Cluster of this many masters (and a private PostgreSQL) with "
    "`fraudd run --redis-cluster`; pass --shards S > 1. The report gives each node's figures. "
    "The baselines read one stream on one Redis: they are left out.",
)
@click.option(
    "--redis-cluster-replicas",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Replicas per master of that cluster (their CPU is reported per node too).",
)
@_common
def throughput_cmd(
    invocation: Invocation,
    transactions: int,
    naive_transactions: int,
    baselines: bool,
    event_rate: float | None,
    redis_cluster_masters: int,
    redis_cluster_replicas: int,
) -> None:
    """Drain a prefilled stream with fraudd and the baselines; rate, CPU per transaction, checks."""
    started = time.time()
    with _setup(invocation, redis_cluster_masters, redis_cluster_replicas) as setup:
        chosen = throughput.BASELINES if baselines and not setup.cluster else ()
        result = throughput.run(setup, transactions, naive_transactions, invocation.seed, chosen, event_rate)
        _finish("throughput", setup, started, result, format_throughput(result))


@main.command(context_settings=PASS_THROUGH)
@_max_rate_options
@click.option("--rates", default="0.1,0.5,0.8", show_default=True, help="Offered loads, as fractions of the maximum.")
@click.option("--seconds", default=20.0, show_default=True, help="Sending time per rate.")
@click.option("--warmup", default=1.0, show_default=True, help="Seconds at the start of each rate left out of the quantiles.")
@_common
def latency_cmd(
    invocation: Invocation,
    max_rate: float | None,
    from_report: Path | None,
    calibrate_transactions: int,
    rates: str,
    seconds: float,
    warmup: float,
) -> None:
    """End-to-end latency at fixed open-loop rates (by default 10%, 50% and 80% of the maximum)."""
    started = time.time()
    fractions = [float(f) for f in rates.split(",")]
    with _setup(invocation) as setup:
        maximum, source = _max_rate(setup, max_rate, from_report, calibrate_transactions, invocation.seed)
        result = latency.run(setup, maximum, fractions, seconds, warmup, invocation.seed)
        result["max_rate_source"] = source
        _finish("latency", setup, started, result, format_latency(result))


@main.command(context_settings=PASS_THROUGH)
@click.option("--minutes", default=10.0, show_default=True)
@click.option("--fraction", default=0.5, show_default=True, help="Offered load as a fraction of the maximum.")
@_max_rate_options
@click.option("--interval", default=5.0, show_default=True, help="Seconds between samples.")
@_common
def soak_cmd(
    invocation: Invocation,
    minutes: float,
    fraction: float,
    max_rate: float | None,
    from_report: Path | None,
    calibrate_transactions: int,
    interval: float,
) -> None:
    """A long run at a fixed load: worker RSS, group lag and Redis memory over time."""
    started = time.time()
    with _setup(invocation) as setup:
        maximum, source = _max_rate(setup, max_rate, from_report, calibrate_transactions, invocation.seed)
        setup.echo(f"soak: {fraction:.0%} of {maximum:,.0f} tx/s for {minutes:g} min ...")
        result = soak.run(setup, maximum * fraction, fraction, minutes * 60.0, interval, invocation.seed)
        result["max_rate"], result["max_rate_source"] = maximum, source
        _finish("soak", setup, started, result, format_soak(result))


@main.command("ingest")
@click.option("--seconds", default=10.0, show_default=True, help="Length of each wrk phase.")
@click.option("--ingest-workers", default=2, show_default=True, help="fraudd ingest --workers.")
@click.option("--connections", default=64, show_default=True, help="wrk connections of the closed-loop single-POST phase.")
@click.option("--batch-items", default=500, show_default=True, help="Transactions per batch POST.")
@click.option("--fraction", default=0.5, show_default=True, help="Paced load, as a fraction of the measured maximum.")
@click.option("--score/--no-score", default=True, show_default=True, help="Also measure /v1/score with `fraudd run` on the box.")
@_servers
@_PRIVATE_SERVICES
@_OUT_DIR
def ingest_cmd(
    seconds: float,
    ingest_workers: int,
    connections: int,
    batch_items: int,
    fraction: float,
    score: bool,
    redis_url: str,
    postgres_url: str,
    private_services: bool,
    out_dir: Path,
) -> None:
    """`fraudd ingest` under wrk: single and batch POSTs, latency at a fixed load, /v1/score with
    `fraudd run`, side by side with a bare XADD loop and a bare aiohttp server."""
    from bench import ingest

    started = time.time()
    echo = lambda line: click.echo(line, err=True)  # noqa: E731
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    def measure(redis_url: str, postgres_url: str, services_info: dict) -> None:
        result = ingest.run(
            redis_url, postgres_url, log_dir, seconds, ingest_workers, connections, batch_items, fraction, score, echo
        )
        document = report.document(
            "ingest",
            started,
            lambda: report.machine(redis.Redis.from_url(redis_url, decode_responses=True), postgres_url),
            result,
            services=services_info,
        )
        path = report.write(report.out_path(out_dir, "ingest"), document)
        click.echo(ingest.format_result(result))
        click.echo(f"\nreport: {path}")

    if private_services:
        with services.private(redis_url, postgres_url, echo) as (r, p, settings):
            measure(r, p, {"private": True, **settings})
    else:
        measure(redis_url, postgres_url, {"private": False})


@main.command(context_settings=PASS_THROUGH)
@click.option("-n", "--alerts", "n", default=20_000, show_default=True, help="Prefilled alerts per throughput run.")
@click.option("--processes", default="1,2", show_default=True, help="fraudd alerts --workers of each throughput run.")
@click.option(
    "--fraction", default=0.5, show_default=True, help="Offered load of the latency run, as a fraction of the 1-process rate."
)
@click.option("--seconds", default=20.0, show_default=True, help="Sending time of the latency run.")
@click.option("--warmup", default=1.0, show_default=True, help="Seconds at the start left out of the latency quantiles.")
@click.option(
    "--flaky-every",
    default=10,
    show_default=True,
    help="Also drain into a receiver answering 503 twice to one alert in this many (0: skip that run).",
)
@_common
def alerts_cmd(
    invocation: Invocation,
    n: int,
    processes: str,
    fraction: float,
    seconds: float,
    warmup: float,
    flaky_every: int,
) -> None:
    """Alerts/s delivered by `fraudd alerts` to a local signed-webhook receiver, healthy and flaky; delivery
    latency at a fraction of it."""
    started = time.time()
    with _setup(invocation) as setup:
        result = alerts.run(setup, n, [int(p) for p in processes.split(",")], fraction, seconds, warmup, flaky_every)
        _finish("alerts", setup, started, result, alerts.format_result(result))


main.add_command(throughput_cmd, "throughput")
main.add_command(latency_cmd, "latency")
main.add_command(soak_cmd, "soak")
main.add_command(alerts_cmd, "alerts")


@main.command("console")
@click.option("-n", "--transactions", default=1_000_000, show_default=True, help="Stored transactions (5% of them become cases).")
@click.option("--requests", default=200, show_default=True, help="Requests per queue view (case pages: five times as many).")
@_servers
@_OUT_DIR
def console_cmd(transactions: int, requests: int, redis_url: str, postgres_url: str, out_dir: Path) -> None:
    """Server time of the analyst console's queue page (first 50, each filter) and case page on a full store."""
    started = time.time()
    echo = lambda line: click.echo(line, err=True)  # noqa: E731
    result = console.run(redis_url, postgres_url, transactions, requests, out_dir, echo)
    document = report.document(
        "console",
        started,
        lambda: report.machine(redis.Redis.from_url(redis_url, decode_responses=True), postgres_url),
        result,
    )
    path = report.write(report.out_path(out_dir, "console"), document)
    click.echo(console.format_result(result))
    click.echo(f"\nreport: {path}")


@main.command("console-writes")
@click.option("-n", "--rows", default=200_000, show_default=True, help="Scored transactions per COPY.")
@click.option("--rounds", default=4, show_default=True, help="COPYs into each table, alternating.")
@_servers
def console_writes_cmd(rows: int, rounds: int, redis_url: str, postgres_url: str) -> None:
    """What the console's index on transactions adds to the scoring's COPY, per row."""
    result = console.index_cost(redis_url, postgres_url, rows, rounds, lambda line: click.echo(line, err=True))
    click.echo(console.format_index_cost(result))


@main.command("redis-instructions")
@click.option(
    "-n", "--transactions", default=20_000, show_default=True, help="Transactions replayed (valgrind: ≈ 1 min per 10,000)."
)
@click.option("--shards", default=8, show_default=True, help="Input shards (1: the shared store, the default deployment).")
@click.option("--workers", default=2, show_default=True, help="Consumers, taking turns; with shards each owns shard k mod this.")
@click.option("--batch-size", default=1000, show_default=True, help="Entries per read, over all of a consumer's shards.")
@click.option(
    "--event-rate", default=10.0, show_default=True, help="Event-time pace of the transactions (tx/s), as throughput's."
)
@click.option("--resent-every", default=50, show_default=True, help="Every N-th transaction is sent again (0: none).")
def redis_instructions_cmd(
    transactions: int, shards: int, workers: int, batch_size: int, event_rate: float, resent_every: int
) -> None:
    """Redis's instructions per transaction (callgrind) of the scoring's Redis calls: deterministic."""
    echo = functools.partial(click.echo, err=True)
    result = redis_instructions.measure(transactions, shards, workers, batch_size, event_rate, resent_every, echo)
    click.echo(redis_instructions.format_result(result))


@main.command("copy-indexes")
@click.option("-n", "--rows", default=1_000, show_default=True, help="Scored transactions per COPY (a worker's batch).")
@click.option("--rounds", default=100, show_default=True, help="COPYs into each table, alternating.")
@click.option("--after-checkpoint", is_flag=True, help="A CHECKPOINT before each COPY: what full-page writes add.")
@click.option("--preload", default=0, show_default=True, help="Rows stored in each table before the COPYs measured.")
@_PRIVATE_SERVICES
@_PG_SETTINGS
@click.option("--redis-url", envvar="REDIS_URL", default=DEFAULT_REDIS_URL, show_default=True)
@click.option("--postgres-url", envvar="POSTGRES_URL", default=DEFAULT_POSTGRES_URL, show_default=True)
def copy_indexes_cmd(
    rows: int,
    rounds: int,
    after_checkpoint: bool,
    preload: int,
    private_services: bool,
    pg_settings: tuple[str, ...],
    redis_url: str,
    postgres_url: str,
) -> None:
    """PostgreSQL's CPU and WAL per row of the workers' COPY: no index, each index of `transactions` added, the table."""
    echo = lambda line: click.echo(line, err=True)  # noqa: E731
    overrides = _pg_overrides(pg_settings, private_services)
    if private_services:
        with services.private(redis_url, postgres_url, echo, pg_overrides=overrides) as (r, p, _):
            result = copy_indexes.run(r, p, rows, rounds, echo, after_checkpoint, preload)
    else:
        result = copy_indexes.run(redis_url, postgres_url, rows, rounds, echo, after_checkpoint, preload)
    click.echo(copy_indexes.format_result(result))


@main.command("copy-growth")
@click.option("-n", "--rows", default=1_000, show_default=True, help="Scored transactions per COPY (a worker's batch).")
@click.option("--total", default=6_000_000, show_default=True, help="Rows the day's partition ends with.")
@click.option("--step", default=500_000, show_default=True, help="Rows between two lines of figures.")
@_PRIVATE_SERVICES
@_PG_SETTINGS
@_servers
@_OUT_DIR
def copy_growth_cmd(
    rows: int,
    total: int,
    step: int,
    private_services: bool,
    pg_settings: tuple[str, ...],
    redis_url: str,
    postgres_url: str,
    out_dir: Path,
) -> None:
    """PostgreSQL's CPU, WAL and index reads per row of the workers' COPY as one day's partition fills."""
    started = time.time()
    echo = lambda line: click.echo(line, err=True)  # noqa: E731
    overrides = _pg_overrides(pg_settings, private_services)

    def measure(r: str, p: str, services_info: dict) -> None:
        result = copy_growth.run(r, p, rows, total, step, echo)
        document = report.document(
            "copy-growth",
            started,
            lambda: report.machine(redis.Redis.from_url(r, decode_responses=True), p),
            result,
            services=services_info,
        )
        click.echo(f"report: {report.write(report.out_path(out_dir, 'copy-growth'), document)}")

    if private_services:
        with services.private(redis_url, postgres_url, echo, pg_overrides=overrides) as (r, p, settings):
            measure(r, p, {"private": True, **settings})
    else:
        measure(redis_url, postgres_url, {"private": False})


def _pg_overrides(pg_settings: tuple[str, ...], private_services: bool) -> dict[str, str]:
    """--pg-setting's NAME=VALUE pairs: settings of the private PostgreSQL, which only that one takes."""
    if pg_settings and not private_services:
        raise click.UsageError("--pg-setting needs --private-services")
    return dict(setting.split("=", 1) for setting in pg_settings)


def _max_rate(setup: Setup, flag: float | None, path: Path | None, calibrate: int, seed: int) -> tuple[float, str]:
    """The maximum rate: the flag, a given report, the newest throughput report run with the same
    fraudd flags, or a fresh fraudd-only drain, in that order."""
    if flag is not None:
        return flag, "--max-rate"
    candidates = [path] if path else sorted(setup.out_dir.glob("throughput-*.json"), reverse=True)
    for candidate in candidates:
        document = orjson.loads(candidate.read_bytes())
        if path or document.get("fraudd_args") == setup.fraudd_args:
            return float(document["result"]["drains"]["fraudd"]["rate_tx_per_s"]), str(candidate)
    setup.echo(f"no throughput report with these fraudd flags: measuring the maximum on {calibrate:,} transactions")
    result = throughput.run(setup, calibrate, 0, seed, ())
    return float(result["drains"]["fraudd"]["rate_tx_per_s"]), "calibration drain"


def _us(value) -> str:
    return f"{value:.1f}" if value is not None else "-"


def format_throughput(result: dict) -> str:
    drains = result["drains"]
    rows = []
    for kind, d in drains.items():
        cpu = d["cpu_us_per_tx"]
        consumer = cpu.get("workers", cpu.get("consumers", 0.0)) + cpu.get("supervisor", 0.0)
        ratio = (
            "1.000"
            if kind == "fraudd"
            else f"{drains['fraudd']['rate_tx_per_s'] / d['rate_tx_per_s']:.3f}"
            if d["rate_tx_per_s"]
            else "-"
        )
        rows.append(
            [
                kind,
                d["processes"],
                f"{d['transactions']:,}",
                f"{d['rate_tx_per_s']:,.0f}",
                ratio,
                _us(d["pipeline_cpu_us_per_tx"]),
                _us(consumer),
                _us(cpu["redis"]),
                _us(cpu.get("postgres")),
                _us(d["redis_info_cpu_us_per_tx"]),
                f"{d['machine_utilisation']:.0%}",
                f"{d['other_cpu_s']:.2f}",
            ]
        )
    lines = [
        "",
        "throughput (prefilled stream, window = first ack .. drained)",
        report.table(
            rows,
            [
                "consumer",
                "procs",
                "tx in window",
                "tx/s",
                "fraudd/x",
                "CPU-µs/tx",
                "consumer",
                "redis",
                "postgres",
                "redis(INFO)",
                "machine busy",
                "other CPU-s",
            ],
        ),
    ]
    commands = drains["fraudd"]["redis_commands"]
    if commands:
        top = sorted(commands.items(), key=lambda item: -item[1]["usec"])[:8]
        lines += [
            "",
            "fraudd's Redis time per transaction by command (script-internal commands are also inside evalsha/fcall):",
            "  " + ", ".join(f"{name} {c['us_per_tx']:.2f} µs" for name, c in top),
        ]
    nodes = drains["fraudd"].get("redis_nodes")
    if nodes:
        lines += [
            "",
            'fraudd\'s Redis per node (CPU of the redis-server process; "own tx": per transaction of the '
            "shards it serves; +fraud, +dlq: it serves those streams too; commandstats: top commands, µs/tx)",
            format_nodes(nodes),
        ]
    c = result["checks"]
    if c:
        lines += [
            "",
            f"checks: produced {c['produced']:,}, rows {c['rows']:,}, missing {c['missing']}, "
            f"duplicate rows {c['duplicate_rows']}, alerts {c['alerts']:,} for {c['flagged_rows']:,} flagged, "
            f"pending {c['pending_after_drain']}, exit {c['exit_codes']} -> "
            f"{'EXACTLY ONCE' if c['exactly_once'] else 'MISMATCH'}",
            f"fraud: recall {c['recall']}, precision {c['precision']} ({c['fraud_labelled']:,} labelled); "
            f"decisions {c['decisions']}; rate from scored_at {c['rate_from_scored_at']}",
        ]
    if result["ratios"]:
        lines.append("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in result["ratios"].items()))
    return "\n".join(lines)


def format_nodes(nodes: dict[str, dict]) -> str:
    """One row per Redis node and their total."""
    rows = []
    for name, node in nodes.items():
        top = list(node["commands"].items())[:3]
        served = " ".join([",".join(map(str, node["shards"])), *(f"+{stream}" for stream in node["streams"])]).strip()
        rows.append(
            [
                name,
                node["role"],
                served or "-",
                f"{node['transactions']:,}",
                _us(node["cpu_us_per_tx"]),
                _us(node["cpu_us_per_own_tx"]),
                _us(node["info_cpu_us_per_tx"]),
                ", ".join(f"{command} {c['us_per_tx']:.2f}" for command, c in top) or "-",
                f"{node['keys']:,}",
                f"{node['used_memory_bytes'] / 2**20:.1f}",
            ]
        )
    total = lambda field: sum(node[field] for node in nodes.values())  # noqa: E731
    rows.append(
        [
            "total",
            "",
            "",
            f"{total('transactions'):,}",
            _us(total("cpu_us_per_tx")),
            "",
            _us(total("info_cpu_us_per_tx")),
            "",
            f"{total('keys'):,}",
            f"{total('used_memory_bytes') / 2**20:.1f}",
        ]
    )
    return report.table(
        rows, ["node", "role", "shards", "tx", "CPU-µs/tx", "per own tx", "INFO µs/tx", "commandstats µs/tx", "keys", "MiB"]
    )


def format_latency(result: dict) -> str:
    rows = []
    for p in result["phases"]:
        lat = p["latency_ms"]
        rows.append(
            [
                f"{p['fraction_of_max']:.0%}",
                f"{p['target_rate']:,.0f}",
                f"{p['sent']:,}",
                *[str(lat.get(q, "-")) for q in ("p50", "p95", "p99", "p99.9")],
                str(lat.get("max", lat.get("max_at_most", "-"))),
                f"{p['max_lag_entries']:,}",
                str(p["producer_lag_ms"].get("p99", "-")),
                _us(p["usage"]["pipeline_cpu_us_per_tx"]),
            ]
        )
    return "\n".join(
        [
            "",
            f"latency, ms (source: {result['latency_source']}; max rate {result['max_rate']:,.0f} tx/s "
            f"from {result['max_rate_source']})",
            report.table(
                rows, ["load", "tx/s", "sent", "p50", "p95", "p99", "p99.9", "max", "max lag", "producer lag p99", "CPU-µs/tx"]
            ),
        ]
    )


def format_soak(result: dict) -> str:
    rows = [
        [f"worker {i}", w["first_window_mib"], w["last_window_mib"], w["growth_mib"], w["growth_pct"], w["max_mib"]]
        for i, w in enumerate(result["worker_rss"])
    ]
    for name in ("supervisor_rss", "redis_used_memory", "redis_without_alert_stream"):
        g = result[name]
        rows.append([name, g["first_window_mib"], g["last_window_mib"], g["growth_mib"], g["growth_pct"], g["max_mib"]])
    return "\n".join(
        [
            "",
            f"soak: {result['sent']:,} tx at {result['achieved_rate']:,.0f} tx/s ({result['fraction_of_max']:.0%} of "
            f"{result['max_rate']:,.0f}) for {result['seconds']:g}s; windows of {result['growth_window_s']:g}s",
            report.table(rows, ["memory (MiB)", "first", "last", "growth", "growth %", "max"]),
            f"max lag {result['max_lag_entries']:,}, max pending {result['max_pending_entries']:,}, drained "
            f"{result['drained_s_after_last_send']}s after the last send; rows {result['rows']:,}, "
            f"{'exactly once' if result['exactly_once'] else 'MISMATCH'}; "
            f"CPU-µs/tx {result['usage']['pipeline_cpu_us_per_tx']}",
            "",
            "per minute (CPU-µs per transaction scored; the producer's per transaction offered; last row: the drain)",
            report.table(
                [_soak_window_row(w) for w in [*result["per_minute"], result["drain_window"]]],
                [
                    "t s",
                    "scored/s",
                    "lag",
                    "workers",
                    "redis",
                    "fcall",
                    "postgres",
                    "pg backends",
                    "producer",
                    "pipeline",
                    "WAL B/row",
                    "FPI/row",
                    "ckpts",
                    "idx read %",
                    "rows",
                    "pkey MiB",
                    "user_time MiB",
                    "redis MiB",
                    "redis keys",
                    "other cores",
                ],
            ),
        ]
    )


def _soak_window_row(w: dict) -> list:
    cpu = w["cpu_us_per_tx"]
    return [
        w["t"],
        f"{w['scored_per_s']:,.0f}",
        f"{w['lag']:,}",
        cpu["workers"],
        cpu["redis"],
        w["redis_us_per_tx"].get("fcall", 0.0),
        cpu["postgres"],
        cpu["postgres_backends"],
        "-" if cpu.get("producer") is None else cpu["producer"],
        w["pipeline_cpu_us_per_tx"],
        f"{w['wal_bytes_per_row']:,.0f}",
        w["wal_fpi_per_row"],
        w["checkpoints"],
        w["index_blocks_read_outside_shared_buffers_pct"],
        f"{w['rows']:,}",
        w["index_mib"].get("transactions_pkey", 0.0),
        w["index_mib"].get("transactions_user_time", 0.0),
        w["redis_mib"],
        f"{w['redis_keys']:,}",
        w["other_cores"],
    ]


@main.command("rules-backtest")
@click.option("-n", "transactions", default=1_000_000, show_default=True, help="Stored decisions to backtest.")
@_servers
@_SEED
def rules_backtest_cmd(transactions: int, redis_url: str, postgres_url: str, seed: int) -> None:
    """`fraudd rules test` on N stored decisions (goal: 1,000,000 in <= 10 s), and the cost of storing feature vectors."""
    from bench import rules_backtest

    result = rules_backtest.run(redis_url, postgres_url, transactions, seed, lambda line: click.echo(line, err=True))
    click.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
