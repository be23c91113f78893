"""The console's aiohttp application: the factory, and the middlewares every request passes.

In order: the time spent (``Server-Timing``); security headers on every answer; the session (a
page without one redirects to the sign-in form, anything else answers 401); the CSRF token on every
POST (the session's, sent as the form field ``csrf`` or the ``X-CSRF-Token`` header; the sign-in
form has its own double-submit cookie). Roles are checked per handler (``views.requires``), and a refusal is audited.
"""

from __future__ import annotations

import hmac
import time

from aiohttp import web

from . import audit, rules, sessions, views
from .context import CONSOLE, SESSION_COOKIE, Console, client_address

PUBLIC = ("/login", "/static/", "/favicon.ico")
# Same origin only, no inline script or style: the console's own files are all it loads.
CSP = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"


@web.middleware
async def server_timing(request: web.Request, handler) -> web.StreamResponse:
    """``Server-Timing: app;dur=<ms>`` on every answer: the time spent in the console, for the
    browser's developer tools and ``python -m bench console``."""
    started = time.perf_counter()
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.2f}"
        raise
    response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.2f}"
    return response


@web.middleware
async def security_headers(request: web.Request, handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
    if not request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")
    if isinstance(response, web.HTTPException):
        raise response
    return response


@web.middleware
async def authenticate(request: web.Request, handler) -> web.StreamResponse:
    if request.path.startswith(PUBLIC):
        return await handler(request)
    console = request.app[CONSOLE]
    token = request.cookies.get(SESSION_COOKIE)
    session = await console.db.run(sessions.current, token, console.settings.session_idle) if token else None
    if session is None:
        if request.method == "GET" and "text/html" in request.headers.get("Accept", "text/html"):
            raise web.HTTPSeeOther("/login?expired=1" if token else "/login")
        raise web.HTTPUnauthorized(text="sign in first")
    request["session"] = session
    if request.method == "POST":
        sent = request.headers.get("X-CSRF-Token") or (await request.post()).get("csrf", "")
        if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), session.csrf_token.encode()):
            await console.db.run(
                audit.record, session.user.username, "csrf_refused", None, request.path, None, None, client_address(request)
            )
            return console.render(
                request, "error.html", 403, title="Refused", message="The form was stale or forged: reload the page."
            )
    return await handler(request)


def make_app(console: Console) -> web.Application:
    app = web.Application(middlewares=[server_timing, security_headers, authenticate], client_max_size=256 * 1024)
    app[CONSOLE] = console
    app.router.add_get("/login", views.login_form)
    app.router.add_post("/login", views.login)
    app.router.add_post("/logout", views.logout)
    app.router.add_get("/", views.queue_page)
    app.router.add_get("/queue/table", views.queue_table)
    app.router.add_post("/claim", views.claim_next)
    app.router.add_get("/cases/{transaction_id}", views.case_page)
    app.router.add_post("/cases/{transaction_id}/verdict", views.verdict)
    app.router.add_post("/cases/{transaction_id}/notes", views.note)
    app.router.add_post("/cases/{transaction_id}/claim", views.claim)
    app.router.add_post("/cases/{transaction_id}/release", views.release)
    app.router.add_post("/cases/{transaction_id}/renew", views.renew)
    app.router.add_post("/cases/{transaction_id}/assign", views.assign)
    app.router.add_post("/bulk", views.bulk)
    app.router.add_get("/audit.csv", views.audit_csv)
    app.router.add_get("/users", views.users_page)
    rules.add_routes(app.router)
    app.router.add_static("/static/", views.STATIC)

    async def open_db(app: web.Application) -> None:
        await console.db.open()

    async def close_db(app: web.Application) -> None:
        await console.db.close()
        console.teacher.client.close()

    app.on_startup.append(open_db)
    app.on_cleanup.append(close_db)
    return app
