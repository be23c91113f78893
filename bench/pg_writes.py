"""PostgreSQL's checkpoint and buffer-write counters, read alike on PostgreSQL 15, 16 and 17.

Up to 16, ``pg_stat_bgwriter`` holds them all. PostgreSQL 17 moves the checkpointer's into
``pg_stat_checkpointer`` (``checkpoints_timed``/``checkpoints_req`` become ``num_timed``/
``num_requested``, ``buffers_checkpoint`` becomes ``buffers_written``) and drops
``buffers_backend``: the writes processes other than the checkpointer and the background writer
make to shared buffers are counted in ``pg_stat_io`` (16 on) as ``writes`` of ``object`` relation,
which is what ``buffers_backend`` counted. ``WriteCounters`` takes the server's version
(``server_version_num``, which libpq reports as the connection opens) once and keeps its query.
"""

from __future__ import annotations

import psycopg

# The counters, in every query's column order.
NAMES = ("checkpoints", "buffers_checkpoint", "buffers_clean", "buffers_backend")

_BEFORE_17 = """
SELECT checkpoints_timed + checkpoints_req, buffers_checkpoint, buffers_clean, buffers_backend FROM pg_stat_bgwriter
"""
_FROM_17 = """
SELECT c.num_timed + c.num_requested, c.buffers_written, b.buffers_clean,
       (SELECT coalesce(sum(writes), 0)::bigint FROM pg_stat_io
         WHERE object = 'relation' AND backend_type NOT IN ('checkpointer', 'background writer'))
  FROM pg_stat_checkpointer c, pg_stat_bgwriter b
"""


def query(server_version_num: int) -> str:
    """The counters' query on a server of this ``server_version_num`` (150004: 15.4)."""
    return _FROM_17 if server_version_num >= 170000 else _BEFORE_17


class WriteCounters:
    """``NAMES``' values on one connection's server, read with the query its version takes."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self._conn = conn
        self._query = query(conn.info.server_version)

    def read(self) -> dict[str, int]:
        row = self._conn.execute(self._query).fetchone()
        assert row is not None
        return dict(zip(NAMES, (int(v) for v in row)))
