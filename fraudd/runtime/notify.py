"""The service manager's notification protocol (sd_notify), spoken by every supervisor.

Under systemd with ``Type=notify`` the supervisor says when it is ready, reloading or stopping,
keeps a one-line ``STATUS=`` current, and pings the watchdog. The protocol is one datagram per
message on the AF_UNIX socket named by ``NOTIFY_SOCKET`` (``@`` names an abstract socket), so it
needs no library. Outside systemd (no ``NOTIFY_SOCKET``) every call does nothing.

The watchdog interval comes from ``WATCHDOG_USEC``; it applies to this process only when
``WATCHDOG_PID`` is unset or names it (a forked worker inherits the environment, not the duty).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """One process's link to its service manager; a no-op without ``NOTIFY_SOCKET``."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._socket: socket.socket | None = None
        if self._address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_s = _watchdog_interval(env)
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", status=status)

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd tell this reload from an earlier one (Type=notify-reload needs it).
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        self.send(status=text)

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def send(self, *assignments: str, status: str | None = None) -> None:
        """Send ``assignments`` (``NAME=value``) and ``STATUS=status`` as one message."""
        if self._socket is None or self._address is None:
            return
        lines = list(assignments)
        if status is not None:
            lines.append("STATUS=" + " ".join(status.split()))
        try:
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            # The manager went away or is overloaded; the service keeps running and says so once.
            if not self._failed:
                self._failed = True
                log.warning("cannot notify the service manager", extra={"event": "notify_failed", "error": str(exc)})

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _socket_address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # unset, or a transport this module does not speak (e.g. vsock)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """The watchdog interval in seconds, if this process is the one systemd watches."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 1_000_000
