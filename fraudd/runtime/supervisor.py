"""The supervisor: forks a service's workers, keeps them alive, and stops them cleanly.

Every long-running fraudd service (scoring, ingest, alerts) runs under this one supervisor; a
``Service`` says what its workers run and how its health is judged. Modelled on gunicorn's
arbiter. Signal handlers only queue the signal and wake the main loop through a pipe; everything
else happens in the loop, outside signal context:

- SIGCHLD: reap dead workers and respawn them, with back-off;
- SIGTERM / SIGINT: graceful stop: workers settle their current batch and exit; a second one
  stops at once (SIGKILL: whatever was not settled stays pending, nothing is lost);
- SIGQUIT: immediate stop;
- SIGHUP: the service's own ``reload`` first (what respawned workers inherit), then forwarded to
  the workers, which reload their configuration at their next boundary.

Under systemd (``Type=notify``) it tells the service manager (``notify.Notifier``): ``READY=1`` once
every worker consumes, again after a reload once every worker has reloaded (``RELOADING=1``
before), ``STOPPING=1`` when it stops, a ``STATUS=`` line (workers ready, plus the service's own
summary, e.g. tx/s and lag), and ``WATCHDOG=1`` only while every live worker's heartbeat is fresh
(within half the watchdog interval): a wedged worker stops the pings and systemd restarts the
service, while an idle one still beats on every empty read.

A worker reports through a pipe when it has booted or reloaded (``R``), why it could not boot
(``E<reason>``), and that it is making progress (``H``).
A boot error, or a worker that keeps dying before it is ready, halts the daemon with the reason
and a non-zero exit instead of crash-looping; a worker killed while running is simply respawned.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from . import logs, metrics
from .health import HealthProblem, HealthServer
from .notify import Notifier
from .process import EXIT_BOOT_ERROR, WorkerProcess, die_with_supervisor

log = logging.getLogger(__name__)

MAX_BOOT_FAILURES = 5
RESPAWN_DELAY_FIRST_S = 0.1
RESPAWN_DELAY_MAX_S = 10.0
HOUSEKEEPING_INTERVAL_S = 5.0
# Beyond the drain timeout, for the supervisor to reap its workers; a unit's TimeoutStopSec is
# the default drain timeout plus this, and a stop asks systemd for as much (EXTEND_TIMEOUT_USEC).
STOP_MARGIN_S = 5.0


class Halt(Exception):
    """The daemon must stop with ``reason`` and a non-zero exit code."""

    def __init__(self, reason: str, exit_code: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_code = exit_code


def _nothing_wrong() -> list[HealthProblem]:
    return []


@dataclass(frozen=True)
class Service:
    """One kind of worker process, as the supervisor runs it."""

    name: str
    workers: int
    run_worker: Callable[[WorkerProcess], int]  # runs in the forked child; returns its exit code
    worker_name: Callable[[int], str]  # stable across respawns: a consumer re-reads its own pending
    shutdown_timeout_s: float
    log_level: str
    metrics_listen: tuple[str, int] | None = None  # (host, port) of /metrics and /healthz; None: not served
    housekeeping: Callable[[], None] | None = None  # every few seconds; must tolerate outages itself
    # On SIGHUP, before the workers are told: what the supervisor holds of the configuration is
    # what every worker it forks from then on starts with, so it must be the reloaded one.
    reload: Callable[[], None] | None = None
    health_problems: Callable[[], list[HealthProblem]] = field(default=_nothing_wrong)  # for /healthz, besides workers
    # One line for systemd's STATUS= (e.g. "1,200 tx/s, lag 0"), sent after each housekeeping;
    # called in the supervisor's loop, so it reads what housekeeping gathered and does no I/O itself.
    summary: Callable[[], str] | None = None


@dataclass
class Slot:
    """Worker position ``index``: survives its processes, so respawns reuse the consumer name."""

    index: int
    pid: int | None = None
    status_fd: int | None = None
    ready: bool = False
    reloading: bool = False  # sent SIGHUP, not yet reported ready with the new configuration
    heartbeat_at: float = 0.0  # monotonic time of the last sign of progress (spawn, R or H)
    boot_failures: int = 0
    respawn_at: float = 0.0
    last_error: str = ""


class Supervisor:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD)

    def __init__(self, service: Service) -> None:
        self.service = service
        self.slots = [Slot(i) for i in range(service.workers)]
        self._signals: list[int] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stop_deadline: float | None = None
        self._health: HealthServer | None = None
        self._notifier = Notifier()
        self._ready_sent = False
        self._watchdog_at = 0.0

    # -- main loop -------------------------------------------------------------------------

    def run(self) -> int:
        for sig in self.SIGNALS:
            signal.signal(sig, self._queue_signal)
        if self.service.metrics_listen is not None:
            self._health = HealthServer(self.service.metrics_listen, self.health_problems)
            self._health.start()
        log.info(f"{self.service.name} started", extra={"event": "started", "workers": self.service.workers})
        next_housekeeping = 0.0
        try:
            while True:
                self._handle_signals()
                self._reap()
                if self._stop_deadline is not None:
                    if not self._alive():
                        log.info(f"{self.service.name} stopped", extra={"event": "stopped"})
                        return 0
                    if time.monotonic() >= self._stop_deadline:
                        log.error("workers did not stop in time, killing them", extra={"event": "stop_timeout"})
                        self._kill_all(signal.SIGKILL)
                else:
                    self._spawn_due()
                    if time.monotonic() >= next_housekeeping:
                        if self.service.housekeeping is not None:
                            self.service.housekeeping()
                        next_housekeeping = time.monotonic() + HOUSEKEEPING_INTERVAL_S
                        self._notifier.status(self.status_line())
                    self._notify_ready()
                self._ping_watchdog()
                self._sleep(0.5)
        except Halt as halt:
            log.error(f"{self.service.name} halted: %s", halt.reason, extra={"event": "halted", "reason": halt.reason})
            self._notifier.send("STOPPING=1", status=f"halted: {halt.reason}")
            self._stop_deadline = time.monotonic()
            self._kill_all(signal.SIGTERM)
            self._wait_all(self.service.shutdown_timeout_s)
            return halt.exit_code
        finally:
            if self._health is not None:
                self._health.stop()
            self._notifier.close()

    def health_problems(self) -> list[HealthProblem]:
        """What is wrong right now, for /healthz: the service's own checks, then workers not ready."""
        problems = self.service.health_problems()
        ready = sum(1 for s in self.slots if s.pid is not None and s.ready)
        if ready < len(self.slots):
            problems.append(HealthProblem("workers", f"{ready} of {len(self.slots)} ready"))
        return problems

    def status_line(self) -> str:
        """What systemd shows after ``Status:``: workers ready, then the service's own summary."""
        if self._stop_deadline is not None:
            return f"stopping: {len(self._alive())} workers settling"
        ready = sum(1 for s in self.slots if s.pid is not None and s.ready)
        line = f"{ready}/{len(self.slots)} workers ready"
        if self.service.summary is not None:
            line += ", " + self.service.summary()
        return line

    # -- service manager -------------------------------------------------------------------

    def _notify_ready(self) -> None:
        """READY=1 once every worker consumes; after a reload, once every worker has reloaded."""
        if self._ready_sent or not all(s.pid is not None and s.ready and not s.reloading for s in self.slots):
            return
        self._ready_sent = True
        log.info(f"{self.service.name} ready", extra={"event": "ready"})
        self._notifier.ready(status=self.status_line())

    def _ping_watchdog(self) -> None:
        """WATCHDOG=1, but only while every live worker shows progress within half the interval."""
        interval = self._notifier.watchdog_s
        if interval is None:
            return
        now = time.monotonic()
        if now - self._watchdog_at < interval / 4:
            return
        if any(now - s.heartbeat_at > interval / 2 for s in self._alive()):
            return  # a wedged worker: let the pings lapse so that systemd restarts the service
        self._watchdog_at = now
        self._notifier.watchdog()

    def _queue_signal(self, signum: int, frame: FrameType | None) -> None:
        if len(self._signals) < 10:
            self._signals.append(signum)
        try:
            os.write(self._wake_w, b".")
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EINTR):
                raise

    def _sleep(self, timeout: float) -> None:
        status_fds = [s.status_fd for s in self.slots if s.status_fd is not None]
        try:
            readable, _, _ = select.select([self._wake_r, *status_fds], [], [], timeout)
        except InterruptedError:
            return
        for fd in readable:
            if fd == self._wake_r:
                while True:
                    try:
                        if not os.read(self._wake_r, 4096):
                            break
                    except BlockingIOError:
                        break
            else:
                self._read_status(fd)

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGCHLD:
                continue  # reaping happens on every loop turn
            if signum == signal.SIGHUP:
                if self._stop_deadline is not None:
                    continue
                log.info("reload requested, forwarding to workers", extra={"event": "reload_requested"})
                self._notifier.reloading()
                if self.service.reload is not None:
                    self.service.reload()
                self._ready_sent = False
                for slot in self._alive():
                    # A worker still booting reads the new configuration anyway and reports R then.
                    slot.reloading = slot.ready
                self._kill_all(signal.SIGHUP)
            elif signum == signal.SIGQUIT or self._stop_deadline is not None:
                log.warning("stopping immediately", extra={"event": "stop_immediate"})
                self._notifier.stopping()
                self._stop_deadline = time.monotonic()
                self._kill_all(signal.SIGKILL)
                self._wait_all(5.0)
                raise SystemExit(0)
            else:
                log.info("stopping: workers settle their current batch", extra={"event": "stop_graceful"})
                self._stop_deadline = time.monotonic() + self.service.shutdown_timeout_s
                stop_usec = int((self.service.shutdown_timeout_s + STOP_MARGIN_S) * 1_000_000)
                self._notifier.send("STOPPING=1", f"EXTEND_TIMEOUT_USEC={stop_usec}", status=self.status_line())
                self._kill_all(signal.SIGTERM)

    # -- workers ---------------------------------------------------------------------------

    def _spawn_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.pid is None and now >= slot.respawn_at:
                self._spawn(slot)

    def _spawn(self, slot: Slot) -> None:
        status_r, status_w = os.pipe()
        supervisor_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(status_r)
            os.close(self._wake_r)
            os.close(self._wake_w)
            for sig in self.SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            # Until the worker installs its handlers, a reload must not kill it (SIGHUP's default):
            # it is about to read the current configuration anyway.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            code = 1
            try:
                die_with_supervisor(supervisor_pid)
                logs.setup(self.service.log_level, self.service.worker_name(slot.index))
                code = self.service.run_worker(WorkerProcess(slot.index, status_w, supervisor_pid))
            except BaseException as exc:  # the last resort of a forked child: never return into the parent's loop
                log.exception("worker crashed", extra={"event": "worker_crashed", "error": repr(exc)})
            finally:
                os._exit(code)
        os.close(status_w)
        slot.pid, slot.status_fd, slot.ready, slot.reloading = pid, status_r, False, False
        slot.heartbeat_at = time.monotonic()  # booting counts as progress until it reports
        log.info(
            "worker spawned", extra={"event": "worker_spawned", "pid": pid, "consumer": self.service.worker_name(slot.index)}
        )

    def _read_status(self, fd: int) -> None:
        slot = next(s for s in self.slots if s.status_fd == fd)
        try:
            message = os.read(fd, 4096)
        except OSError:
            message = b""
        if not message:
            os.close(fd)
            slot.status_fd = None
            return
        for line in message.decode(errors="replace").splitlines():
            if line == "H":
                slot.heartbeat_at = time.monotonic()
            elif line == "R":
                slot.ready, slot.reloading, slot.boot_failures = True, False, 0
                slot.heartbeat_at = time.monotonic()
            elif line.startswith("E"):
                slot.last_error = line[1:]

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            self._worker_exited(slot, pid, status)

    def _worker_exited(self, slot: Slot, pid: int, status: int) -> None:
        if slot.status_fd is not None:
            self._read_status(slot.status_fd)
            if slot.status_fd is not None:
                os.close(slot.status_fd)
                slot.status_fd = None
        was_ready = slot.ready
        slot.pid, slot.ready = None, False
        metrics.worker_exited(pid)
        consumer = self.service.worker_name(slot.index)
        if self._stop_deadline is not None:
            return
        if os.WIFSIGNALED(status):
            how = f"killed by signal {os.WTERMSIG(status)}"
        else:
            how = f"exited with code {os.WEXITSTATUS(status)}"
        metrics.worker_restarts.inc()
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_BOOT_ERROR:
            raise Halt(f"worker {consumer} cannot start: {slot.last_error or how}", exit_code=EXIT_BOOT_ERROR)
        if not was_ready and not os.WIFSIGNALED(status):
            slot.boot_failures += 1
            if slot.boot_failures >= MAX_BOOT_FAILURES:
                raise Halt(
                    f"worker {consumer} died during start-up {slot.boot_failures} times in a row: {slot.last_error or how}"
                )
        delay = min(RESPAWN_DELAY_FIRST_S * 2**slot.boot_failures, RESPAWN_DELAY_MAX_S)
        slot.respawn_at = time.monotonic() + delay
        log.warning(
            "worker died, respawning",
            extra={"event": "worker_died", "pid": pid, "consumer": consumer, "how": how, "respawn_in_s": round(delay, 2)},
        )

    def _alive(self) -> list[Slot]:
        return [s for s in self.slots if s.pid is not None]

    def _kill_all(self, sig: int) -> None:
        for slot in self.slots:
            if slot.pid is None:
                continue
            try:
                os.kill(slot.pid, sig)
            except ProcessLookupError:
                pass

    def _wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._alive() and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        if self._alive():
            self._kill_all(signal.SIGKILL)
            while self._alive():
                self._reap()
                time.sleep(0.01)
