"""The listening side of fraudd's HTTP services (ingest, console): one socket and one TLS context,
made before the fork and shared by every server process.

The socket is bound once, before any server process starts, and every process accepts on that
same socket: a bad address or a port in use is one clear start-up error, and a server process
that dies leaves no queue of accepted-but-unserved connections behind (with ``SO_REUSEPORT`` each
process has its own accept queue, whose connections are reset when it dies). The kernel wakes
an idle process for each new connection, which spreads the load by itself.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from pathlib import Path

from ..settings import ConfigError

BACKLOG = 1024


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
