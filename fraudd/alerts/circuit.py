"""A channel's circuit breaker, in one worker process: when to stop sending to a peer, and when to try again.

One alert's failure says little about the channel (a flaky load balancer answers 503 to some
requests): that alert is retried on its own back-off and the others go on. The circuit opens only
on what says the channel is down: most of the recent attempts failing (a failure *rate* over
``WINDOW_S`` with at least ``MIN_VOLUME`` attempts, so that a burst of simultaneous timeouts opens it
once, not once per timeout), or a peer that cannot be reached at all; for the wait the peer asked
for (``Retry-After``), else for a back-off that doubles per opening. While open, nothing is sent; then one delivery probes the
peer (half-open): a success closes the circuit, a failure opens it again for twice as long. Each
opening is logged with its length, and the closing with how long the channel was down.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque

from .config import ChannelConfig

log = logging.getLogger(__name__)

WINDOW_S = 30.0  # the attempts the failure rate is judged on
MIN_VOLUME = 20  # fewer attempts in the window say nothing about the rate
OPEN_RATE = 0.5  # the failure rate that opens the circuit


def backoff(config: ChannelConfig, attempts: int) -> float:
    """Exponential back-off with equal jitter: half the step fixed, half random, so that a crowd of
    retries spreads out instead of hitting a recovering peer together."""
    step = min(config.retry_base_s * 2 ** max(0, attempts - 1), config.retry_max_s)
    return step / 2 + random.uniform(0, step / 2)


class Circuit:
    """Closed (sending), open until ``open_until`` (Unix seconds), or half-open (one probe at a time)."""

    def __init__(self, config: ChannelConfig) -> None:
        self.config = config
        self.channel = config.name
        self._attempts: deque[tuple[float, bool]] = deque()  # (monotonic time, failed) within the window
        self._failed = 0
        self._openings = 0  # since the last close: each failed probe doubles the next opening
        self._down_since = 0.0
        self.open_until = 0.0

    @property
    def closed(self) -> bool:
        return not self._openings

    def is_open(self, now: float) -> bool:
        """Open: nothing may be sent before ``open_until``; past it, the circuit is half-open."""
        return now < self.open_until

    def succeeded(self) -> None:
        if self._openings:
            log.info(
                "alert channel back, circuit closed",
                extra={
                    "event": "alerts_channel_up",
                    "channel": self.channel,
                    "down_s": round(time.time() - self._down_since, 1),
                    "openings": self._openings,
                },
            )
            self._openings, self.open_until = 0, 0.0
            self._forget()
        else:
            self._count(False)

    def failed(self, reason: str, unreachable: bool, retry_after: float | None) -> None:
        """An attempt failed: ``unreachable``, no connection at all; ``retry_after``, the wait the peer
        asked for (the length of an opening it causes)."""
        if self.is_open(time.time()):
            return  # in flight when the circuit opened: the same outage, counted once
        if not self.closed:
            self._open(reason, retry_after, "the probe failed")
            return
        rate = self._count(True)
        if unreachable:
            self._open(reason, retry_after, "the peer cannot be reached")
        elif rate is not None:
            self._open(reason, retry_after, f"{rate:.0%} of the last {len(self._attempts)} attempts failed")

    def _count(self, failed: bool) -> float | None:
        """Add an attempt to the window; the window's failure rate if it opens the circuit."""
        now = time.monotonic()
        self._attempts.append((now, failed))
        self._failed += failed
        while self._attempts[0][0] < now - WINDOW_S:
            self._failed -= self._attempts.popleft()[1]
        if len(self._attempts) >= MIN_VOLUME and self._failed >= OPEN_RATE * len(self._attempts):
            return self._failed / len(self._attempts)
        return None

    def _forget(self) -> None:
        self._attempts.clear()
        self._failed = 0

    def _open(self, reason: str, wait: float | None, why: str) -> None:
        if self.closed:
            self._down_since = time.time()
        self._openings += 1
        if wait is None:
            wait = backoff(self.config, self._openings)
        self.open_until = time.time() + wait
        self._forget()
        log.error(
            "alert channel failing, circuit open",
            extra={
                "event": "alerts_channel_down",
                "channel": self.channel,
                "open_s": round(wait, 2),
                "why": why,
                "reason": reason,
            },
        )
