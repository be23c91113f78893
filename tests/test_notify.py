"""The supervisor speaks systemd's notify protocol: the test plays the service manager.

``fraudd run`` gets ``NOTIFY_SOCKET`` pointing at a datagram socket this test owns and a short
``WATCHDOG_USEC``, as systemd would set them for ``Type=notify`` and ``WatchdogSec=``.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from fraudd.runtime.notify import Notifier

from .conftest import Namespace, wait_for, worker_pids
from .ingest_server import IngestServer
from .services import DaemonProcess, stop
from .streams import publish, valid_payloads

WATCHDOG_S = 2.0


class ServiceManager:
    """The receiving end of ``NOTIFY_SOCKET``: every message, in arrival order, with its arrival time.

    A thread receives, so that a message's time is when it was sent, not when the test looked.
    """

    def __init__(self, address: str) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(address)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._cursor = 0
        self._receiver = threading.Thread(target=self._receive, daemon=True)
        self._receiver.start()

    def _receive(self) -> None:
        while True:
            try:
                data = self.socket.recv(4096)
            except OSError:
                return  # closed
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, match: Callable[[dict[str, str]], bool], timeout: float, what: str) -> dict[str, str]:
        """The first message after the one the previous call returned that ``match``es."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index in range(self._cursor, len(self.messages)):
                if match(self.messages[index][1]):
                    self._cursor = index + 1
                    return self.messages[index][1]
            time.sleep(0.05)
        raise AssertionError(f"no {what} within {timeout}s; got {[m for _t, m in self.messages[-10:]]}")

    def watchdog_pings(self, since: float, until: float = float("inf")) -> int:
        return sum(1 for at, fields in self.messages if since <= at < until and fields.get("WATCHDOG") == "1")

    def close(self) -> None:
        self.socket.shutdown(socket.SHUT_RDWR)
        self.socket.close()
        self._receiver.join(timeout=5)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[ServiceManager]:
    listener = ServiceManager(str(tmp_path / "notify"))
    yield listener
    listener.close()


def test_ready_watchdog_reload_and_stop_arrive_in_order_and_a_wedged_worker_stops_the_watchdog(
    ns: Namespace, redis_client: redis.Redis, manager: ServiceManager, tmp_path: Path
) -> None:
    daemon = DaemonProcess.start(
        ns,
        tmp_path / "fraudd.log",
        "--workers",
        "3",
        "--claim-idle-ms",
        "1000",
        NOTIFY_SOCKET=str(tmp_path / "notify"),
        WATCHDOG_USEC=str(int(WATCHDOG_S * 1_000_000)),
        WATCHDOG_PID="",
    )
    try:
        ready = manager.wait_for(lambda m: m.get("READY") == "1", 60, "READY=1")
        assert ready["STATUS"].startswith("3/3 workers ready"), ready
        # An idle stream (every read returns empty) still shows progress: the pings go on.
        idle_from = time.monotonic()
        time.sleep(2 * WATCHDOG_S)
        assert manager.watchdog_pings(idle_from) >= 3, manager.messages[-10:]

        publish(redis_client, ns.stream, valid_payloads(300, "notify"))
        wait_for(lambda: ns.sql("SELECT count(*) FROM transactions")[0][0] == 300, 30, message="300 rows")
        status = manager.wait_for(lambda m: "tx/s" in m.get("STATUS", ""), 15, "a STATUS with the rate")
        assert "lag" in status["STATUS"], status

        daemon.process.send_signal(signal.SIGHUP)
        reloading = manager.wait_for(lambda m: m.get("RELOADING") == "1", 10, "RELOADING=1")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        manager.wait_for(lambda m: m.get("READY") == "1", 30, "READY=1 after the reload")

        workers = worker_pids(daemon.pid)
        assert len(workers) == 3
        os.kill(workers[0], signal.SIGSTOP)
        try:
            wedged_at = time.monotonic()
            # The other workers keep scoring while the stopped one wedges the watchdog (and what
            # Redis handed to its blocked read is reclaimed from it).
            publish(redis_client, ns.stream, valid_payloads(300, "wedged"))
            wait_for(lambda: ns.sql("SELECT count(*) FROM transactions")[0][0] == 600, 30, message="600 rows")
            time.sleep(max(0.0, wedged_at + 2 * WATCHDOG_S - time.monotonic()))
            # Pings may go on until the stopped worker's last heartbeat is half an interval old.
            assert manager.watchdog_pings(wedged_at + WATCHDOG_S) == 0, manager.messages[-10:]
        finally:
            os.kill(workers[0], signal.SIGCONT)
        resumed_at = time.monotonic()
        wait_for(lambda: manager.watchdog_pings(resumed_at) > 0, 2 * WATCHDOG_S, message="pings once the worker runs again")

        daemon.process.send_signal(signal.SIGTERM)
        manager.wait_for(lambda m: m.get("STOPPING") == "1", 10, "STOPPING=1")
        daemon.process.wait(timeout=30)  # a second SIGTERM (from ``stop``) would stop at once
    finally:
        stop(daemon)
    order = [
        next(k for k in ("READY", "RELOADING", "STOPPING") if k in fields)
        for _at, fields in manager.messages
        if fields.keys() & {"READY", "RELOADING", "STOPPING"}
    ]
    assert order == ["READY", "RELOADING", "READY", "STOPPING"], order


def test_abstract_socket_addresses_and_the_watchdog_pid_are_honoured() -> None:
    name = f"fraudd-notify-test-{os.getpid()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    receiver.settimeout(5)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
        notifier.ready(status="all\nfine")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=all fine"
        assert notifier.watchdog_s == 3.0
        notifier.close()
    finally:
        receiver.close()
    # Another process's watchdog (a worker inherits the supervisor's environment) is not ours.
    assert Notifier({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}).watchdog_s is None
    assert not Notifier({}).enabled


def test_ingest_reports_ready_beats_while_idle_and_acknowledges_a_reload(
    ns: Namespace, manager: ServiceManager, tmp_path: Path
) -> None:
    server = IngestServer.start(
        ns,
        tmp_path,
        "--workers",
        "2",
        wait=False,
        NOTIFY_SOCKET=str(tmp_path / "notify"),
        WATCHDOG_USEC=str(int(WATCHDOG_S * 1_000_000)),
        WATCHDOG_PID="",
    )
    try:
        ready = manager.wait_for(lambda m: m.get("READY") == "1", 30, "READY=1")
        assert ready["STATUS"].startswith("2/2 workers ready"), ready
        idle_from = time.monotonic()
        time.sleep(2 * WATCHDOG_S)
        assert manager.watchdog_pings(idle_from) >= 3, manager.messages[-10:]
        server.process.send_signal(signal.SIGHUP)
        manager.wait_for(lambda m: m.get("RELOADING") == "1", 10, "RELOADING=1")
        manager.wait_for(lambda m: m.get("READY") == "1", 10, "READY=1 after the reload")
        server.process.send_signal(signal.SIGTERM)
        manager.wait_for(lambda m: m.get("STOPPING") == "1", 10, "STOPPING=1")
        assert server.process.wait(timeout=30) == 0, server.log()[-2000:]
    finally:
        server.stop()
