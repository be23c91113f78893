"""The learning commands: ``fraudd simulate``, ``train``, ``retrain``, ``calibrate``, ``labels``, ``label``,
``models``, ``backtest``."""

from __future__ import annotations

import getpass
import re
import sys
from datetime import UTC
from pathlib import Path
from types import ModuleType

import click
import redis

from fraudd.scoring.settings import MODEL_PATH, RULES_PATH, THRESHOLDS
from fraudd.settings import (
    DLQ_STREAM,
    FRAUD_STREAM,
    PG_SCHEMA,
    POSTGRES_OPTIONS,
    POSTGRES_URL,
    REDIS_CLUSTER,
    REDIS_URL,
    SHARDS,
    STREAM,
    Decorated,
    options,
)

from . import settings as label_settings

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# What the ``train`` extra installs (pyproject.toml), by import name: the daemon itself needs none of them.
TRAIN_EXTRA_MODULES = frozenset({"lightgbm", "onnxmltools", "onnx", "sklearn"})


def parse_duration(text: str) -> float:
    """Seconds in ``90d``, ``12h``, ``30m``, ``45s`` or ``2w``; ``click.BadParameter`` otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration like 90d, 12h, 30m, 45s or 2w")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _duration(ctx, param, value):
    return None if value is None else parse_duration(value)


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


def _postgres_failed(exc: Exception) -> click.ClickException:
    """A PostgreSQL error as the one-line message naming the option behind it."""
    return click.ClickException(f"--postgres-url / POSTGRES_URL: {' '.join(str(exc).split())}")


def _command_line(name: str) -> str:
    """How ``fraudd NAME`` was invoked, for the model card and the audit (just the name when run
    from Python rather than the command line)."""
    return " ".join(["fraudd", name, *sys.argv[2:]]) if sys.argv[1:2] == [name] else f"fraudd {name}"


def _label_options(function: Decorated) -> Decorated:
    """The options of ``train`` and ``retrain`` that say how the labels feed the model's inputs."""
    function = click.option(
        "--label-delay",
        default="7d",
        show_default=True,
        callback=_duration,
        help="When a label does not say when it was reported (reported_at), take it as reported this long after its transaction.",
    )(function)
    return click.option(
        "--label-features/--no-label-features",
        default=True,
        show_default=True,
        help="Fit the label-fed confirmed-fraud counts (merchant, device, IP, card over 7 and 28 days) as model inputs, "
        "point in time: a row sees only the labels reported before its event time.",
    )(function)


_RATE = click.FloatRange(0.0, 1.0, min_open=True, max_open=True)


@click.command()
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="History file to write (JSON Lines: input message + label + typology).",
)
@click.option("--customers", default=5_000, show_default=True, type=click.IntRange(10))
@click.option("--terminals", default=10_000, show_default=True, type=click.IntRange(40))
@click.option("--days", default=60, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option(
    "--end", "end_ts", default=None, type=float, help="Unix time the history ends at (midnight UTC of today by default)."
)
def simulate(out: Path, customers: int, terminals: int, days: int, seed: int, end_ts: float | None) -> None:
    """Write a labelled history from the customers-and-terminals simulator (fraudd.learning.simulator)."""
    from .simulator import TYPOLOGIES, Simulator, SimulatorConfig

    start = None if end_ts is None else end_ts - days * 86400.0
    history = Simulator(
        SimulatorConfig(seed=seed, n_customers=customers, n_terminals=terminals, days=days, start_ts=start)
    ).history()
    with out.open("wb") as file:
        for line in history.history_lines():
            file.write(line + b"\n")
    counts = ", ".join(f"{name} {int((history.typology == code).sum()):,}" for code, name in enumerate(TYPOLOGIES))
    click.echo(f"{out}: {len(history):,} transactions ({counts})")


@click.command()
@click.option(
    "--history",
    type=click.Path(dir_okay=False, path_type=Path),
    help='Labelled history: JSON Lines, one input message per line plus "label" (1/0 or true/false), in time order.',
)
@click.option("--from-postgres", is_flag=True, help="Train on the stored transactions joined with the labels table.")
@click.option(
    "--since",
    default="90d",
    show_default=True,
    callback=_duration,
    help="With --from-postgres: transactions of this last period (event time).",
)
@click.option(
    "--generated",
    type=click.IntRange(1000),
    default=None,
    help="Train on this many transactions of fraudd.generator (how the shipped fraudd/scoring/fraud.onnx is made).",
)
@click.option(
    "--generated-holdout",
    type=click.IntRange(1000),
    default=200_000,
    show_default=True,
    help="With --generated: held-out transactions, from the next seed.",
)
@click.option("--seed", default=1, show_default=True, help="Learner seed (and generator seed with --generated).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Model file to write (ONNX).")
@click.option(
    "--card",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Model card to write [default: the model's path with .md].",
)
@click.option(
    "--holdout-share",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0.05, 0.5),
    help="Most recent share of the history held out for the model card's figures.",
)
@click.option(
    "--tune-share",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0.05, 0.5),
    help="Share before the held-out part that sets the thresholds.",
)
@click.option(
    "--review-fpr",
    default=0.01,
    show_default=True,
    type=_RATE,
    help="False-positive rate of the review threshold on the tuning part.",
)
@click.option(
    "--decline-fpr",
    default=0.001,
    show_default=True,
    type=_RATE,
    help="False-positive rate of the decline threshold on the tuning part.",
)
@click.option("--version", "version", default=None, help="Model version [default: derived from the data].")
@_label_options
@options([REDIS_URL, POSTGRES_URL, PG_SCHEMA])
def train(
    history: Path | None,
    from_postgres: bool,
    since: float,
    generated: int | None,
    generated_holdout: int,
    seed: int,
    out: Path,
    card: Path | None,
    holdout_share: float,
    tune_share: float,
    review_fpr: float,
    decline_fpr: float,
    version: str | None,
    label_features: bool,
    label_delay: float,
    redis_url: str,
    postgres_url: str,
    pg_schema: str,
) -> None:
    """Train a model on labelled history with the daemon's own features; write it and its model card."""
    # The history is read and checked before the training libraries load: they take seconds.
    from .history import TrainingError, check_positives, data_version, featurize, generated_history, read_history, split_bounds

    if sum((history is not None, from_postgres, generated is not None)) != 1:
        raise click.UsageError("give exactly one of --history FILE, --from-postgres or --generated N")
    client = redis.Redis.from_url(redis_url, protocol=2)
    command = _command_line("train")
    delay = label_delay if label_features else None
    try:
        if generated is not None:
            training = _training_libraries()
            fit_source = generated_history(seed, generated)
            everything = featurize(client, fit_source, _echo_err, delay)
            holdout = featurize(client, generated_history(seed + 1, generated_holdout), _echo_err, delay)
            cut = int(len(everything) * 0.8)
            fit_part, tune = everything.take(slice(0, cut)), everything.take(slice(cut, len(everything)))
            version = (
                version or f"lgbm-{training.LIGHTGBM_PARAMS['n_estimators']}x{training.LIGHTGBM_PARAMS['num_leaves']}-s{seed}"
            )
            data_section = (
                f"Generated by `fraudd.generator` (seeded; ~1% fraud over five typologies that live in each user's\n"
                f"history). Training: seed {seed}, {generated:,} transactions in event-time order, the first 80% to\n"
                f"fit, the last 20% to set thresholds (time-based split). Held out: seed {seed + 1}, {generated_holdout:,}\n"
                f"transactions ({int(holdout.is_fraud.sum()):,} fraud), never seen in training."
            )
        else:
            if history is not None:
                source = read_history(history, _echo_err)
            else:
                from .store import labelled_history

                source = labelled_history(postgres_url, pg_schema, since)
            parts = split_bounds(len(source.payloads), holdout_share, tune_share)
            check_positives(source.is_fraud, parts)
            training = _training_libraries()
            everything = featurize(client, source, _echo_err, delay)
            fit_part, tune, holdout = (everything.take(rows) for rows in parts)
            version = version or (
                f"lgbm-{training.LIGHTGBM_PARAMS['n_estimators']}x{training.LIGHTGBM_PARAMS['num_leaves']}-{data_version(source)}"
            )
            data_section = (
                f"{source.source}: {len(everything):,} labelled transactions ({int(everything.is_fraud.sum()):,} fraud),\n"
                f"in time order. Time-based split: the first {len(fit_part):,} fit the trees, the next {len(tune):,}\n"
                f"set the thresholds, the most recent {len(holdout):,} ({int(holdout.is_fraud.sum()):,} fraud) are\n"
                f"held out for the figures below."
            )
        trained = training.train(fit_part, tune, holdout, seed, version, review_fpr, decline_fpr, _echo_err)
    except TrainingError as exc:
        raise click.ClickException(str(exc)) from None
    except redis.RedisError as exc:
        raise click.ClickException(f"--redis-url / REDIS_URL: cannot compute features: {exc}") from None
    finally:
        client.close()
    training.export(trained, out)
    card = card or out.with_suffix(".md")
    card.write_text(training.model_card(trained, data_section, command))
    m = trained.metrics
    best_rule = max(trained.plain_rules.items(), key=lambda item: item[1])
    click.echo(
        f"{out}: {version}; held out: recall {m['recall_at_1pct_fpr']:.1%} at 1% FPR "
        f"(best plain rule, {best_rule[0]}: {best_rule[1]:.1%}), PR-AUC {m['pr_auc']:.3f}; "
        f"review from {trained.review:.4f}, decline from {trained.decline:.4f}; card {card}"
    )


def _training_libraries() -> ModuleType:
    """``train.py``, which loads LightGBM, scikit-learn and ONNX: the train extra."""
    try:
        from . import train as training
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] not in TRAIN_EXTRA_MODULES:
            raise
        raise click.ClickException(
            f"fraudd train needs the train extra ({exc.name} is missing): pip install 'fraudd[train]'"
        ) from None
    return training


@click.command()
@click.option("--target-review-rate", required=True, type=_RATE, help="Share of transactions to put in review (0.01: 1%).")
@click.option("--target-decline-rate", required=True, type=_RATE, help="Share of transactions to decline.")
@click.option("--since", default="7d", show_default=True, help="Stored transactions of this last period (event time).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Thresholds file to write (JSON).")
@options([POSTGRES_URL, PG_SCHEMA, MODEL_PATH, RULES_PATH])
def calibrate(
    target_review_rate: float,
    target_decline_rate: float,
    since: str,
    out: Path,
    postgres_url: str,
    pg_schema: str,
    model_path: Path,
    rules_path: Path,
) -> None:
    """Set review and decline thresholds from the scores of the team's own recent traffic (no labels needed).

    Rules that force a review or a decline spend the same budget, so the model's thresholds are set
    on what is left of it. Load the file with `fraudd run --thresholds FILE`.
    """
    import psycopg

    from fraudd.scoring.features import FEATURE_NAMES
    from fraudd.scoring.model import FraudModel, ModelError
    from fraudd.scoring.rules import ACTION_NAMES, Rules, RulesError

    from .calibrate import CalibrationError, stored_scores
    from .calibrate import calibrate as choose

    seconds = parse_duration(since)
    try:
        model = FraudModel.load(model_path, FEATURE_NAMES)
        rules = Rules.load(rules_path)
        stored = stored_scores(postgres_url, pg_schema, model.version, seconds, rules)
        thresholds = choose(stored, target_review_rate, target_decline_rate, model.version, since, rules.version)
    except (ModelError, RulesError, CalibrationError) as exc:
        raise click.ClickException(str(exc)) from None
    except psycopg.Error as exc:
        raise _postgres_failed(exc) from None
    out.write_bytes(thresholds.dumps())
    c = thresholds.calibration
    click.echo(
        f"{out}: model {model.version}: review from {thresholds.review_threshold:.6g}, decline from "
        f"{thresholds.decline_threshold:.6g}; on {c['transactions']:,} transactions of the last {since}: "
        f"review {c['expected_review_rate']:.2%}, decline {c['expected_decline_rate']:.2%} "
        f"(rules alone: review {c['forced_by_rules']['review']:.2%}, decline {c['forced_by_rules']['decline']:.2%})"
    )
    actions = {rule.code: ACTION_NAMES[rule.action] for rule in rules.rules}
    if c["rules_fired"]:
        click.echo(
            "rules fired on: " + ", ".join(f"{code} {share:.2%} ({actions[code]})" for code, share in c["rules_fired"].items())
        )
    if c["forced_by_rules"]["review"] + c["forced_by_rules"]["decline"] > target_review_rate + target_decline_rate:
        click.echo(
            "warning: the rules alone exceed the budget, so the model flags nothing more: put the noisiest "
            'rules in shadow (action = "shadow" in --rules-path) and calibrate again',
            err=True,
        )


@click.command("labels")
@options(label_settings.OPTIONS)
def labels_service(**params) -> None:
    """Store the labels stream (chargebacks, analyst verdicts) in the labels table, with --workers consumers."""
    from fraudd.preflight import check_dependencies, prepare_metrics_dir
    from fraudd.runtime import logs

    settings = label_settings.LabelSettings.from_params(params)
    logs.setup(settings.log_level)
    if settings.metrics.listen is not None:
        prepare_metrics_dir()
    check_dependencies(settings.redis, settings.postgres, [settings.consumer.stream], settings.consumer.group)
    # Both import prometheus-client, which reads the directory above.
    from fraudd.runtime.supervisor import Supervisor

    from .consumer import service

    sys.exit(Supervisor(service(settings)).run())


@click.command("label")
@click.option(
    "--file",
    "path",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Labels: .csv (header transaction_id,label[,source][,reported_at]) or JSON Lines.",
)
@click.option("--source", default=None, help="Source of labels that name none [default: file:<name>].")
@options([REDIS_URL, REDIS_CLUSTER, POSTGRES_URL, PG_SCHEMA, STREAM, SHARDS])
def label_file(
    path: Path,
    source: str | None,
    redis_url: str,
    redis_cluster: bool,
    postgres_url: str,
    pg_schema: str,
    stream: str,
    shards: int,
) -> None:
    """Record labels from a file in the labels table (idempotent: loading a file twice changes nothing)
    and in the confirmed-fraud counts the scoring reads."""
    from datetime import datetime

    import psycopg

    from fraudd.runtime.redis_clients import REDIS_FAILURES, redis_client
    from fraudd.schema import connect

    from .labels import LabelError, confirm, confirmed_shards, parse_labels, read_label_file, store_labels

    try:
        numbered = read_label_file(path.read_bytes(), str(path))
    except LabelError as exc:
        raise click.ClickException(str(exc)) from None
    written = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    labels, errors = parse_labels([document for _number, document in numbered], source or f"file:{path.name}", written)
    if errors:
        position, reason = errors[0]
        raise click.ClickException(
            f"{path} line {numbered[position][0]}: {reason}" + (f" (and {len(errors) - 1} more lines)" if len(errors) > 1 else "")
        )
    client = redis_client(redis_url, redis_cluster)
    confirmed = confirmed_shards(client, stream, shards)
    new = 0
    try:
        with connect(postgres_url, pg_schema, connect_timeout=5, autocommit=True) as conn:
            for start in range(0, len(labels), 10_000):
                new += store_labels(conn, labels[start : start + 10_000])
                confirm(conn, confirmed, labels[start : start + 10_000])
    except psycopg.Error as exc:
        raise _postgres_failed(exc) from None
    except REDIS_FAILURES as exc:
        raise click.ClickException(f"--redis-url / REDIS_URL: {exc}") from None
    finally:
        client.close()
    fraud = sum(label.label == "fraud" for label in labels)
    click.echo(f"{path}: {len(labels):,} labels ({fraud:,} fraud), {new:,} new reports")


@click.command()
@click.option(
    "--since",
    default="60d",
    show_default=True,
    help="Train on the stored, labelled transactions of this last period (event time).",
)
@click.option(
    "--window",
    default="7d",
    show_default=True,
    help="The most recent part of that period, not trained on: the candidate must beat the champion there.",
)
@click.option(
    "--margin",
    default=0.02,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="Recall (share of the window's labelled fraud) the candidate must gain at the champion's alert budget.",
)
@click.option(
    "--models-dir",
    default=Path("/var/lib/fraudd/models"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the candidate and its model card are written (readable at the same path by every scoring host).",
)
@click.option("--seed", default=1, show_default=True, help="Learner seed.")
@click.option("--by", "actor", default=None, help="Who retrains, for the audit [default: the user running it].")
@_label_options
@options([REDIS_URL, POSTGRES_URL, PG_SCHEMA, MODEL_PATH, RULES_PATH, THRESHOLDS])
def retrain(
    since: str,
    window: str,
    margin: float,
    models_dir: Path,
    seed: int,
    actor: str | None,
    label_features: bool,
    label_delay: float,
    redis_url: str,
    postgres_url: str,
    pg_schema: str,
    model_path: Path,
    rules_path: Path,
    thresholds: Path | None,
) -> None:
    """Train a candidate on the recent labelled traffic and promote it only if it beats the champion.

    The most recent --window is held out; there the candidate is calibrated to the champion's review
    and decline rates and must catch --margin more of the labelled fraud to be promoted. Otherwise the
    champion keeps deciding and the candidate runs in shadow. Both are recorded in model_promotions
    and the candidate's model card; the scoring workers follow within a second. The champion is the
    deployed one, or --model-path (with --thresholds) before the first retrain.
    """
    import psycopg

    from fraudd.scoring import thresholds as thresholds_file
    from fraudd.scoring.deployment import DeploymentError, Registered
    from fraudd.scoring.features import FEATURE_NAMES
    from fraudd.scoring.model import FraudModel, ModelError
    from fraudd.scoring.rules import Rules, RulesError

    from .history import TrainingError
    from .retrain import retrain as run

    command = _command_line("retrain")
    try:
        rules = Rules.load(rules_path)
        model = FraudModel.load(model_path, FEATURE_NAMES)
        review, decline, calibration = model.review_threshold, model.decline_threshold, {}
        if thresholds is not None:
            chosen = thresholds_file.load(thresholds)
            chosen.check_model(model.version, thresholds)
            review, decline, calibration = chosen.review_threshold, chosen.decline_threshold, chosen.calibration
        client = redis.Redis.from_url(redis_url, protocol=2)
        try:
            outcome = run(
                client,
                postgres_url,
                pg_schema,
                Registered(model.version, model_path, review, decline, calibration),
                rules,
                parse_duration(since),
                parse_duration(window),
                margin,
                label_delay if label_features else None,
                models_dir,
                seed,
                actor or getpass.getuser(),
                command,
                _echo_err,
            )
        finally:
            client.close()
    except (ModelError, RulesError, thresholds_file.ThresholdsError, TrainingError, DeploymentError) as exc:
        raise click.ClickException(str(exc)) from None
    except psycopg.Error as exc:
        raise _postgres_failed(exc) from None
    except redis.RedisError as exc:
        raise click.ClickException(f"--redis-url / REDIS_URL: cannot compute features: {exc}") from None
    if outcome.promoted:
        click.echo(f"promoted {outcome.candidate.version} over {outcome.champion.version}: {outcome.reason}; card {outcome.card}")
    else:
        click.echo(
            f"kept {outcome.champion.version}; {outcome.candidate.version} runs in shadow: {outcome.reason}; card {outcome.card}"
        )


@click.group()
def models() -> None:
    """The deployed models: compare champion and challenger, promote or roll back by hand."""


def _change_champion(action: str, version: str, reason: str, actor: str | None, postgres_url: str, pg_schema: str) -> None:
    from fraudd.scoring.deployment import DeploymentError

    from .champion import change_champion

    try:
        generation = change_champion(postgres_url, pg_schema, version, action, actor or getpass.getuser(), reason)
    except DeploymentError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{version} is the champion (deployment {generation}); the scoring workers follow within a second")


_REASON = click.option("--reason", required=True, help="Why, for the audit (model_promotions).")
_ACTOR = click.option("--by", "actor", default=None, help="Who, for the audit [default: the user running it].")


@models.command("promote")
@click.argument("version")
@_REASON
@_ACTOR
@options(POSTGRES_OPTIONS)
def models_promote(version: str, reason: str, actor: str | None, postgres_url: str, pg_schema: str) -> None:
    """Make registered model VERSION decide, with the thresholds calibrated for it (audited)."""
    _change_champion("promote", version, reason, actor, postgres_url, pg_schema)


@models.command("rollback")
@click.argument("version")
@_REASON
@_ACTOR
@options(POSTGRES_OPTIONS)
def models_rollback(version: str, reason: str, actor: str | None, postgres_url: str, pg_schema: str) -> None:
    """Restore VERSION, a model that decided before, as the champion (audited)."""
    _change_champion("rollback", version, reason, actor, postgres_url, pg_schema)


@models.command("report")
@click.option("--since", default="14d", show_default=True, help="Transactions of this last period (event time).")
@options(POSTGRES_OPTIONS)
def models_report(since: str, postgres_url: str, pg_schema: str) -> None:
    """Champion vs challenger (--shadow-model) on the labelled rows: recall and precision at their
    thresholds, alert volume, recall at 1% and 0.1% FPR. Unlabelled transactions count as legitimate."""
    import psycopg

    from .report import compare, format_report

    try:
        compared = compare(postgres_url, pg_schema, parse_duration(since))
    except psycopg.Error as exc:
        raise _postgres_failed(exc) from None
    if compared is None:
        raise click.ClickException(
            f"no transaction of the last {since} was scored by a challenger: run `fraudd run --shadow-model PATH` first"
        )
    click.echo(format_report(*compared, since))


@click.command()
@click.argument("transaction_id")
@click.option("--json", "as_json", is_flag=True, help="Print the stored decision and explanation as JSON.")
@options(POSTGRES_OPTIONS)
def explain(transaction_id: str, as_json: bool, postgres_url: str, pg_schema: str) -> None:
    """Why a stored transaction was decided as it was: each feature's exact contribution (log-odds)
    to the deciding model's score, with the feature's value."""
    import dataclasses

    import orjson
    import psycopg

    from .explanations import format_explanation, stored_decision

    try:
        stored = stored_decision(postgres_url, pg_schema, transaction_id)
    except psycopg.Error as exc:
        raise _postgres_failed(exc) from None
    if stored is None:
        raise click.ClickException(f"no stored transaction {transaction_id!r}")
    if as_json:
        click.echo(orjson.dumps(dataclasses.asdict(stored), option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(format_explanation(stored))


@click.command()
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Candidate ONNX model.",
)
@click.option(
    "--rules",
    "rules_path",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Candidate rules file.",
)
@click.option(
    "--thresholds",
    "thresholds_path",
    default=None,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Thresholds file for the candidate [default: the model's own].",
)
@click.option("--since", default="7d", show_default=True, help="Stored transactions of this last period (event time).")
@options([REDIS_URL, POSTGRES_URL, PG_SCHEMA, STREAM, FRAUD_STREAM, DLQ_STREAM])
def backtest(
    model_path: Path,
    rules_path: Path,
    thresholds_path: Path | None,
    since: str,
    redis_url: str,
    postgres_url: str,
    pg_schema: str,
    stream: str,
    fraud_stream: str,
    dlq_stream: str,
) -> None:
    """Replay stored transactions in time order through a candidate model and rules (scratch keys,
    behaviour recomputed); report the decisions that would change and recall/precision against labels."""
    import psycopg

    from fraudd.keys import Keys
    from fraudd.scoring import thresholds
    from fraudd.scoring.features import FEATURE_NAMES
    from fraudd.scoring.model import FraudModel, ModelError
    from fraudd.scoring.rules import Rules, RulesError

    from . import backtest as replay
    from .history import TrainingError
    from .store import stored_history

    try:
        model, rules = FraudModel.load(model_path, FEATURE_NAMES), Rules.load(rules_path)
        review, decline = model.review_threshold, model.decline_threshold
        if thresholds_path is not None:
            chosen = thresholds.load(thresholds_path)
            chosen.check_model(model.version, thresholds_path)
            review, decline = chosen.review_threshold, chosen.decline_threshold
        stored = stored_history(postgres_url, pg_schema, parse_duration(since))
        client = redis.Redis.from_url(redis_url, protocol=2)
        try:
            result = replay.backtest(
                client, Keys(stream, fraud_stream, dlq_stream), stored, model, rules, review, decline, _echo_err
            )
        finally:
            client.close()
    except (ModelError, RulesError, thresholds.ThresholdsError, TrainingError) as exc:
        raise click.ClickException(str(exc)) from None
    except psycopg.Error as exc:
        raise _postgres_failed(exc) from None
    except redis.RedisError as exc:
        raise click.ClickException(f"--redis-url / REDIS_URL: {exc}") from None
    click.echo(replay.format_backtest(result, since, model, rules))
