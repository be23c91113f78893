"""The open-loop producer of latency and soak runs (``python -m bench.producer``).

Transaction i is due at ``t0 + i / rate``, whatever happened before: the producer never waits
for the pipeline, so a slow pipeline cannot slow the offered load down and hide its own latency
(coordinated omission). It wakes at most every ``TICK_S`` and sends everything due in one round
trip (fraudd's ``Publisher``: one script call per shard, the shards found as the payloads are
generated), which keeps its own cost low at high rates without ever sending anything early. It
records, per call, when the first entry was due and when the call went out, so the report can
show whether the producer itself kept to the schedule.

It prints ``started <t0>`` once its clock starts (after generating its first payloads) and writes
its record to ``--out`` (``.npz``) when done or on SIGTERM, with its own CPU time: it has exited
(and left /proc) by the time the benchmark's measurement window closes.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import click
import numpy as np
import redis

from bench.traffic import generator
from fraudd.ingest import Publisher

TICK_S = 0.001
# Payloads generated ahead of the clock; beyond that the producer tops up in small blocks while
# it is ahead of schedule, so a long soak never holds millions of payloads in memory.
AHEAD_S = 5.0
BLOCK = 2048
# Up to this many payloads are all generated before the clock starts (latency runs), so generation
# never delays a send there.
PREGENERATE = 1_000_000
MAX_CALL = 1000

_stopping = False


def _stop(signum, frame) -> None:
    global _stopping
    _stopping = True


@click.command()
@click.option("--redis-url", required=True)
@click.option("--stream", required=True)
@click.option("--rate", type=float, required=True, help="Transactions per second.")
@click.option("--seconds", type=float, required=True, help="How long to send.")
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--shards", type=int, default=1, show_default=True, help="fraudd's --shards: route by user to its shard streams.")
@click.option("--out", required=True, help="Where to write the schedule record (.npz).")
def main(redis_url: str, stream: str, rate: float, seconds: float, seed: int, shards: int, out: str) -> None:
    signal.signal(signal.SIGTERM, _stop)
    total = int(rate * seconds)
    source = generator(seed, total)
    publisher = Publisher(redis.Redis.from_url(redis_url, protocol=2), stream, shards)
    buffer: list[bytes] = []
    # Each buffered payload's shard, found as it is generated: routing parses the payload, which
    # would otherwise cost the send its time.
    route: list[int] | None = [] if shards > 1 else None
    buffered_from = 0  # index of buffer[0]

    def top_up(upto: int) -> None:
        nonlocal buffered_from
        while buffered_from + len(buffer) < min(upto, total):
            payloads = source.generate(min(BLOCK, total - buffered_from - len(buffer))).payloads()
            buffer.extend(payloads)
            if route is not None:
                route.extend(map(publisher.shard, payloads))

    top_up(total if total <= PREGENERATE else int(rate * AHEAD_S))
    first_due: list[int] = []
    sent_at: list[float] = []
    counts: list[int] = []
    t0_wall = time.time() + 0.05
    t0 = time.perf_counter() + 0.05
    print(f"started {t0_wall!r}", flush=True)
    sent = 0
    next_call = t0
    while sent < total and not _stopping:
        now = time.perf_counter()
        due = min(total, int((now - t0) * rate) + 1)  # entry i is due at t0 + i / rate
        if due > sent and now >= next_call:
            count = min(due - sent, MAX_CALL)
            start = sent - buffered_from
            first_due.append(sent)
            sent_at.append(time.time())
            publisher.publish(buffer[start : start + count], None if route is None else route[start : start + count])
            counts.append(count)
            sent += count
            next_call = now + TICK_S
            if start + count >= 4 * BLOCK:
                # Forget what is sent, so memory stays bounded on long runs.
                del buffer[: start + count]
                if route is not None:
                    del route[: start + count]
                buffered_from = sent
            continue
        top_up(int((now - t0 + AHEAD_S) * rate))
        pause = max(t0 + sent / rate, next_call) - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
    cpu = os.times()
    np.savez(
        out,
        cpu_s=cpu.user + cpu.system,
        t0=t0_wall,
        rate=rate,
        first=np.asarray(first_due, dtype=np.int64),
        sent_at=np.asarray(sent_at),
        count=np.asarray(counts, dtype=np.int64),
        sent=sent,
    )
    sys.exit(0)


if __name__ == "__main__":
    main()
