"""The chaos test: DESIGN.md's six guarantees, checked by exact counts after everything goes wrong.

About 60,000 generated transactions (1% producer duplicates, 0.5% invalid entries) go through
``fraudd run --workers 2`` as a real subprocess, on a Redis and a PostgreSQL of the test's own,
while the test SIGKILLs a random worker every 0.2-1 s, stops PostgreSQL for 3 s (a crash-stop:
``pg_ctl -m immediate``), SIGKILLs and restarts Redis (append-only file, fsync always), and
SIGKILLs the supervisor and starts a new one, whose workers reuse the dead one's consumer names.
Part of the stream is there before the daemon starts; the rest is published during the chaos,
until after the last of those faults, so that each one meets traffic (asserted).
After the drain, every guarantee is checked against what the stream actually holds (a producer
retry after Redis died under it may have added entries, as in production).
"""

from __future__ import annotations

import os
import random
import signal
import struct
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import redis

from fraudd.generator import GeneratorConfig, TransactionGenerator
from fraudd.keys import Keys
from fraudd.scoring import decode
from fraudd.scoring.features import stored_states

from .conftest import Namespace, wait_for, worker_pids
from .services import DaemonProcess, PostgresServer, RedisServer, alive, dedicated_namespace
from .streams import fully_drained, publish

# Enough for hundreds of duplicates and invalid entries, and a backlog at every fault; more would
# only lengthen the drain (the counts are exact at any volume).
TRANSACTIONS = 60_000
DUPLICATE_RATE = 0.01
INVALID_RATE = 0.005
EVENT_RATE = 30.0  # tx/s of event time: the generated stream is the last ~33 minutes
PREFILLED = 0.4  # share of the entries on the stream before the daemon starts
# The rest in 48 chunks 0.3 s apart: the producer publishes for ~16 s, past the last fault.
PUBLISH_CHUNK = 750
PUBLISH_PAUSE_S = 0.3
KILL_EVERY_S = (0.2, 1.0)
# Seconds after both workers run: (when, what). Kept apart so each one is its own failure.
POSTGRES_DOWN_AT, POSTGRES_DOWN_S = 2.0, 3.0
REDIS_RESTART_AT = 8.0
SUPERVISOR_KILL_AT = 12.0
CHAOS_S = 15.0  # worker kills go on at least this long
ORPHAN_EXIT_TIMEOUT_S = 20.0
TEST_BUDGET_S = 170.0
# Pipeline depth 2: the chaos also hits reads that are being stored while the next is scored
# (every other test runs the default depth 1). A worker killed every 0.2-1 s can die several times
# on one slow batch (a COPY into a chunk being compressed takes over a second): each death counts a
# delivery, so the poison bar sits above what the kill rate alone reaches. Poison itself is tested
# in test_recovery; this test is about the six guarantees.
DAEMON_ARGS = (
    "--workers",
    "2",
    "--batch-size",
    "500",
    "--claim-idle-ms",
    "3000",
    "--pipeline-depth",
    "2",
    "--max-deliveries",
    "12",
)


class Producer(threading.Thread):
    """Publishes entries in chunks while the chaos runs; retries a chunk while Redis is away."""

    def __init__(self, client: redis.Redis, stream: str, payloads: list[bytes | None]) -> None:
        super().__init__(name="producer", daemon=True)
        self._client, self._stream, self._payloads = client, stream, payloads
        self.retries = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for start in range(0, len(self._payloads), PUBLISH_CHUNK):
                chunk = self._payloads[start : start + PUBLISH_CHUNK]
                while True:
                    try:
                        publish(self._client, self._stream, chunk)
                        break
                    except redis.ConnectionError:  # down or loading its append-only file
                        self.retries += 1
                        time.sleep(0.2)
                time.sleep(PUBLISH_PAUSE_S)
        except BaseException as exc:  # surfaced by the test thread
            self.error = exc


class Chaos:
    """Kills and outages against one daemon; replaces the daemon when it kills the supervisor."""

    def __init__(self, ns: Namespace, log_path: Path, redis_server: RedisServer, postgres: PostgresServer) -> None:
        self.ns, self.log_path = ns, log_path
        self.redis_server, self.postgres = redis_server, postgres
        self.daemon = DaemonProcess.start(ns, log_path, *DAEMON_ARGS)
        self.daemons = [self.daemon]
        self.orphans: list[int] = []
        self.worker_kills = 0
        self.producing_at_events: list[bool] = []  # per timed event: were entries still being published
        self.rng = random.Random(11)

    def kill_a_worker(self) -> None:
        workers = worker_pids(self.daemon.pid)
        if workers:
            try:
                os.kill(self.rng.choice(workers), signal.SIGKILL)
                self.worker_kills += 1
            except ProcessLookupError:
                pass

    def kill_supervisor(self) -> None:
        """SIGKILL the supervisor (once both its workers run) and start a new one at once, as systemd would."""
        wait_for(lambda: len(worker_pids(self.daemon.pid)) == 2, 10, message="both workers before the supervisor kill")
        self.orphans = worker_pids(self.daemon.pid)
        os.kill(self.daemon.pid, signal.SIGKILL)
        self.daemon.process.wait(timeout=10)
        self.daemon = DaemonProcess.start(self.ns, self.log_path, *DAEMON_ARGS)
        self.daemons.append(self.daemon)

    def run(self, producer: Producer) -> None:
        started = time.monotonic()
        events = [
            (POSTGRES_DOWN_AT, lambda: self.postgres.stop("immediate")),
            (POSTGRES_DOWN_AT + POSTGRES_DOWN_S, self.postgres.start),
            (REDIS_RESTART_AT, lambda: self.redis_server.restart(down_s=0.5)),
            (SUPERVISOR_KILL_AT, self.kill_supervisor),
        ]
        next_kill = started + 1.0
        while events or producer.is_alive() or time.monotonic() - started < CHAOS_S:
            now = time.monotonic()
            if events and now - started >= events[0][0]:
                self.producing_at_events.append(producer.is_alive())
                events.pop(0)[1]()
            if now >= next_kill:
                self.kill_a_worker()
                next_kill = now + self.rng.uniform(*KILL_EVERY_S)
            time.sleep(0.02)

    def cleanup(self) -> None:
        for daemon in self.daemons:
            daemon.kill_group()
        for pid in self.orphans:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def read_stream(client: redis.Redis, stream: str) -> list[tuple[str, dict[bytes, bytes]]]:
    entries, start = [], "-"
    while True:
        page = client.xrange(stream, min=start, count=20_000)
        entries += [(i.decode(), f) for i, f in page]
        if len(page) < 20_000:
            return entries
        start = "(" + page[-1][0].decode()


def test_exactly_once_under_chaos(dedicated_redis: RedisServer, dedicated_postgres: PostgresServer, tmp_path: Path) -> None:
    test_started = time.monotonic()
    ns = dedicated_namespace(dedicated_redis, dedicated_postgres.url)
    client = dedicated_redis.client()

    generated = TransactionGenerator(
        GeneratorConfig(
            seed=2024,
            start_ts=time.time() - TRANSACTIONS / EVENT_RATE - 60,
            tx_per_second=EVENT_RATE,
        )
    ).generate(TRANSACTIONS)
    faults = generated.with_faults(DUPLICATE_RATE, INVALID_RATE, np.random.default_rng(7))
    # What each payload is: a valid transaction (its id and user) or an invalid entry (its reason).
    txids, users = generated.transaction_id.tolist(), generated.user_id.tolist()
    valid_label = {
        p: (txids[row], users[row])
        for p, row, reason in zip(faults.payloads, faults.row.tolist(), faults.reason)
        if reason is None
    }
    invalid_label = {p: reason for p, reason in zip(faults.payloads, faults.reason) if reason is not None and p is not None}

    prefilled = int(len(faults.payloads) * PREFILLED)
    publish(client, ns.stream, faults.payloads[:prefilled])
    producer = Producer(dedicated_redis.client(), ns.stream, faults.payloads[prefilled:])
    chaos = Chaos(ns, tmp_path / "fraudd.log", dedicated_redis, dedicated_postgres)
    try:
        # The timeline counts from a running daemon: on a busy box starting one takes seconds, and
        # PostgreSQL stopped before its start-up check would only refuse the start.
        wait_for(lambda: len(worker_pids(chaos.daemon.pid)) == 2, 60, message="both workers at the start")
        producer.start()
        chaos.run(producer)
        producer.join(timeout=60)
        assert producer.error is None, repr(producer.error)
        budget = TEST_BUDGET_S - (time.monotonic() - test_started) - 25
        wait_for(lambda: fully_drained(client, ns), max(budget, 30), interval=0.5, message="the drain after the chaos")
        wait_for(
            lambda: not any(alive(pid) for pid in chaos.orphans),
            ORPHAN_EXIT_TIMEOUT_S,
            message=f"the dead supervisor's workers {chaos.orphans} to exit",
        )
        assert chaos.daemon.stop() == 0, chaos.daemon.log()[-3000:]
    finally:
        chaos.cleanup()
    chaos_s = time.monotonic() - test_started
    log = (tmp_path / "fraudd.log").read_text(errors="replace")
    assert '"worker_crashed"' not in log and '"halted"' not in log, log[-5000:]
    assert len(chaos.orphans) == 2
    assert chaos.producing_at_events == [True] * 4  # every outage and kill met traffic still arriving

    # What the stream holds is what was published, producer retries included.
    stream = read_stream(client, ns.stream)
    expected_rows: dict[str, str] = {}  # transaction_id -> user_id
    expected_dead: dict[str, tuple[str, bytes]] = {}  # entry id -> (reason, original bytes)
    entries_of: Counter[str] = Counter()
    for entry_id, fields in stream:
        data = fields.get(b"data")
        if data is None:
            expected_dead[entry_id] = (decode.REASON_NO_DATA, b"")
        elif data in invalid_label:
            expected_dead[entry_id] = (invalid_label[data], data)
        else:
            txid, user = valid_label[data]
            expected_rows[txid] = user
            entries_of[txid] += 1
    assert len(expected_rows) == TRANSACTIONS  # the producer lost nothing
    assert len(expected_dead) >= int(round(INVALID_RATE * TRANSACTIONS))

    # 1. each distinct valid transaction_id has exactly one row
    stored = ns.sql("SELECT transaction_id, decision FROM transactions")
    rows_per_id = Counter(txid for txid, _ in stored)
    assert max(rows_per_id.values()) == 1, [t for t, c in rows_per_id.items() if c > 1][:10]
    assert rows_per_id.keys() == expected_rows.keys(), sorted(expected_rows.keys() ^ rows_per_id.keys())[:10]
    decision = dict(stored)
    flagged = {txid for txid, d in decision.items() if d != "approve"}

    # 2. each distinct non-approved transaction_id has exactly one alert
    alerts = [orjson.loads(fields[b"data"]) for _id, fields in read_stream(client, ns.fraud_stream)]
    alerts_per_id = Counter(a["transaction_id"] for a in alerts)
    assert not alerts or max(alerts_per_id.values()) == 1, [t for t, c in alerts_per_id.items() if c > 1][:10]
    assert alerts_per_id.keys() == flagged

    # 3. each invalid entry is in the DLQ exactly once, with its reason and original bytes
    letters = [fields for _id, fields in read_stream(client, ns.dlq_stream)]
    letters_per_source = Counter(f[b"source_id"].decode() for f in letters)
    assert not letters or max(letters_per_source.values()) == 1
    assert letters_per_source.keys() == expected_dead.keys()
    for letter in letters:
        reason, data = expected_dead[letter[b"source_id"].decode()]
        assert (letter[b"reason"].decode(), letter[b"data"]) == (reason, data)

    # 4. the consumer group's pending list is empty
    pending = client.xpending(ns.stream, ns.group)["pending"]
    assert pending == 0

    # 5. behaviour features counted each transaction_id once
    keys = Keys(ns.stream, ns.fraud_stream, ns.dlq_stream)
    markers = sum(client.hlen(bucket) for bucket in client.scan_iter(match=keys.seen_prefix + "*", count=10_000))
    assert markers == len(expected_rows)
    per_user = Counter(expected_rows.values())
    profiled = sorted(per_user)
    counted: dict[str, int] = {}
    for start in range(0, len(profiled), 1000):
        chunk = profiled[start : start + 1000]
        raws = stored_states(client, keys, chunk)
        counted.update({u: struct.unpack_from("<dI", raw)[1] for u, raw in zip(chunk, raws) if raw is not None})
    assert counted == dict(per_user), [(u, counted.get(u), n) for u, n in per_user.items() if counted.get(u) != n][:10]

    # 6. the decision in the alert stream is the row's decision in PostgreSQL
    mismatched = [a["transaction_id"] for a in alerts if a["decision"] != decision[a["transaction_id"]]]
    assert mismatched == []

    events = Counter(
        e
        for e in ("worker_died", "outage", "recovered", "reclaimed", "batch_bisected", "group_recreated")
        for _ in range(log.count(f'"{e}"'))
    )
    print(
        f"\nchaos: {chaos_s:.1f}s; stream entries {len(stream)} "
        f"(duplicated ids {sum(1 for c in entries_of.values() if c > 1)}, "
        f"producer retries {producer.retries}); worker SIGKILLs {chaos.worker_kills}, supervisor SIGKILLs 1 "
        f"(orphans exited: {len(chaos.orphans)}), PostgreSQL down {POSTGRES_DOWN_S:.0f}s, Redis restarts 1; "
        f"log events {dict(events)}\n"
        f"(1) rows {len(stored)} = distinct valid ids {len(expected_rows)}, max rows per id 1\n"
        f"(2) alerts {len(alerts)} = distinct non-approved ids {len(flagged)}, max alerts per id 1\n"
        f"(3) dead letters {len(letters)} = invalid entries {len(expected_dead)}, max per source 1, "
        f"reasons {dict(Counter(r for r, _ in expected_dead.values()))}\n"
        f"(4) pending {pending}\n"
        f"(5) dedup markers {markers} = distinct valid ids; per-user counts equal distinct ids for {len(counted)} users\n"
        f"(6) alert decisions equal to PostgreSQL's: {len(alerts) - len(mismatched)} of {len(alerts)}"
    )
