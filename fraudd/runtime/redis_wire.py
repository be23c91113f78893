"""Round trips below redis-py's command layer, for the hot path: the one module that uses its
connection internals (``get_connection``, ``send_packed_command``, ``read_response``,
``nodes_manager``).

Why: redis-py packs a command by inspecting every argument in Python, ≈ 3 µs per transaction with
the one-per-user and one-per-transaction arguments of the features read and commit; hiredis packs
each command in one C call. So a batch's commands are packed by hiredis and written to a pooled
connection at once, and their replies read back in order. No response callbacks apply: callers
send only commands whose raw reply they use (HMGET, HSET, PEXPIRE, FCALL, WATCH, GET, MULTI,
EXEC, XADD, WAIT).

What this relies on in redis-py (>= 5.3, pinned in pyproject.toml and by tests/test_redis_wire.py):
``ConnectionPool.get_connection()`` without arguments, ``send_packed_command(list of bytes,
check_health=False)``, ``read_response()`` raising an error reply as ``ResponseError`` with the
connection left usable, and ``RedisCluster.nodes_manager.initialize()`` learning the slot map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hiredis
import redis
import redis.asyncio
import redis.asyncio.cluster
from redis.cluster import RedisCluster

# A command and its arguments as hiredis packs them.
Command = tuple[str | bytes | int | float, ...]


def round_trip(client: redis.Redis, commands: Sequence[Command]) -> list[Any]:
    """The raw replies of ``commands``, sent to ``client`` in one write and read back in order.

    Every reply is read, so an error reply leaves no other on the connection; the first error is
    raised afterwards. A broken connection is closed and the commands go again through redis-py's
    own path, which reconnects and retries as the client is configured to; so does a client with a
    single dedicated connection."""
    if client.connection is None:  # pooled
        pool = client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([pack(c) for c in commands], check_health=False)
            replies: list[Any] = []
            error: redis.ResponseError | None = None
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as exc:
                    error = error or exc
            if error is not None:
                raise error
            return replies
        except (redis.ConnectionError, redis.TimeoutError):
            conn.disconnect()
        finally:
            pool.release(conn)
    return [client.execute_command(*c) for c in commands]


def transaction_while(client: redis.Redis, key: str, value: bytes, commands: Sequence[Command]) -> bool | None:
    """``commands`` in one MULTI/EXEC, applied only while ``key`` holds ``value``: True when applied,
    False when ``key`` holds something else (nothing written), None when ``key`` changed between
    its check and the EXEC (nothing written: the caller may try again).

    ``key`` is WATCHed and read in one round trip, the transaction sent in a second; an error reply
    of one of ``commands`` is raised. Whatever breaks off closes the connection, which may be left
    with a WATCH or an open MULTI."""
    transaction = [pack(("MULTI",)), *(pack(c) for c in commands)]
    transaction.append(pack(("EXEC",)))
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command([pack(("WATCH", key)), pack(("GET", key))], check_health=False)
        conn.read_response()
        if conn.read_response() != value:
            conn.send_packed_command([pack(("UNWATCH",))], check_health=False)
            conn.read_response()
            return False
        conn.send_packed_command(transaction, check_health=False)
        applied = [conn.read_response() for _ in transaction][-1]
        if applied is None:
            return None
        failed = [reply for reply in applied if isinstance(reply, redis.ResponseError)]
        if failed:
            raise failed[0]
        return True
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


def pack(command: Command) -> bytes:
    """``command`` in the Redis protocol, packed by hiredis in one C call."""
    # hiredis's stub types the command as a tuple of one argument.
    packed: bytes = hiredis.pack_command(command)  # type: ignore[arg-type]
    return packed


async def round_trip_async(client: redis.asyncio.Redis, packed: Sequence[bytes]) -> list[Any]:
    """The raw replies of the already packed (``pack``) commands, sent to ``client``
    in one write; the first error reply is raised. Whatever was cut off mid-reply closes the
    connection, so the next user of it does not read it."""
    pool = client.connection_pool
    conn = await pool.get_connection()
    try:
        await conn.send_packed_command(list(packed), check_health=False)
        return [await conn.read_response() for _command in packed]
    except BaseException:
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)


def refresh_slots(client: redis.Redis | RedisCluster) -> None:
    """After a node failed or a slot moved, learn the cluster's slot map again (best effort: while
    the cluster is down the next attempt fails again, and refreshes again)."""
    if isinstance(client, RedisCluster):
        try:
            client.nodes_manager.initialize()
        except (redis.RedisError, redis.exceptions.RedisClusterException):
            pass


async def refresh_slots_async(cluster: redis.asyncio.cluster.RedisCluster) -> None:
    """``refresh_slots`` for an asyncio cluster client that was initialized already."""
    await cluster.nodes_manager.initialize()
