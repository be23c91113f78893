"""What the console's handlers and middlewares share: the ``Console`` kept on the application,
its cookies, and the templates with their filters."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import jinja2
from aiohttp import web

from .db import Database
from .settings import ConsoleSettings
from .verdicts import Teacher

SESSION_COOKIE = "fraudd_session"
LOGIN_CSRF_COOKIE = "fraudd_login_csrf"


@dataclass(frozen=True, slots=True)
class Console:
    """What handlers share, kept on the application as ``app[CONSOLE]``."""

    settings: ConsoleSettings
    db: Database
    teacher: Teacher
    templates: jinja2.Environment
    rule_reasons: dict[str, str]  # rule code -> its reason, for the codes stored in a case's reasons

    @property
    def secure_cookies(self) -> bool:
        return self.settings.tls_cert is not None

    def render(self, request: web.Request, name: str, status: int = 200, **context: object) -> web.Response:
        session = request.get("session")
        text = self.templates.get_template(name).render(
            session=session, csrf=session.csrf_token if session else "", path=request.path, **context
        )
        return web.Response(text=text, status=status, content_type="text/html")


CONSOLE = web.AppKey("console", Console)


def client_address(request: web.Request) -> str | None:
    return request.remote


def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fraudd.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["duration"] = duration
    env.filters["age"] = lambda at: duration(datetime.now(UTC) - at)
    env.filters["urlencode"] = lambda text: quote(str(text), safe="")
    return env


def duration(span: timedelta) -> str:
    """A span as an analyst reads it: "45 s", "12 min", "3 h 05 min", "2 d 4 h"."""
    seconds = max(int(span.total_seconds()), 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"
