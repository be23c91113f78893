"""The console's SLA page: every user reads each queue's SLA there; leads and admins change it."""

from __future__ import annotations

from aiohttp import web

from . import sla
from .context import CONSOLE, client_address
from .views import requires

MESSAGES = {"changed": "SLA changed: the queue is re-ranked and counted against it."}


async def sla_page(request: web.Request) -> web.Response:
    return await _render(request, MESSAGES.get(request.query.get("done", ""), ""))


@requires("lead")
async def change_sla(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = await request.post()
    try:
        chosen = sla.parse_minutes(str(form.get("minutes", "")))
        await console.db.run(
            sla.change,
            str(form.get("decision", "")),
            chosen,
            console.settings.sla,
            request["session"].user.username,
            client_address(request),
        )
    except sla.SlaError as exc:
        return await _render(request, str(exc), 400)
    raise web.HTTPSeeOther("/sla?done=changed")


async def _render(request: web.Request, message: str, status: int = 200) -> web.Response:
    console = request.app[CONSOLE]
    queues = await console.db.run(sla.queues, console.settings.sla)
    return console.render(
        request, "sla.html", status, queues=queues, default=console.settings.sla, max_minutes=sla.MAX_MINUTES, message=message
    )
