"""The forked side of supervision: what every worker process of every fraudd service shares.

A worker tells its supervisor through a pipe that it has booted (``R``) or why it cannot
(``E<reason>``, then it exits with ``EXIT_BOOT_ERROR`` and the supervisor halts instead of
respawning it in a loop), and that it is still making progress (``H``, a heartbeat on every turn
of its loop, idle turns included, at most every ``HEARTBEAT_INTERVAL_S``): the supervisor pings
systemd's watchdog only while every worker's heartbeat is fresh, so a wedged worker gets the
service restarted. A service whose workers do not run ``consume()`` calls ``heartbeat()`` from its
own loop. It dies with its supervisor (``die_with_supervisor``, right after the fork): a worker
outliving it would keep consuming under a name the next supervisor reuses. SIGTERM/SIGINT ask it to stop at its next boundary and
SIGHUP to reload; both only set flags (and wake an event loop that asked to be woken), so a batch
is never interrupted halfway.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Callable
from types import FrameType

EXIT_BOOT_ERROR = 3
HEARTBEAT_INTERVAL_S = 0.25  # well under any sensible watchdog interval; a pipe write, not per batch
_PR_SET_PDEATHSIG = 1
# glibc's mallopt parameters, and the largest mmap threshold it accepts on 64 bits.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20
# Free memory the heap keeps rather than gives back: well above what a batch allocates at its peak.
_TRIM_THRESHOLD = 256 << 20


class BootError(RuntimeError):
    """The worker cannot start with this configuration; respawning it would not help."""


def die_with_supervisor(supervisor_pid: int) -> None:
    """Have the kernel SIGKILL this (just forked) worker when its supervisor dies.

    A signal the kernel delivers needs nothing from the worker: it holds while the worker's event
    loop or main thread is stuck, where a handler, an orphan check in the loop or a SIGTERM (which
    only asks for a stop at the next boundary) would wait forever. Whatever the worker held
    unsettled stays pending for the next supervisor's workers. A supervisor that died before the
    ``prctl`` sends nothing: then the parent is already another process, and the worker leaves now.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != supervisor_pid:
        os._exit(1)


def keep_freed_memory() -> None:
    """Have glibc's malloc reuse a batch's large blocks rather than map and unmap them each time.

    By default a block over 128 KiB (the joined payloads, the packed Redis commands and their
    replies, numpy's batch-sized arrays, the COPY's buffer) is mapped fresh and unmapped when
    freed, so every batch pays a page fault and a zeroed page per 4 KiB of each: packing the
    features commit (≈ 350 KB) cost 4x what it costs from the heap, and the stage benchmarks of
    the settle's encoding, the COPY's encoding and inference 15-35% more CPU. Served from the
    heap, which keeps what is freed up to ``_TRIM_THRESHOLD``, the memory is touched once and
    reused by every later batch; the price is a worker holding on to its peak. Not glibc (no
    ``mallopt``): left as it is.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


class WorkerProcess:
    """Worker ``index`` of a supervisor, seen from inside the forked process."""

    def __init__(self, index: int, status_fd: int | None = None, parent_pid: int | None = None) -> None:
        self.index = index
        self.stopping = False
        self.reload_requested = False
        self._status_fd = status_fd
        if status_fd is not None:
            # A supervisor that stopped reading must not block a worker on a full pipe.
            os.set_blocking(status_fd, False)
        self._last_heartbeat = 0.0
        # The supervisor's pid as it knew it before the fork: had it died before this line, getppid()
        # would already name the process that adopted the orphan, which then never looks orphaned.
        self._parent = parent_pid if parent_pid is not None else os.getppid()
        self._wakers: list[Callable[[], object]] = []

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    def wake_on_signal(self, waker: Callable[[], object]) -> None:
        """Call ``waker`` (e.g. an event loop's thread-safe wake-up) after every stop or reload signal."""
        self._wakers.append(waker)

    @property
    def running(self) -> bool:
        """Neither told to stop nor orphaned."""
        return not self.stopping and os.getppid() == self._parent

    def ready(self) -> None:
        """Booted, or done reloading (SIGHUP): consuming with the current configuration."""
        self._report("R")
        self._last_heartbeat = time.monotonic()

    def heartbeat(self) -> None:
        """Still making progress; call on every turn of the worker's loop (cheap: throttled here)."""
        now = time.monotonic()
        if now - self._last_heartbeat >= HEARTBEAT_INTERVAL_S:
            self._last_heartbeat = now
            self._report("H")

    def boot_failed(self, reason: str) -> int:
        """Report why this worker cannot start; returns the exit code that halts the supervisor."""
        self._report(f"E{reason}")
        return EXIT_BOOT_ERROR

    def _report(self, status: str) -> None:
        if self._status_fd is None:
            return
        try:
            os.write(self._status_fd, (status.replace("\n", " ") + "\n").encode())
        except BrokenPipeError:
            # The supervisor died while this worker was booting: an orphan must not consume.
            self.stopping = True
        except BlockingIOError:
            pass  # the supervisor is not reading (wedged): its own watchdog deals with that

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        self._wake()

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True
        self._wake()

    def _wake(self) -> None:
        for waker in self._wakers:
            waker()
