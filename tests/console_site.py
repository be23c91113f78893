"""A real ``fraudd console`` (with a real ``fraudd run`` scoring into it) for the console's tests,
and the browser that drives it: Debian's chromium through Playwright, never a downloaded one."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import orjson
import redis

from fraudd import schema
from fraudd.console import users as console_users
from fraudd.console.passwords import hash_password
from fraudd.localservers import free_port

from .conftest import Daemon, Namespace, wait_for
from .streams import publish

CHROMIUM = "/usr/bin/chromium"
PASSWORD = "correct horse battery"
USERS = {
    "alice": "analyst",
    "bob": "analyst",
    "carol": "analyst",
    "erin": "analyst",
    "dave": "lead",
    "lena": "lead",
    "root": "admin",
}


@dataclass
class Site:
    ns: Namespace
    url: str
    console: Daemon
    scorer: Daemon
    redis: redis.Redis
    metrics_url: str
    published: list[str] = field(default_factory=list)

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        return self.ns.sql(query, params)

    def transactions(self, count: int, amount: float = 12_000.0, **fields: object) -> list[str]:
        """Publish ``count`` transactions (large enough for the R_LARGE_AMOUNT review rule by default),
        each on a device, IP and card of its own unless ``fields`` say otherwise; returns their ids."""
        ids = [f"tx-{uuid.uuid4().hex[:10]}" for _ in range(count)]
        now = time.time()
        payloads = [
            orjson.dumps(
                {
                    "transaction_id": txid,
                    "user_id": f"cust-{txid[3:8]}",
                    "amount": amount + i,
                    "merchant": "Acme Travel",
                    "country": "FR",
                    "device_id": f"dev-{txid[3:]}",
                    "ip": f"198.51.100.{i % 250}",
                    "card_id": f"card-{txid[3:]}",
                    "timestamp": now - 30,
                    **fields,
                }
            )
            for i, txid in enumerate(ids)
        ]
        publish(self.redis, self.ns.stream, payloads)
        return ids

    def cases(self, ids: list[str], timeout: float = 60) -> dict[str, str]:
        """Wait until every one of ``ids`` is a case (scored, then copied by the console's housekeeping); their decisions."""
        found: dict[str, str] = {}

        def ready() -> bool:
            found.update(self.sql("SELECT transaction_id, decision FROM cases WHERE transaction_id = ANY(%s)", (ids,)))
            return len(found) == len(ids)

        wait_for(ready, timeout, interval=0.5, message=f"{len(ids)} cases")
        return found

    def decision(self, transaction_id: str, timeout: float = 60) -> tuple[str, list[str]]:
        rows: list[tuple] = []

        def scored() -> bool:
            rows[:] = self.sql("SELECT decision, reasons FROM transactions WHERE transaction_id = %s", (transaction_id,))
            return bool(rows)

        wait_for(scored, timeout, interval=0.2, message=f"{transaction_id} scored")
        return rows[0][0], list(rows[0][1])


def start_site(ns: Namespace, client: redis.Redis) -> Iterator[Site]:
    # Added as `fraudd users add` adds them, in this process: seven commands take seconds to start
    # (test_console_queue runs the command itself).
    with schema.connect(ns.postgres_url, ns.schema, autocommit=True) as conn, conn.transaction():
        for name, role in USERS.items():
            console_users.add(conn, "cli:tests", name, role, hash_password(PASSWORD))
    scorer = ns.start("--workers", "1")
    port, metrics_port = free_port(), free_port()
    console = ns.start_command("console", "--listen", f"127.0.0.1:{port}", "--workers", "2", "--metrics-port", str(metrics_port))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(url), 30, message="the console answering")
        yield Site(ns, url, console, scorer, client, f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        console_code, console_log = console.stop()
        scorer_code, scorer_log = scorer.stop()
        assert console_code == 0, console_log[-3000:]
        assert scorer_code == 0, scorer_log[-3000:]


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/login", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def sign_in(page, site: Site, username: str, password: str = PASSWORD) -> None:
    page.goto(site.url + "/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("button", name="Claim next").wait_for()


def csrf_token(page) -> str:
    return page.locator('meta[name="csrf-token"]').get_attribute("content")
