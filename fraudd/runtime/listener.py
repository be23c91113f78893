"""The listening side of fraudd's HTTP services (ingest, console): one socket and one TLS context,
made before the fork and shared by every server process.

The socket is bound once, before any server process starts, and every process accepts on that
same socket: a bad address or a port in use is one clear start-up error, and a server process
that dies leaves no queue of accepted-but-unserved connections behind (with ``SO_REUSEPORT`` each
process has its own accept queue, whose connections are reset when it dies). The kernel wakes
an idle process for each new connection, which spreads the load by itself.

Each server process runs ``serve_in_process``, whose ``serve`` accepts on that socket with the
service's aiohttp runner until the supervisor stops it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web

from ..settings import ConfigError
from .process import WorkerProcess

BACKLOG = 1024

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(listen: tuple[str, int], flag: str = "--listen") -> socket.socket:
    host, port = listen
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{flag} {host}:{port}: {exc.strerror}") from None
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """A server context for ``cert``/``key`` (TLS 1.2 at least); None without a certificate."""
    if cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"--tls-cert / --tls-key: {exc}") from None
    return context


def serve_in_process(process: WorkerProcess, serve: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """The body of a forked server process: its signal handlers, then ``serve()`` on uvloop; the
    process's exit code."""
    process.install_signals()
    uvloop.run(serve())
    return 0


async def serve(
    process: WorkerProcess,
    runner: web.BaseRunner,
    sock: socket.socket,
    context: ssl.SSLContext | None,
    listen: tuple[str, int],
    shutdown_timeout_s: float,
    reload: Callable[[], object] = lambda: None,
    finish: Callable[[], Awaitable[object]] | None = None,
    **logged: object,
) -> None:
    """Serve ``runner`` on the shared socket until told to stop (or orphaned), then drain: requests
    in progress get ``shutdown_timeout_s`` to finish, and ``finish`` runs after them.

    The loop turns at least every half second, the watchdog's sign of life; SIGHUP calls ``reload``
    and reports ready again. ``logged``: what the service adds to its ``serving`` line.
    """
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    process.wake_on_signal(lambda: loop.call_soon_threadsafe(wake.set))
    await runner.setup()
    site = web.SockSite(runner, sock, ssl_context=context, shutdown_timeout=shutdown_timeout_s)
    await site.start()
    process.ready()
    log.info("serving", extra={"event": "serving", "listen": f"{listen[0]}:{listen[1]}", "tls": context is not None, **logged})
    try:
        while process.running:
            process.heartbeat()
            if process.reload_requested:
                process.reload_requested = False
                reload()
                process.ready()
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), timeout=0.5)
            except TimeoutError:
                pass
    finally:
        await runner.cleanup()
        if finish is not None:
            await finish()
        log.info("stopped", extra={"event": "stopped"})
