"""The console's users page (admins only)."""

from __future__ import annotations

from aiohttp import web

from .. import __version__
from . import users
from .context import CONSOLE
from .views import requires


@requires("admin")
async def users_page(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    return console.render(request, "users.html", users=await console.db.run(users.all_users), version=__version__)
