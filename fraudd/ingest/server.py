"""Running the HTTP API: one server per process on the shared socket (``runtime.listener``:
bound once before the fork, TLS included, and the serving loop every server process runs).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl

from aiohttp import web, web_protocol, web_response

from ..runtime.listener import bind, is_loopback, serve, serve_in_process, tls_context
from ..runtime.metrics import multiprocess_registry
from ..runtime.process import WorkerProcess
from ..runtime.supervisor import Service
from ..settings import ConfigError
from .app import make_app
from .auth import Authenticator
from .settings import IngestSettings

log = logging.getLogger(__name__)

# What every response's Server header says. aiohttp's own names it and the Python version (a
# scanner's first clue), also on the responses it makes itself, e.g. to a malformed request.
SERVER_NAME = "fraudd"


def check_exposure(settings: IngestSettings, authenticator: Authenticator) -> None:
    """Refuse to serve beyond loopback without API keys, unless told ``--insecure-no-auth`` (a
    reload never turns keys off: ``Authenticator.reload``)."""
    host = settings.listen[0]
    if not authenticator.enabled and not is_loopback(host) and not settings.insecure_no_auth:
        raise ConfigError(
            f"--listen {host}: refusing to serve beyond loopback without API keys "
            "(--api-keys-file / FRAUDD_API_KEYS), or pass --insecure-no-auth"
        )


def service(settings: IngestSettings, authenticator: Authenticator) -> Service:
    """``fraudd ingest``: the supervisor's view of the HTTP server processes.

    Binds the socket and builds the TLS context here, before the fork, so both are shared and a
    bad address or certificate stops start-up with one line. Trimming the input stream is the
    consuming side's (``fraudd run``), whoever writes it. The supervisor re-reads the API keys on
    SIGHUP too: a server process it respawns starts with the keys in use, not those of start-up.
    """
    sock = bind(settings.listen)
    context = tls_context(settings.tls_cert, settings.tls_key)
    return Service(
        name="fraudd ingest",
        workers=settings.workers,
        run_worker=lambda process: serve_in_process(process, lambda: _serve(settings, sock, context, authenticator, process)),
        worker_name=lambda index: f"ingest-{index}",
        shutdown_timeout_s=settings.shutdown_timeout_s,
        log_level=settings.log_level,
        reload=authenticator.reload,
    )


class CappedServer(web.Server):
    """aiohttp's low-level server with at most ``max_connections`` open connections: one more is
    closed as soon as it is accepted, so open files and memory stay bounded whatever clients do
    (an idle keep-alive connection holds both until ``--client-timeout-s``). The kernel's backlog
    holds connections not yet accepted, and another server process may take them."""

    def __init__(self, handler, max_connections: int, **kwargs) -> None:
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections
        self._refusing = False

    def connection_made(self, handler: web_protocol.RequestHandler, transport: asyncio.Transport) -> None:
        if len(self._connections) >= self.max_connections:
            transport.close()  # its RequestHandler sees the connection lost and ends
            if not self._refusing:
                log.warning(
                    "connection cap reached, closing new connections",
                    extra={"event": "connection_cap", "max_connections": self.max_connections},
                )
            self._refusing = True
            return
        self._refusing = False
        super().connection_made(handler, transport)


async def _serve(
    settings: IngestSettings,
    sock: socket.socket,
    context: ssl.SSLContext | None,
    authenticator: Authenticator,
    process: WorkerProcess,
) -> None:
    """Serve until told to stop (or orphaned), then drain: requests in progress get up to
    ``--shutdown-timeout-s`` to finish, then the writes they queued are flushed. SIGHUP re-reads
    the API keys."""
    registry = multiprocess_registry() if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else None
    app = make_app(settings, authenticator, registry)
    ingest = app.ingest
    await ingest.start()
    web_response.SERVER_SOFTWARE = SERVER_NAME
    server = CappedServer(app, settings.max_connections, access_log=None, keepalive_timeout=settings.client_timeout_s)
    runner = web.ServerRunner(server, shutdown_timeout=settings.shutdown_timeout_s, handle_signals=False)
    await serve(
        process,
        runner,
        sock,
        context,
        settings.listen,
        settings.shutdown_timeout_s,
        reload=authenticator.reload,
        finish=ingest.stop,
        auth=authenticator.enabled,
    )
