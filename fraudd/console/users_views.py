"""The console's users page (admins only): the users, adding one, disabling, enabling, their role.

Each change is one of ``users``' functions, the ones ``fraudd users`` calls, so both are audited
alike and neither can leave the console without an active admin. A new user's password is typed
twice in the form, sent in the POST's body only, and hashed off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from . import users
from .context import CONSOLE, client_address
from .passwords import PasswordError, hash_password
from .views import requires

MESSAGES = {
    "added": "User added.",
    "disable": "User disabled: their sessions ended.",
    "enable": "User enabled.",
    "role": "Role changed: their sessions ended.",
}


@requires("admin")
async def users_page(request: web.Request) -> web.Response:
    return await _render(request, MESSAGES.get(request.query.get("done", ""), ""))


@requires("admin")
async def add_user(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = await request.post()
    username, role = str(form.get("username", "")).strip()[:64], str(form.get("role", ""))
    password = str(form.get("password", ""))
    if password != str(form.get("password_again", "")):
        return await _render(request, "The two passwords differ.", 400, username=username, role=role)
    try:
        hashed = await asyncio.to_thread(hash_password, password)
        await console.db.run(users.add, request["session"].user.username, username, role, hashed, client_address(request))
    except (PasswordError, users.UserError) as exc:
        return await _render(request, f"Not added: {exc}.", 400, username=username, role=role)
    raise web.HTTPSeeOther("/users?done=added")


@requires("admin")
async def change_user(request: web.Request) -> web.StreamResponse:
    """Disable, enable or set the role of the user in the URL (the form's ``action``)."""
    console = request.app[CONSOLE]
    form = await request.post()
    username, action = request.match_info["username"], str(form.get("action", ""))
    changes: dict[str, tuple[Callable[..., None], tuple[str, ...]]] = {
        "disable": (users.disable, (username,)),
        "enable": (users.enable, (username,)),
        "role": (users.set_role, (username, str(form.get("role", "")))),
    }
    if action not in changes:
        raise web.HTTPBadRequest(text="action must be disable, enable or role")
    change, args = changes[action]
    try:
        await console.db.run(change, request["session"].user.username, *args, client_address(request))
    except users.UserError as exc:
        return await _render(request, f"Not changed: {exc}.", 409)
    raise web.HTTPSeeOther(f"/users?done={action}")


async def _render(
    request: web.Request, message: str, status: int = 200, username: str = "", role: str = "analyst"
) -> web.Response:
    """The page, with the add form holding what was typed (never the password) after a refusal."""
    console = request.app[CONSOLE]
    return console.render(
        request,
        "users.html",
        status,
        users=await console.db.run(users.all_users),
        roles=users.ROLES,
        message=message,
        new_username=username,
        new_role=role,
    )
