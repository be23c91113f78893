"""Running the HTTP API: the listening socket, TLS, signals, and one server per process.

The socket is bound once, before any server process starts, and every process accepts on that
same socket: a bad address or a port in use is one clear start-up error, and a server process
that dies leaves no queue of accepted-but-unserved connections behind (with ``SO_REUSEPORT`` each
process has its own accept queue, whose connections are reset when it dies). The kernel wakes
an idle process for each new connection, which spreads the load by itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
import ssl

import uvloop
from aiohttp import web

from ..config import ConfigError, IngestSettings
from .app import make_app
from .auth import Authenticator

log = logging.getLogger(__name__)

BACKLOG = 1024


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: IngestSettings, authenticator: Authenticator) -> None:
    """Refuse to serve beyond loopback without API keys, unless told ``--insecure-no-auth``."""
    host = settings.listen[0]
    if not authenticator.enabled and not is_loopback(host) and not settings.insecure_no_auth:
        raise ConfigError(f"--listen {host}: refusing to serve beyond loopback without API keys "
                          "(--api-keys-file / FRAUDD_API_KEYS), or pass --insecure-no-auth")
    if settings.require_signature and not authenticator.enabled:
        raise ConfigError("--require-signature needs API keys (--api-keys-file / FRAUDD_API_KEYS): the key signs")


def bind(settings: IngestSettings) -> socket.socket:
    host, port = settings.listen
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--listen {host}:{port}: {exc.strerror}") from None
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def tls_context(settings: IngestSettings) -> ssl.SSLContext | None:
    if settings.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"--tls-cert / --tls-key: {exc}") from None
    return context


def serve(settings: IngestSettings, sock: socket.socket, authenticator: Authenticator, registry=None,
          on_ready=None, should_stop=None) -> None:
    """Serve on ``sock`` until SIGTERM/SIGINT (or ``should_stop()`` turns true), then drain:
    requests in progress get up to ``--shutdown-timeout-s`` to finish."""
    uvloop.run(_serve(settings, sock, authenticator, registry, on_ready, should_stop))


async def _serve(settings: IngestSettings, sock: socket.socket, authenticator: Authenticator, registry,
                 on_ready, should_stop) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, authenticator.reload)
    app = make_app(settings, authenticator, registry)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=settings.client_timeout_s,
                           shutdown_timeout=settings.shutdown_timeout_s, handle_signals=False)
    await runner.setup()
    site = web.SockSite(runner, sock, ssl_context=tls_context(settings), shutdown_timeout=settings.shutdown_timeout_s)
    await site.start()
    log.info("serving", extra={"event": "serving", "listen": f"{settings.listen[0]}:{settings.listen[1]}",
                               "tls": settings.tls_cert is not None, "auth": authenticator.enabled})
    if on_ready is not None:
        on_ready()
    try:
        while not stop.is_set():
            if should_stop is not None and should_stop():
                break
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            except TimeoutError:
                pass
    finally:
        await runner.cleanup()
        log.info("stopped", extra={"event": "stopped"})
