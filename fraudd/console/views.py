"""The console's handlers: each reads its input, calls one SQL function (or ``verdicts``) through
the pool, and renders or redirects. Validation of the queue's filters lives in ``QueueFilter``."""

from __future__ import annotations

import functools
import hmac
import secrets
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote, urlencode

from aiohttp import web

from . import audit, cases, metrics, queue, sessions, sla, users, verdicts
from .context import CONSOLE, LOGIN_CSRF_COOKIE, SESSION_COOKIE, Console, client_address
from .passwords import verify_password
from .queue import FilterError, QueueFilter

STATIC = Path(__file__).with_name("static")
THROTTLE_WINDOW = timedelta(minutes=15)
MAX_NOTE = 4000
MAX_BULK = 500
MESSAGES = {
    "verdict": "Verdict recorded.",
    "bulk": "Bulk verdict recorded.",
    "released": "Case released to the queue.",
    "empty": "No case to claim in this queue.",
    "assigned": "Case reassigned.",
}


def requires(role: str):
    """Refuse (403, audited) a user whose role is weaker than ``role``, whatever the URL they typed."""

    def decorate(handler):
        @functools.wraps(handler)
        async def checked(request: web.Request) -> web.StreamResponse:
            session = request["session"]
            if not session.user.may(role):
                console = request.app[CONSOLE]
                await console.db.run(
                    audit.record,
                    session.user.username,
                    "forbidden",
                    request.match_info.get("transaction_id"),
                    f"{request.method} {request.path}",
                    {"role": session.user.role},
                    {"needs": role},
                    client_address(request),
                )
                return console.render(request, "error.html", 403, title="Forbidden", message=f"This needs the {role} role.")
            return await handler(request)

        return checked

    return decorate


def _cookie(response: web.StreamResponse, console: Console, name: str, value: str, path: str = "/") -> None:
    response.set_cookie(name, value, path=path, httponly=True, samesite="Strict", secure=console.secure_cookies)


# -- signing in ----------------------------------------------------------------------------


async def login_form(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    token = secrets.token_urlsafe(24)
    message = "Your session expired: sign in again." if request.query.get("expired") else ""
    response = console.render(request, "login.html", login_csrf=token, message=message, username="")
    _cookie(response, console, LOGIN_CSRF_COOKIE, token, path="/login")
    return response


async def login(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = await request.post()
    username, password = str(form.get("username", ""))[:64], str(form.get("password", ""))
    sent, expected = str(form.get("csrf", "")), request.cookies.get(LOGIN_CSRF_COOKIE, "")
    address = client_address(request)
    if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        await console.db.run(audit.record, username or "-", "csrf_refused", None, "/login", None, None, address)
        return console.render(
            request, "error.html", 403, title="Refused", message="The form was stale or forged: reload the page."
        )

    def check(conn) -> str | None:
        if audit.failed_logins(conn, username, THROTTLE_WINDOW) >= console.settings.login_attempts:
            audit.record(conn, username, "login_throttled", subject=username, address=address)
            return "Too many failed sign-ins: try again in 15 minutes."
        found = users.password_hash(conn, username)
        if not verify_password(password, found[1] if found else None) or found is None or found[0].disabled:
            audit.record(conn, username, "login_failed", subject=username, address=address)
            return "Wrong username or password."
        audit.record(conn, username, "login", subject=username, address=address)
        return None

    refused = await console.db.run(check)
    if refused:
        response = console.render(request, "login.html", 401, login_csrf=expected, message=refused, username=username)
        return response
    token = await console.db.run(sessions.create, username)
    response = web.HTTPSeeOther("/")
    _cookie(response, console, SESSION_COOKIE, token)
    response.del_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    session = request["session"]

    def end(conn) -> None:
        sessions.end(conn, request.cookies[SESSION_COOKIE])
        audit.record(conn, session.user.username, "logout", subject=session.user.username, address=client_address(request))

    await console.db.run(end)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(SESSION_COOKIE)
    return response


# -- the queue -----------------------------------------------------------------------------


def _filter(request: web.Request) -> QueueFilter:
    try:
        return QueueFilter.parse(dict(request.query))
    except FilterError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None


async def _queue_context(request: web.Request) -> dict:
    console = request.app[CONSOLE]
    chosen = _filter(request)

    def read(conn) -> tuple[list[dict], dict, timedelta]:
        queue_sla = sla.current(conn, console.settings.sla)[chosen.decision]
        return queue.listing(conn, chosen, queue_sla), queue.counts(conn, chosen.decision), queue_sla

    rows, counts, queue_sla = await console.db.run(read)
    return {
        "rows": rows,
        "counts": counts,
        "filter": chosen,
        "urlencode": urlencode,
        "sla": queue_sla,
        "page_size": queue.PAGE,
    }


async def queue_page(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    context = await _queue_context(request)
    return console.render(request, "queue.html", message=MESSAGES.get(request.query.get("done", ""), ""), **context)


async def queue_table(request: web.Request) -> web.Response:
    """The queue's table and counts alone: what the page polls for to show new cases without a reload."""
    console = request.app[CONSOLE]
    return console.render(request, "queue_table.html", **(await _queue_context(request)))


async def claim_next(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    user = request["session"].user
    form = await request.post()
    decision = str(form.get("decision", "review"))
    if decision not in queue.DECISIONS:
        raise web.HTTPBadRequest(text="decision must be review or decline")

    def claim(conn) -> str | None:
        queue_sla = sla.current(conn, console.settings.sla)[decision]
        claimed = queue.claim_next(conn, user.username, decision, queue_sla, console.settings.lease)
        if claimed:
            audit.record(
                conn, user.username, "claim", claimed, after={"assignee": user.username}, address=client_address(request)
            )
        return claimed

    claimed = await console.db.run(claim)
    if claimed is None:
        raise web.HTTPSeeOther("/?" + urlencode({"decision": decision, "done": "empty"}))
    raise web.HTTPSeeOther(_case_url(claimed))


def _case_url(transaction_id: str, suffix: str = "") -> str:
    return f"/cases/{quote(transaction_id, safe='')}{suffix}"


# -- a case --------------------------------------------------------------------------------


async def case_page(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    transaction_id = request.match_info["transaction_id"]
    user = request["session"].user

    def read(conn):
        if _holds(conn, transaction_id, user.username):  # reading one's own case is working on it: the lease is renewed
            queue.claim(conn, transaction_id, user.username, console.settings.lease)
        return (
            cases.case_file(conn, transaction_id),
            audit.for_case(conn, transaction_id),
            sla.current(conn, console.settings.sla),
        )

    found, history, slas = await console.db.run(read)
    if found is None:
        return console.render(request, "error.html", 404, title="Not found", message=f"No case {transaction_id}.")
    return console.render(
        request,
        "case.html",
        file=found,
        history=history,
        rules=console.rule_reasons,
        message=request.query.get("error", ""),
        typologies=cases.TYPOLOGIES,
        verdict_names=cases.VERDICTS,
        blockable=verdicts.BLOCKABLE,
        sla=slas[found.case["decision"]],
    )


def _holds(conn, transaction_id: str, username: str) -> bool:
    row = conn.execute("SELECT assignee FROM cases WHERE transaction_id = %s AND state = 'claimed'", (transaction_id,)).fetchone()
    return row is not None and row[0] == username


async def verdict(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    user = request["session"].user
    transaction_id = request.match_info["transaction_id"]
    form = await request.post()
    given = str(form.get("verdict", ""))
    typology = str(form.get("typology", ""))
    note = str(form.get("note", "")).strip()[:MAX_NOTE]
    blocks = tuple(kind for kind in form.getall("block", []) if kind in verdicts.BLOCKABLE)
    if given not in cases.VERDICTS or typology not in cases.TYPOLOGIES:
        raise web.HTTPBadRequest(text="verdict must be fraud or legit, with a known typology")
    try:
        resolved = await console.db.run(
            verdicts.give, console.teacher, transaction_id, user.username, given, typology, note, blocks, client_address(request)
        )
    except cases.VerdictRefused as exc:
        raise web.HTTPSeeOther(_case_url(transaction_id, "?" + urlencode({"error": str(exc)}))) from None
    metrics.verdicts.labels(user.username, given).inc()
    metrics.time_to_verdict.labels(user.username).observe(resolved.time_to_verdict_s)
    raise web.HTTPSeeOther("/?done=verdict")


async def note(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    user = request["session"].user
    transaction_id = request.match_info["transaction_id"]
    body = str((await request.post()).get("note", "")).strip()[:MAX_NOTE]
    if not body:
        raise web.HTTPSeeOther(_case_url(transaction_id, "?" + urlencode({"error": "A note needs some text."})))

    def add(conn) -> None:
        cases.add_note(conn, transaction_id, user.username, body)
        audit.record(conn, user.username, "note", transaction_id, after={"body": body}, address=client_address(request))

    await console.db.run(add)
    raise web.HTTPSeeOther(_case_url(transaction_id, "#notes"))


async def claim(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    user = request["session"].user
    transaction_id = request.match_info["transaction_id"]

    def take(conn) -> str | None:
        before = queue.claim(conn, transaction_id, user.username, console.settings.lease)
        if before is not None and before != user.username:
            audit.record(
                conn,
                user.username,
                "claim",
                transaction_id,
                before={"assignee": before or None},
                after={"assignee": user.username},
                address=client_address(request),
            )
        return before

    if await console.db.run(take) is None:
        raise web.HTTPSeeOther(
            _case_url(transaction_id, "?" + urlencode({"error": "Someone else holds this case, or it is resolved."}))
        )
    raise web.HTTPSeeOther(_case_url(transaction_id))


async def release(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    user = request["session"].user
    transaction_id = request.match_info["transaction_id"]

    def give_back(conn) -> bool:
        released = queue.release(conn, transaction_id, user.username)
        if released:
            audit.record(
                conn,
                user.username,
                "release",
                transaction_id,
                before={"assignee": user.username},
                after={"assignee": None},
                address=client_address(request),
            )
        return released

    await console.db.run(give_back)
    raise web.HTTPSeeOther("/?done=released")


async def renew(request: web.Request) -> web.Response:
    """The case page's heartbeat while its analyst works (keys, clicks): keeps their lease."""
    console = request.app[CONSOLE]
    user = request["session"].user
    transaction_id = request.match_info["transaction_id"]

    def extend(conn) -> bool:
        return (
            _holds(conn, transaction_id, user.username)
            and queue.claim(conn, transaction_id, user.username, console.settings.lease) is not None
        )

    return web.json_response({"held": await console.db.run(extend)})


@requires("lead")
async def assign(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    user = request["session"].user
    transaction_id = request.match_info["transaction_id"]
    assignee = str((await request.post()).get("assignee", ""))

    def reassign(conn) -> str | None:
        found = users.password_hash(conn, assignee)
        if found is None or found[0].disabled:
            return None
        before = queue.claim(conn, transaction_id, assignee, console.settings.lease, override=True)
        if before is not None:
            audit.record(
                conn,
                user.username,
                "reassign",
                transaction_id,
                before={"assignee": before or None},
                after={"assignee": assignee},
                address=client_address(request),
            )
        return before

    if await console.db.run(reassign) is None:
        raise web.HTTPSeeOther(_case_url(transaction_id, "?" + urlencode({"error": f"Cannot assign to {assignee}."})))
    raise web.HTTPSeeOther(_case_url(transaction_id))


@requires("lead")
async def bulk(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    user = request["session"].user
    form = await request.post()
    ids = [str(i) for i in form.getall("transaction_id", [])][:MAX_BULK]
    if form.get("confirm") != "yes" or not ids:
        raise web.HTTPBadRequest(text="select cases and confirm the bulk verdict")
    resolved = await console.db.run(verdicts.give_bulk, console.teacher, ids, user.username, client_address(request))
    for done in resolved:
        metrics.verdicts.labels(user.username, "legit").inc()
        metrics.time_to_verdict.labels(user.username).observe(done.time_to_verdict_s)
    raise web.HTTPSeeOther("/?done=bulk")


@requires("lead")
async def audit_csv(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    text = await console.db.run(lambda conn: "".join(audit.export_csv(conn)))
    return web.Response(
        text=text, content_type="text/csv", headers={"Content-Disposition": 'attachment; filename="fraudd-audit.csv"'}
    )
