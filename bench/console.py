"""``python -m bench console``: the analyst console's pages on a full store.

Fills a fresh schema with scored transactions as the workers' COPY leaves them (by default
1,000,000 over 28 days, 4% review and 1% decline in the last two days: 50,000 open cases), lets
the console's own sync turn the decisions into cases, then asks a real ``fraudd console`` for the
queue's first page under each filter and for random case pages, one request at a time. Server
time is the console's ``Server-Timing`` header (the handler, its SQL and the template); the
round trip on loopback is reported beside it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import psycopg
import redis

from bench import report
from bench.namespace import FRAUDD, Namespace
from fraudd.console import cases, links
from fraudd.console.queue import DECISIONS
from fraudd.localservers import free_port
from fraudd.schema import connect

SLA = timedelta(hours=4)
PASSWORD = "bench-console-password"
CHUNK = 100_000
# One filter each (and the default view): what an analyst narrows the queue with.
QUEUE_VIEWS: dict[str, dict[str, str]] = {
    "review queue (default)": {},
    "decline queue": {"decision": "decline"},
    "claimed": {"state": "claimed"},
    "resolved": {"state": "resolved"},
    "reason code": {"reason": "model:amount_to_mean"},
    "rule": {"rule": "R_COUNTRY_HOP"},
    "score >= 0.85": {"score_min": "0.85"},
    "amount 100-500": {"amount_min": "100", "amount_max": "500"},
    "merchant": {"merchant": "m42"},
    "country": {"country": "DE"},
    "assignee (claimed by)": {"assignee": "bench"},
    "older than a day": {"older_than_minutes": "1440"},
    "breached only": {"breached": "1"},
    "sort by amount": {"sort": "amount"},
    "sort oldest first": {"sort": "oldest"},
}

_FILL = """
INSERT INTO transactions (transaction_id, user_id, amount, currency, merchant, mcc, country, card_id, device_id, ip,
                          channel, event_time, stream_id, scored_at, score, decision, reasons, model_version)
SELECT 'b' || i, 'u' || (i * 7919 %% 100000), round((5 + random() * random() * 3000)::numeric, 2), 'USD',
       'm' || (i * 31 %% 5000), '5411', (ARRAY['FR', 'DE', 'US', 'GB', 'ES'])[1 + i %% 5],
       'c' || (i * 104729 %% 110000), 'd' || (i * 7 %% 120000), '10.' || (i %% 250) || '.' || (i / 250 %% 250) || '.' || (i %% 7),
       'web', at, '0-' || i, at + interval '1 second',
       CASE WHEN flag = 'review' THEN 0.5 + random() * 0.4
            WHEN flag = 'decline' THEN 0.9 + random() * 0.1 ELSE random() * 0.3 END,
       flag,
       CASE WHEN flag = 'approve' THEN '{}'::text[]
            ELSE ARRAY[(ARRAY['R_VELOCITY_1M', 'R_AMOUNT_SPIKE', 'R_COUNTRY_HOP', 'R_LARGE_AMOUNT'])[1 + i %% 4],
                       (ARRAY['model:amount_to_mean', 'model:new_device', 'model:count_1h'])[1 + i %% 3]] END,
       'lgbm-bench'
FROM (SELECT i, CASE WHEN i %% 100 < 4 THEN 'review' WHEN i %% 100 = 4 THEN 'decline' ELSE 'approve' END AS flag,
             now() - CASE WHEN i %% 100 < 5 THEN random() * interval '2 days' ELSE random() * interval '28 days' END AS at
      FROM generate_series(%s::bigint, %s::bigint) i) s
"""


def fill(ns: Namespace, transactions: int, echo) -> dict:
    """The store: ``transactions`` scored rows, labels on a few, the cases the console's sync makes of them."""
    started = time.perf_counter()
    with connect(ns.postgres_url, ns.schema, autocommit=True) as conn:
        conn.execute("SELECT fraudd_ensure_partitions(current_date - 30, current_date + 1)")
        for first in range(1, transactions + 1, CHUNK):
            conn.execute(_FILL, (first, min(first + CHUNK - 1, transactions)))
            echo(f"  {min(first + CHUNK - 1, transactions):,} transactions stored")
        conn.execute(
            "INSERT INTO labels (transaction_id, label, source, reported_at) "
            "SELECT transaction_id, CASE WHEN score > 0.2 THEN 'fraud' ELSE 'legit' END, 'chargebacks', now() "
            "FROM transactions WHERE transaction_id LIKE 'b%%7' AND event_time < now() - interval '3 days'"
        )
        filled_s = time.perf_counter() - started
        started = time.perf_counter()
        with conn.transaction():
            created = cases.sync(conn, dict.fromkeys(DECISIONS, SLA))
        sync_s = time.perf_counter() - started
        started = time.perf_counter()
        with conn.transaction():
            links.sync(conn)
        links_s = time.perf_counter() - started
        conn.execute("VACUUM ANALYZE")  # what autovacuum will have done to a store of that size
        # Some claimed and some resolved cases, so those views have rows to show.
        conn.execute(
            "UPDATE cases SET state = 'claimed', assignee = 'bench', claimed_at = now(), lease_until = now() + interval '1 hour' "
            "WHERE transaction_id IN (SELECT transaction_id FROM cases WHERE state = 'open' ORDER BY random() LIMIT 500)"
        )
        conn.execute(
            "UPDATE cases SET state = 'resolved', verdict = 'legit', resolved_by = 'bench', resolved_at = now() "
            "WHERE transaction_id IN (SELECT transaction_id FROM cases WHERE state = 'open' ORDER BY random() LIMIT 1000)"
        )
        open_cases = conn.execute("SELECT count(*) FROM cases WHERE state = 'open'").fetchone()[0]
    return {
        "transactions": transactions,
        "cases_created": created,
        "open_cases": open_cases,
        "fill_seconds": round(filled_s, 1),
        "first_sync_seconds": round(sync_s, 2),
        "first_links_sync_seconds": round(links_s, 2),
    }


def _signed_in(url: str) -> httpx.Client:
    client = httpx.Client(base_url=url, headers={"Accept": "text/html"}, timeout=30)
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
    answer = client.post("/login", data={"username": "bench", "password": PASSWORD, "csrf": token})
    if answer.status_code != 303:
        raise RuntimeError(f"cannot sign in to the console: {answer.status_code}")
    return client


def _timed(client: httpx.Client, path: str, params: dict | None = None) -> tuple[float, float]:
    """(server seconds, round-trip seconds) of one GET that must answer 200."""
    started = time.perf_counter()
    answer = client.get(path, params=params)
    round_trip = time.perf_counter() - started
    if answer.status_code != 200:
        raise RuntimeError(f"GET {path} {params}: {answer.status_code} {answer.text[:200]}")
    server_ms = float(answer.headers["Server-Timing"].split("dur=")[1])
    return server_ms / 1000, round_trip


def _distribution(samples: list[tuple[float, float]]) -> dict:
    server, round_trip = np.array([s for s, _ in samples]), np.array([r for _, r in samples])
    return {"server": report.distribution_ms(server), "round_trip": report.distribution_ms(round_trip), "requests": len(samples)}


def run(redis_url: str, postgres_url: str, transactions: int, requests: int, out_dir: Path, echo) -> dict:
    ns = Namespace.fresh("console", redis_url, postgres_url)
    client = redis.Redis.from_url(redis_url)
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        ns.migrate()
        echo(f"filling {ns.schema} with {transactions:,} transactions")
        store = fill(ns, transactions, echo)
        echo(f"  {store['cases_created']:,} cases, {store['open_cases']:,} open")
        password_file = log_dir / "console-password"
        password_file.write_text(PASSWORD + "\n")
        subprocess.run(
            [*FRAUDD, "users", "add", "bench", "--role", "lead", "--password-file", str(password_file)],
            env=ns.env(),
            check=True,
            capture_output=True,
        )
        port = free_port()
        with open(log_dir / "console.log", "wb") as log:
            console = subprocess.Popen(
                [*FRAUDD, "console", "--workers", "2", "--listen", f"127.0.0.1:{port}"], env=ns.env(), stdout=log, stderr=log
            )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(url + "/login", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or console.poll() is not None:
                    raise RuntimeError(f"the console did not start; see {log_dir / 'console.log'}")
                time.sleep(0.2)
            http = _signed_in(url)
            rng = np.random.default_rng(7)
            with psycopg.connect(postgres_url, options=f"-c search_path={ns.schema}") as conn:
                ids = [row[0] for row in conn.execute("SELECT transaction_id FROM cases").fetchall()]
            for _ in range(20):  # warm the server processes, their pools and PostgreSQL's cache
                _timed(http, "/")
                _timed(http, f"/cases/{ids[int(rng.integers(len(ids)))]}")
            queue: dict[str, dict] = {}
            for name, params in QUEUE_VIEWS.items():
                queue[name] = _distribution([_timed(http, "/", params) for _ in range(requests)])
                echo(f"  queue {name:<24} p99 {queue[name]['server']['p99']:7.1f} ms server")
            case_pages = _distribution([_timed(http, f"/cases/{ids[int(k)]}") for k in rng.integers(len(ids), size=requests * 5)])
            echo(f"  case page                      p99 {case_pages['server']['p99']:7.1f} ms server")
            poll = _distribution([_timed(http, "/queue/table") for _ in range(requests)])
        finally:
            console.terminate()
            console.wait(timeout=60)
    finally:
        ns.drop(client)
        client.close()
    worst_queue = max(view["server"]["p99"] for view in queue.values())
    return {
        "store": store,
        "queue": queue,
        "case_page": case_pages,
        "queue_poll": poll,
        "worst_queue_p99_ms": worst_queue,
        "goal_p99_ms": 100,
        "met": worst_queue <= 100 and case_pages["server"]["p99"] <= 100,
        "python": sys.version.split()[0],
    }


def format_result(result: dict) -> str:
    store = result["store"]
    lines = [
        f"console on {store['transactions']:,} transactions, {store['cases_created']:,} cases "
        f"({store['open_cases']:,} open); first sync of cases {store['first_sync_seconds']} s, "
        f"of linked customers {store['first_links_sync_seconds']} s",
        f"{'page':<34} {'server p50':>11} {'server p99':>11} {'round trip p99':>15}",
    ]
    rows = [(f"queue: {name}", view) for name, view in result["queue"].items()]
    rows += [("queue poll (table only)", result["queue_poll"]), ("case page", result["case_page"])]
    for name, view in rows:
        lines.append(
            f"{name:<34} {view['server']['p50']:>9.1f} ms {view['server']['p99']:>9.1f} ms {view['round_trip']['p99']:>12.1f} ms"
        )
    lines.append(
        f"goal p99 <= {result['goal_p99_ms']} ms server time: {'met' if result['met'] else 'NOT met'} "
        f"(worst queue view {result['worst_queue_p99_ms']:.1f} ms, case page {result['case_page']['server']['p99']:.1f} ms)"
    )
    return "\n".join(lines)


# -- what the console's indexes on `transactions` cost the scoring's COPY ----------------------

# The indexes every `transactions` table has, then the one migration 009 adds for the console.
_BASE_INDEXES = (
    "CREATE UNIQUE INDEX ON {t} (transaction_id, event_time)",
    "CREATE INDEX ON {t} (user_id, event_time)",
    "CREATE INDEX ON {t} (event_time) WHERE decision <> 'approve'",
)
_CONSOLE_INDEXES = ("CREATE INDEX ON {t} USING brin (scored_at) WITH (autosummarize = on)",)


def index_cost(redis_url: str, postgres_url: str, rows: int, rounds: int, echo) -> dict:
    """COPY the same ``rows`` scored transactions into a table with the indexes of `transactions`
    without and with the console's, alternately, ``rounds`` times; µs per row of each."""
    ns = Namespace.fresh("console_writes", redis_url, postgres_url)
    client = redis.Redis.from_url(redis_url)
    try:
        ns.migrate()
        with connect(ns.postgres_url, ns.schema, autocommit=True) as conn:
            conn.execute("SELECT fraudd_ensure_partitions(current_date - 30, current_date + 1)")
            conn.execute(_FILL, (1, rows))
            with conn.cursor().copy("COPY (SELECT * FROM transactions) TO STDOUT") as copy:
                data = b"".join(bytes(chunk) for chunk in copy)
            for table, indexes in (("without", _BASE_INDEXES), ("with", _BASE_INDEXES + _CONSOLE_INDEXES)):
                conn.execute(f"CREATE TABLE copy_{table} (LIKE transactions INCLUDING DEFAULTS)")
                for index in indexes:
                    conn.execute(index.format(t=f"copy_{table}"))
            timings: dict[str, list[float]] = {"without": [], "with": []}
            for round_ in range(rounds):
                for table in ("without", "with") if round_ % 2 == 0 else ("with", "without"):
                    conn.execute(f"TRUNCATE copy_{table}")
                    started = time.perf_counter()
                    with conn.transaction(), conn.cursor().copy(f"COPY copy_{table} FROM STDIN") as copy:
                        copy.write(data)
                    timings[table].append((time.perf_counter() - started) / rows * 1e6)
                    echo(f"  COPY {rows:,} rows {table} the console's indexes: {timings[table][-1]:.1f} µs/row")
    finally:
        ns.drop(client)
        client.close()
    best = {table: min(values) for table, values in timings.items()}
    return {
        "rows": rows,
        "rounds": rounds,
        "us_per_row": timings,
        "best": best,
        "added_us_per_row": best["with"] - best["without"],
    }


def format_index_cost(result: dict) -> str:
    best = result["best"]
    return (
        f"COPY of {result['rows']:,} scored transactions, best of {result['rounds']}: "
        f"{best['without']:.1f} µs/row without the console's indexes, {best['with']:.1f} µs/row with them "
        f"(+{result['added_us_per_row']:.1f} µs/row)"
    )
