"""``fraudd rules``: import, export, list, diff, test, shadow, publish, roll back and report rule sets,
and edit the live blocklists; every action audited in ``rules_audit`` under ``--actor`` (default: the OS user).
Where the console has users, ``--actor`` must be an active lead or admin among them to publish,
shadow or roll back (``store.authorize``, the rule the console's rules page enforces too).

Its settings (``settings.py``) are PostgreSQL, where the sets live, and Redis, where the published
pointer and the blocklists live per shard of ``--stream``: nothing of another service.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import orjson
import psycopg

from fraudd.keys import BLOCKLIST_KINDS
from fraudd.learning.cli import parse_duration
from fraudd.runtime.redis_clients import connect_redis
from fraudd.schema import connect
from fraudd.scoring.rules import Rules, RulesError, block
from fraudd.settings import options

from . import backtest, diff, pointer, store
from .settings import ACTOR, MINUTES_PER_CASE, OPTIONS, RulesSettings
from .store import RuleSet


@contextmanager
def _database(settings: RulesSettings) -> Iterator[psycopg.Connection]:
    try:
        with connect(settings.postgres.url, settings.postgres.schema, autocommit=True, connect_timeout=5) as conn:
            yield conn
    except (store.RuleSetError, RulesError) as exc:
        raise click.ClickException(str(exc)) from None
    except psycopg.errors.UndefinedTable:
        raise click.ClickException("the rule-set tables are missing: run `fraudd migrate` first") from None


def _point_workers(conn: psycopg.Connection, settings: RulesSettings) -> None:
    """Send the workers of every shard the stored live and shadow versions (after the commit)."""
    client = connect_redis(settings.redis.url, settings.redis.cluster)
    live, shadow, copies = pointer.follow(conn, client, settings.stream, settings.shards)
    click.echo(f"workers of {copies} shard(s) pointed at live {_version(live)}, shadow {_version(shadow)}", err=True)


def _version(rule_set: RuleSet | None) -> str:
    return "-" if rule_set is None else str(rule_set.version)


@click.group()
def rules() -> None:
    """Rule sets as versioned data: write, test, shadow, publish and roll back without a restart."""


@rules.command("import")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--note", default="", help="What this version changes, for the list and the audit.")
@options(OPTIONS, [ACTOR])
def import_(file: Path, note: str, actor: str, **params: Any) -> None:
    """Store FILE (the TOML rule language) as a new draft; prints its version."""
    settings = RulesSettings.from_params(params)
    source = file.read_text()
    with _database(settings) as conn:
        draft = store.import_draft(conn, source, actor, note, where=str(file))
    click.echo(draft.version)


@rules.command("export")
@click.argument("version", type=int)
@options(OPTIONS)
def export(version: int, **params: Any) -> None:
    """Print VERSION in the TOML rule language."""
    settings = RulesSettings.from_params(params)
    with _database(settings) as conn:
        click.echo(store.get(conn, version).source, nl=False)


@rules.command("list")
@options(OPTIONS)
def list_(**params: Any) -> None:
    """Every version, its status, author, who last made it live, and note."""
    settings = RulesSettings.from_params(params)
    with _database(settings) as conn:
        sets, published_by = store.list_sets(conn), store.publishers(conn)
    click.echo(f"{'version':>7}  {'status':8} {'author':16} {'published by':16} {'created (UTC)':19}  {'digest':12}  note")
    for s in sets:
        created = s.created_at.strftime("%Y-%m-%d %H:%M:%S")
        publisher = published_by.get(s.version, "-")[:16]
        click.echo(f"{s.version:>7}  {s.status:8} {s.author[:16]:16} {publisher:16} {created:19}  {s.digest:12}  {s.note}")


@rules.command("diff")
@click.argument("a", type=int)
@click.argument("b", type=int)
@options(OPTIONS)
def diff_(a: int, b: int, **params: Any) -> None:
    """The rules added, removed and changed from version A to B, then the text's unified diff."""
    settings = RulesSettings.from_params(params)
    with _database(settings) as conn:
        left, right = store.get(conn, a), store.get(conn, b)
    for change in diff.rule_changes(left, right):
        click.echo(change)
    sys.stdout.writelines(diff.text_diff(left, right))


@rules.command("test")
@click.argument("candidate")
@click.option("--since", default="30d", show_default=True, help="How far back to evaluate (90d, 12h, 30m, …).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
@options(OPTIONS, [MINUTES_PER_CASE, ACTOR])
def test(candidate: str, since: str, minutes_per_case: float, as_json: bool, actor: str, **params: Any) -> None:
    """Evaluate CANDIDATE (a rules FILE or a stored VERSION) on the stored decisions' feature vectors
    and compare it with what was decided: changes by pair, extra cases per day, recall and precision."""
    settings = RulesSettings.from_params(params)
    since_s = parse_duration(since)
    with _database(settings) as conn:
        if candidate.isdigit() and not Path(candidate).exists():
            stored_version = int(candidate)
            rules_ = store.get(conn, stored_version).rules()
            version: int | None = stored_version
        else:
            version = None
            path = Path(candidate)
            if not path.is_file():
                raise click.BadParameter(f"{candidate!r} is neither a rules file nor a stored version", param_hint="CANDIDATE")
            rules_ = Rules.from_bytes(path.read_bytes(), source=str(path))
        report = backtest.test(settings.postgres.url, settings.postgres.schema, rules_, since_s, minutes_per_case)
        store.audit(conn, actor, "test", version, candidate=candidate, since=since, transactions=report["transactions"])
    _show(report, as_json)


@rules.command("report")
@click.argument("version", type=int)
@click.option("--since", default="30d", show_default=True, help="How far back to look (90d, 12h, 30m, …).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
@options(OPTIONS, [MINUTES_PER_CASE])
def report(version: int, since: str, minutes_per_case: float, as_json: bool, **params: Any) -> None:
    """What VERSION decided in shadow on live traffic, against the live decisions (same report as test)."""
    settings = RulesSettings.from_params(params)
    with _database(settings) as conn:
        store.get(conn, version)
        result = backtest.shadow_report(
            settings.postgres.url, settings.postgres.schema, parse_duration(since), version, minutes_per_case
        )
    _show(result, as_json)


def _show(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(f"candidate {report['candidate']}: {report['transactions']} transactions over {report['days']} day(s)")
    click.echo(f"{'':18}{'live':>10}{'candidate':>12}")
    for decision in report["decisions"]["live"]:
        click.echo(f"{decision:18}{report['decisions']['live'][decision]:>10}{report['decisions']['candidate'][decision]:>12}")
    for measure in ("recall", "precision"):
        if measure in report:
            values = report[measure]
            click.echo(f"{measure:18}{_ratio(values['live']):>10}{_ratio(values['candidate']):>12}")
    click.echo(
        f"extra cases per day: {report['extra_cases_per_day']:+} "
        f"({report['analyst_hours_per_day']:+} analyst hours at {report['minutes_per_case']} min per case)"
    )
    for pair, count in report["changed"].items() or [("(no decision changes)", 0)]:
        samples = ", ".join(report["samples"].get(pair, []))
        click.echo(f"  {pair:18}{count:>10}  e.g. {samples}" if count else f"  {pair}")
    for rule in report.get("top_rules", []):
        precision = "" if rule["precision"] is None else f"  precision {rule['precision']:.1%}"
        click.echo(f"  {rule['rule']:28}{rule['hits']:>10} hits{precision}")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


@rules.command("shadow")
@click.argument("version", type=int, required=False)
@click.option("--stop", is_flag=True, help="Stop the set in shadow instead.")
@options(OPTIONS, [ACTOR])
def shadow(version: int | None, stop: bool, actor: str, **params: Any) -> None:
    """Run VERSION in shadow beside the live set: its would-be decisions are stored, it decides nothing."""
    settings = RulesSettings.from_params(params)
    if stop == (version is not None):
        raise click.UsageError("give a VERSION, or --stop")
    with _database(settings) as conn:
        if version is None:  # --stop
            store.unshadow(conn, actor)
        else:
            store.shadow(conn, version, actor)
        _point_workers(conn, settings)


@rules.command("publish")
@click.argument("version", type=int)
@click.option("--allow-self-approve", is_flag=True, help="Let the draft's author publish it (a one-person team; audited).")
@options(OPTIONS, [ACTOR])
def publish(version: int, allow_self_approve: bool, actor: str, **params: Any) -> None:
    """Make VERSION live on every worker at its next batch; its author may not publish it (maker-checker)."""
    settings = RulesSettings.from_params(params)
    with _database(settings) as conn:
        store.publish(conn, version, actor, allow_self_approve)
        _point_workers(conn, settings)


@rules.command("rollback")
@click.argument("version", type=int)
@options(OPTIONS, [ACTOR])
def rollback(version: int, actor: str, **params: Any) -> None:
    """Make VERSION, live before, live again (a publish of an earlier version)."""
    settings = RulesSettings.from_params(params)
    with _database(settings) as conn:
        store.publish(conn, version, actor, rollback=True)
        _point_workers(conn, settings)


@rules.command("block")
@click.argument("kind", type=click.Choice(BLOCKLIST_KINDS))
@click.argument("value")
@click.option("--reason", required=True, help="Why, as the audit records it.")
@click.option("--remove", is_flag=True, help="Take VALUE off the list instead.")
@options(OPTIONS, [ACTOR])
def block_(kind: str, value: str, reason: str, remove: bool, actor: str, **params: Any) -> None:
    """Put VALUE on (or, with --remove, take it off) the live KIND blocklist of every shard; audited
    with who and why, and whether it was on the list before, as the console audits a block."""
    settings = RulesSettings.from_params(params)
    client = connect_redis(settings.redis.url, settings.redis.cluster)
    with _database(settings) as conn:
        changed = block(client, settings.stream, settings.shards, kind, value, remove)
        store.audit(
            conn,
            actor,
            "unblock" if remove else "block",
            None,
            kind=kind,
            value=value,
            reason=reason,
            before={"blocked": remove == changed},
            after={"blocked": not remove},
        )
