"""Round trips below redis-py's command layer, for the hot path: the one module that uses its
connection internals (``get_connection``, ``send_packed_command``, ``read_response``,
``nodes_manager``).

Why: redis-py packs a command by inspecting every argument in Python, ≈ 3 µs per transaction with
the one-per-user and one-per-transaction arguments of the features read and commit; hiredis packs
each command in one C call. So a batch's commands are packed by hiredis and written at once to a
connection (pooled, or held by a caller whose calls run one at a time: ``HeldConnection``), and
their replies read back in order. No response callbacks apply: callers
send only commands whose raw reply they use (HMGET, HSET, PEXPIRE, FCALL, WATCH, UNWATCH, GET,
MGET, MULTI, EXEC, XADD, WAIT, EVALSHA).

What this relies on in redis-py (>= 5.3, pinned in pyproject.toml and by tests/test_redis_wire.py):
``ConnectionPool.get_connection()`` without arguments, ``send_packed_command(list of bytes,
check_health=False)`` opening a closed connection again, ``read_response()`` raising an error reply
as ``ResponseError`` with the connection left usable, and ``RedisCluster.nodes_manager.initialize()``
learning the slot map.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
import redis
import redis.asyncio
import redis.asyncio.cluster
from redis.cluster import RedisCluster

# A command and its arguments as hiredis packs them.
Command = tuple[str | bytes | int | float, ...]


@dataclass(frozen=True, slots=True)
class Packed:
    """A command packed ahead of its round trip (``sharing_tail``): ``data`` is what is sent, the
    command ``head`` + ``tail`` what redis-py's own path executes."""

    data: bytes
    head: Command
    tail: Command

    def command(self) -> Command:
        return (*self.head, *self.tail)


# What a round trip sends: a command, or one packed ahead.
Outgoing = Command | Packed


def round_trip(client: redis.Redis, commands: Sequence[Outgoing], errors_as_replies: bool = False) -> list[Any]:
    """The raw replies of ``commands``, sent to ``client`` in one write and read back in order.

    Every reply is read, so an error reply leaves no other on the connection; the first error is
    raised afterwards, or with ``errors_as_replies`` each error reply is its command's reply (a
    ``ResponseError``). A broken connection is closed and the commands go again through redis-py's
    own path, which reconnects and retries as the client is configured to; so does a client with a
    single dedicated connection."""
    if client.connection is None:  # pooled
        pool = client.connection_pool
        conn = pool.get_connection()
        try:
            replies = _sent(conn, commands, errors_as_replies)
        finally:
            pool.release(conn)
        if replies is not None:
            return replies
    return _through_redis_py(client, commands, errors_as_replies)


class HeldConnection:
    """``round_trip`` on a connection held across calls, one per client: for a user whose calls run
    in one thread at a time (a worker's feature store), in place of a connection taken from the
    pool and given back per call.

    Why: redis-py's pool checks a connection out with a fork check, a lock, a poll of the socket for
    stray replies and its observability records, and back in with another lock, ≈ 7 µs a call and
    more on a loaded box, per round trip of every batch whatever its size. Held, the connection
    needs none of that: every reply is read before a call returns, and a call cut off before that
    closes the connection, which redis-py opens again at the next write. A broken connection sends
    the call through redis-py's own path, as ``round_trip``; one held before a fork is left to the
    parent and a new one taken. Held per client, weakly: on a cluster, a node's client dropped from
    the slot map takes its connection with it."""

    def __init__(self) -> None:
        self._held: weakref.WeakKeyDictionary[redis.Redis, tuple[int, Any]] = weakref.WeakKeyDictionary()

    def round_trip(self, client: redis.Redis, commands: Sequence[Outgoing], errors_as_replies: bool = False) -> list[Any]:
        """``round_trip(client, commands, errors_as_replies)`` on the held connection."""
        if client.connection is not None:  # a client with a single dedicated connection
            return round_trip(client, commands, errors_as_replies)
        held = self._held.get(client)
        if held is None or held[0] != os.getpid():
            held = self._held[client] = (os.getpid(), client.connection_pool.get_connection())
        replies = _sent(held[1], commands, errors_as_replies)
        return replies if replies is not None else _through_redis_py(client, commands, errors_as_replies)


def _sent(conn: Any, commands: Sequence[Outgoing], errors_as_replies: bool) -> list[Any] | None:
    """The replies of ``commands`` on ``conn``, or None when the connection broke: it is closed, and
    the caller sends them through redis-py. A call cut off before every reply was read closes the
    connection too, so no later call on it reads a reply that is not its own."""
    try:
        return _send(conn, commands, errors_as_replies)
    except redis.ResponseError:  # raised once every reply was read: the connection is clean
        raise
    except (redis.ConnectionError, redis.TimeoutError):
        conn.disconnect()
        return None
    except BaseException:
        conn.disconnect()
        raise


def _through_redis_py(client: redis.Redis, commands: Sequence[Outgoing], errors_as_replies: bool) -> list[Any]:
    """``commands`` one by one on redis-py's own path, which reconnects and retries as the client
    is configured to."""
    return [_executed(client, c, errors_as_replies) for c in commands]


def _executed(client: redis.Redis, command: Outgoing, errors_as_replies: bool) -> Any:
    try:
        return client.execute_command(*(command.command() if isinstance(command, Packed) else command))
    except redis.ResponseError as exc:
        if errors_as_replies:
            return exc
        raise


def _send(conn: Any, commands: Sequence[Outgoing], errors_as_replies: bool = False) -> list[Any]:
    """``commands`` written to ``conn`` at once, every reply read back; the first error reply raised
    (or, ``errors_as_replies``, kept as its command's reply).

    One buffer, one write: redis-py writes each piece of a list with a system call of its own, and
    on loopback every write also costs Redis a wake-up and a read (≈ 100 µs of both sides' CPU on
    a loaded box, per command of a batch spanning shards)."""
    packed = [c.data if isinstance(c, Packed) else pack(c) for c in commands]
    conn.send_packed_command([b"".join(packed)], check_health=False)
    replies: list[Any] = []
    error: redis.ResponseError | None = None
    for _ in commands:
        try:
            replies.append(conn.read_response())
        except redis.ResponseError as exc:
            replies.append(exc)
            error = error or exc
    if error is not None and not errors_as_replies:
        raise error
    return replies


class Watch:
    """One pooled connection held from a WATCH to its EXEC (WATCH belongs to a connection): the
    watched keys are read together with other commands in one round trip, what is to be written is
    sent as one MULTI/EXEC in one more, applied only if no watched key changed in between.

    A fenced write checks the fence's value itself in the first round trip and leaves the atomic
    comparison with the write to WATCH, so it costs Redis plain commands, not a script passing every
    argument through. Whatever breaks off closes the connection, which may be left with a WATCH or
    an open MULTI."""

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._conn = self._pool.get_connection()
        self._watching = False

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        try:
            if kind is not None:
                self._conn.disconnect()
            elif self._watching:
                _send(self._conn, [("UNWATCH",)])
        finally:
            self._pool.release(self._conn)

    def read(self, keys: Sequence[str], commands: Sequence[Outgoing] = ()) -> tuple[list[Any], list[Any]]:
        """WATCH ``keys``, then their values (one MGET) and the raw replies of ``commands``, in one
        round trip; the first error reply is raised once every reply is read."""
        self._watching = True
        replies = _send(self._conn, [("WATCH", *keys), ("MGET", *keys), *commands])
        return replies[1], replies[2:]

    def execute(self, commands: Sequence[Command]) -> bool:
        """``commands`` in one MULTI/EXEC: True when applied, False when a watched key changed since
        the ``read`` (nothing written); an error reply of one of the commands is raised."""
        self._watching = False
        applied = _send(self._conn, [("MULTI",), *commands, ("EXEC",)])[-1]
        if applied is None:
            return False
        failed = [reply for reply in applied if isinstance(reply, redis.ResponseError)]
        if failed:
            raise failed[0]
        return True


def pack(command: Command) -> bytes:
    """``command`` in the Redis protocol, packed by hiredis in one C call."""
    # hiredis's stub types the command as a tuple of one argument.
    packed: bytes = hiredis.pack_command(command)  # type: ignore[arg-type]
    return packed


def sharing_tail(heads: Sequence[Command], tail: Sequence[str]) -> list[Packed]:
    """The commands ``head + tail`` for each of ``heads``, ``tail`` packed once for all.

    Why: hiredis packs ≈ 0.1 µs an argument, and a batch's read sends its ≈ 1,000 user names in
    each state period's HMGET; the Redis protocol of a command is its argument count, then each
    argument's, so the names' part is the same bytes in each command, behind its own count and
    head."""
    shared = tuple(tail)
    packed = _arguments(shared)
    return [Packed(b"*%d\r\n%b%b" % (len(head) + len(shared), _arguments(head), packed), head, shared) for head in heads]


def _arguments(command: Command) -> bytes:
    """``command`` in the Redis protocol without its count line: its arguments' part."""
    packed = pack(command)
    return packed[packed.index(b"\n") + 1 :]


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
