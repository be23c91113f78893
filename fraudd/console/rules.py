"""The console's rules page: rule-set versions listed and read, drafts written with validation as
one types, diffs, backtests, shadow, publish and rollback.

Each handler does what the matching ``fraudd rules`` command does, through the same functions: the
SQL in ``rulesets.store`` (its one home), the parser in ``store.validate``, ``rulesets.diff``,
``rulesets.backtest.test`` and ``rulesets.pointer.follow``. Who acts is the signed-in user: a change
of what is live needs the lead role here (``views.requires``, 403 and audited) and passes
``store.authorize`` and the maker-checker of ``store.publish`` as from the command line.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import click
import psycopg
from aiohttp import web

from ..learning.cli import parse_duration
from ..rulesets import backtest, diff, pointer, store
from ..rulesets.settings import MINUTES_PER_CASE
from ..scoring.rules import ACTION_NAMES, Rules, RulesError
from .context import CONSOLE, Console
from .views import requires

MAX_SOURCE = 200_000  # characters of rules text: far above any real set, below the request size limit
MAX_NOTE = 500
DEFAULT_SINCE = "30d"
BUSY_RETRY_S = 30  # told to one who asks for a backtest while another runs
DRAFT = "draft"  # how a typed draft is named in a validation message, where an import names its file
MESSAGES = {
    "draft": "Draft saved.",
    "shadow": "Running in shadow beside the live set.",
    "unshadow": "Shadow run stopped.",
    "publish": "Published: every worker decides its next batch with it.",
    "rollback": "Rolled back: every worker decides its next batch with it.",
}


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/rules", rules_page)
    router.add_get("/rules/new", draft_form)
    router.add_post("/rules/new", create_draft)
    router.add_post("/rules/validate", validate)
    router.add_get("/rules/diff", diff_page)
    router.add_post("/rules/shadow/stop", stop_shadow)
    router.add_get(r"/rules/{version:\d+}", version_page)
    router.add_post(r"/rules/{version:\d+}/test", run_test)
    router.add_post(r"/rules/{version:\d+}/shadow", shadow)
    router.add_post(r"/rules/{version:\d+}/publish", publish)
    router.add_post(r"/rules/{version:\d+}/rollback", rollback)


def _version(request: web.Request) -> int:
    return int(request.match_info["version"])


def _not_found(request: web.Request, message: str) -> web.Response:
    return request.app[CONSOLE].render(request, "error.html", 404, title="Not found", message=message)


# -- reading -------------------------------------------------------------------------------


async def rules_page(request: web.Request) -> web.Response:
    """Every version with its state, author and who made it live."""
    console = request.app[CONSOLE]

    def read(conn: psycopg.Connection) -> tuple[list[store.RuleSet], dict[int, str]]:
        return store.list_sets(conn), store.publishers(conn)

    sets, published_by = await console.db.run(read)
    return console.render(
        request,
        "rules.html",
        sets=list(reversed(sets)),
        published_by=published_by,
        message=MESSAGES.get(request.query.get("done", ""), ""),
    )


async def version_page(request: web.Request) -> web.Response:
    return await _show_version(request, _version(request))


async def _show_version(
    request: web.Request, version: int, status: int = 200, report: dict[str, Any] | None = None, since: str = DEFAULT_SINCE
) -> web.Response:
    console = request.app[CONSOLE]

    def read(conn: psycopg.Connection):
        return store.get(conn, version), store.history(conn, version), store.list_sets(conn), store.was_live(conn, version)

    try:
        rule_set, history, sets, was_live = await console.db.run(read)
    except store.RuleSetError as exc:
        return _not_found(request, str(exc))
    return console.render(
        request,
        "rules_version.html",
        status,
        rule_set=rule_set,
        rules=rule_set.rules().rules,
        action_names=ACTION_NAMES,
        history=history,
        others=[s for s in sets if s.version != version],
        live=next((s for s in sets if s.status == "live"), None),
        was_live=was_live,
        report=report,
        since=since,
        minutes_per_case=MINUTES_PER_CASE.default,
        message=MESSAGES.get(request.query.get("done", ""), ""),
    )


async def diff_page(request: web.Request) -> web.Response:
    """``fraudd rules diff A B``: the rules added, removed and changed, then the text's diff."""
    console = request.app[CONSOLE]
    try:
        a, b = int(request.query["a"]), int(request.query["b"])
    except (KeyError, ValueError):
        raise web.HTTPBadRequest(text="compare two versions: ?a=VERSION&b=VERSION") from None
    try:
        left, right = await console.db.run(lambda conn: (store.get(conn, a), store.get(conn, b)))
    except store.RuleSetError as exc:
        return _not_found(request, str(exc))
    return console.render(
        request,
        "rules_diff.html",
        left=left,
        right=right,
        changes=diff.rule_changes(left, right),
        lines=diff.text_diff(left, right),
        message="",
    )


# -- drafts --------------------------------------------------------------------------------


async def draft_form(request: web.Request) -> web.Response:
    """A draft to edit: a copy of ``?from=VERSION``, else of the live set, else of the rules file."""
    console = request.app[CONSOLE]
    wanted = request.query.get("from", "")

    def source(conn: psycopg.Connection) -> str | None:
        if wanted.isdigit():
            return store.get(conn, int(wanted)).source
        live, _ = store.current(conn)
        return None if live is None else live.source

    try:
        text = await console.db.run(source)
    except store.RuleSetError as exc:
        return _not_found(request, str(exc))
    if text is None:
        text = console.settings.rules_path.read_text()
    return _draft(request, console, text, "", "")


def _draft(request: web.Request, console: Console, source: str, note: str, error: str, status: int = 200) -> web.Response:
    return console.render(request, "rules_edit.html", status, source=source, note=note, error=error, message="")


def parse(source: str) -> Rules:
    """The rules of a typed draft, or RulesError saying why it cannot be one (naming the rule)."""
    if len(source) > MAX_SOURCE:
        raise RulesError(f"{DRAFT}: longer than {MAX_SOURCE} characters")
    return store.validate(source, DRAFT)


async def validate(request: web.Request) -> web.Response:
    """The editor's check as one types (``static/rules.js``): ``{"ok", "message", "rules"}``."""
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="send a JSON object with the rules text as 'source'") from None
    source = body.get("source") if isinstance(body, dict) else None
    if not isinstance(source, str):
        raise web.HTTPBadRequest(text="send a JSON object with the rules text as 'source'")
    try:
        count = len(parse(source).rules)
    except RulesError as exc:
        return web.json_response({"ok": False, "message": str(exc)})
    return web.json_response({"ok": True, "message": f"Valid: {count} rules.", "rules": count})


async def create_draft(request: web.Request) -> web.StreamResponse:
    """Store the typed text as a new draft by the signed-in user (audited ``import``), as ``fraudd rules import`` does."""
    console = request.app[CONSOLE]
    user = request["session"].user
    form = await request.post()
    source = str(form.get("source", "")).replace("\r\n", "\n")
    note = str(form.get("note", "")).strip()[:MAX_NOTE]
    try:
        parse(source)
    except RulesError as exc:
        return _draft(request, console, source, note, str(exc), 400)
    draft = await console.db.run(store.import_draft, source, user.username, note, DRAFT)
    raise web.HTTPSeeOther(f"/rules/{draft.version}?done=draft")


# -- testing -------------------------------------------------------------------------------


async def run_test(request: web.Request) -> web.Response:
    """``fraudd rules test VERSION --since …``: the version on the stored feature vectors (audited
    ``test``), one at a time for the whole console (``backtest.turn``): another asked for meanwhile
    is answered 503, to be tried again."""
    console = request.app[CONSOLE]
    user = request["session"].user
    version = _version(request)
    form = await request.post()
    since = str(form.get("since", DEFAULT_SINCE)).strip()
    try:
        since_s = parse_duration(since)
        minutes_per_case = float(str(form.get("minutes_per_case", MINUTES_PER_CASE.default)))
    except (click.BadParameter, ValueError) as exc:
        raise web.HTTPBadRequest(text=f"since is a duration (90d, 12h, 30m) and minutes per case a number: {exc}") from None
    if not minutes_per_case > 0:
        raise web.HTTPBadRequest(text="minutes per case must be above 0")
    try:
        rule_set = await console.db.run(store.get, version)
    except store.RuleSetError as exc:
        return _not_found(request, str(exc))
    postgres = console.settings.postgres

    def test_alone() -> dict[str, Any]:
        with backtest.turn(postgres.url, postgres.schema):
            return backtest.test(postgres.url, postgres.schema, rule_set.rules(), since_s, minutes_per_case)

    try:
        report = await asyncio.to_thread(test_alone)
    except backtest.Busy as exc:
        busy = console.render(request, "error.html", 503, title="Busy", message=str(exc))
        busy.headers["Retry-After"] = str(BUSY_RETRY_S)
        return busy
    await console.db.run(
        lambda conn: store.audit(
            conn, user.username, "test", version, candidate=str(version), since=since, transactions=report["transactions"]
        )
    )
    return await _show_version(request, version, report=report, since=since)


# -- changing what is live -----------------------------------------------------------------


async def _change(
    request: web.Request, action: str, change: Callable[[psycopg.Connection, str], object], back: str
) -> web.StreamResponse:
    """Run ``change`` as the signed-in user, then point the workers at the stored sets (after the
    commit, as ``fraudd rules`` does). A refusal (``store.Refused``: audited by the store) answers
    403, any other reason the action cannot be taken 409."""
    console = request.app[CONSOLE]
    username = request["session"].user.username

    def attempt(conn: psycopg.Connection) -> store.RuleSetError | None:
        try:
            change(conn, username)
        except store.RuleSetError as exc:
            return exc
        return None

    refused = await console.db.run(attempt)
    if refused is not None:
        status = 403 if isinstance(refused, store.Refused) else 409
        return console.render(request, "error.html", status, title="Refused", message=str(refused))
    teacher = console.teacher
    await console.db.run(pointer.follow, teacher.client, teacher.stream, teacher.shards)
    raise web.HTTPSeeOther(f"{back}?{urlencode({'done': action})}")


@requires("lead")
async def publish(request: web.Request) -> web.StreamResponse:
    """``fraudd rules publish``; its author may publish it only when they tick the self-approval box (audited)."""
    version = _version(request)
    allow_self_approve = (await request.post()).get("allow_self_approve") == "yes"
    return await _change(
        request,
        "publish",
        lambda conn, username: store.publish(conn, version, username, allow_self_approve),
        f"/rules/{version}",
    )


@requires("lead")
async def rollback(request: web.Request) -> web.StreamResponse:
    version = _version(request)
    return await _change(
        request, "rollback", lambda conn, username: store.publish(conn, version, username, rollback=True), f"/rules/{version}"
    )


@requires("lead")
async def shadow(request: web.Request) -> web.StreamResponse:
    version = _version(request)
    return await _change(request, "shadow", lambda conn, username: store.shadow(conn, version, username), f"/rules/{version}")


@requires("lead")
async def stop_shadow(request: web.Request) -> web.StreamResponse:
    return await _change(request, "unshadow", store.unshadow, "/rules")
