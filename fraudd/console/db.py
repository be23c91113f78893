"""The console's PostgreSQL: a small pool of connections, each request's SQL run in a thread.

The SQL modules (queue, cases, audit, users, sessions) are plain functions of a connection, the
same code the CLI, tests and the benchmark call; ``run`` gives one of them a pooled connection in
one transaction (committed when it returns, rolled back when it raises) off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from psycopg_pool import ConnectionPool

T = TypeVar("T")


class Database:
    def __init__(self, url: str, pg_schema: str, size: int = 4) -> None:
        self.pool = ConnectionPool(
            url,
            kwargs={"options": f"-c search_path={pg_schema}"},
            min_size=1,
            max_size=size,
            open=False,
            check=ConnectionPool.check_connection,
        )

    async def open(self) -> None:
        await asyncio.to_thread(self.pool.open)

    async def close(self) -> None:
        await asyncio.to_thread(self.pool.close)

    async def run(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.to_thread(self.call, function, *args)

    def call(self, function: Callable[..., T], *args: object) -> T:
        with self.pool.connection() as conn:
            return function(conn, *args)
