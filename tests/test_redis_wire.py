"""What ``fraudd.runtime.redis_wire`` relies on in redis-py's connection internals, on a real Redis:
a redis-py release that changes any of it fails here rather than on the hot path."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator

import hiredis
import pytest
import redis
import redis.asyncio
from redis.cluster import RedisCluster

from fraudd.runtime.redis_wire import HeldConnection, Watch, pack, refresh_slots, round_trip, round_trip_async, sharing_tail

from .conftest import REDIS_URL


@pytest.fixture
def key(redis_client: redis.Redis) -> Iterator[str]:
    name = f"test-wire-{uuid.uuid4().hex[:10]}"
    yield name
    redis_client.delete(name, f"{name}:lease")


def test_round_trip_returns_raw_replies_in_order(redis_client: redis.Redis, key: str) -> None:
    replies = round_trip(
        redis_client, [("HSET", key, "a", b"\x00\x01", "b", 2), ("HMGET", key, "a", "b", "c"), ("PEXPIRE", key, 60_000)]
    )
    assert replies == [2, [b"\x00\x01", b"2", None], 1]
    # The connection went back to the pool, with nothing left unread on it.
    assert redis_client.connection_pool._in_use_connections == set()
    assert redis_client.ping() is True


def test_round_trip_reads_every_reply_then_raises_the_first_error(redis_client: redis.Redis, key: str) -> None:
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        round_trip(redis_client, [("SET", key, "x"), ("HSET", key, "a", 1), ("LPUSH", key, 1), ("GET", key)])
    # The replies after the error were read too: the next command meets its own reply.
    assert redis_client.get(key) == b"x"
    assert round_trip(redis_client, [("GET", key)]) == [b"x"]


def test_round_trip_on_a_single_connection_client_takes_redis_pys_path(key: str) -> None:
    client = redis.Redis.from_url(REDIS_URL, protocol=2, single_connection_client=True)
    try:
        assert client.connection is not None
        assert round_trip(client, [("SET", key, "y"), ("GET", key)]) == [True, b"y"]
    finally:
        client.close()


def test_commands_sharing_a_tail_are_packed_as_each_whole_command() -> None:
    tail = ["a", "é", "", "x" * 300]
    heads = [("HMGET", "k:1"), ("HMGET", "key:22"), ("EXISTS",)]
    assert [p.data for p in sharing_tail(heads, tail)] == [pack((*head, *tail)) for head in heads]
    assert [p.command() for p in sharing_tail(heads, tail)] == [(*head, *tail) for head in heads]


def test_commands_sharing_a_tail_go_through_both_paths(redis_client: redis.Redis, key: str) -> None:
    redis_client.hset(key, mapping={"a": 1, "c": 3})
    shared = sharing_tail([("HMGET", key), ("HMGET", f"{key}:absent")], ["a", "b", "c"])
    expected = [[b"1", None, b"3"], [None, None, None]]
    assert round_trip(redis_client, shared) == expected
    client = redis.Redis.from_url(REDIS_URL, protocol=2, single_connection_client=True)
    try:
        assert round_trip(client, shared) == expected
    finally:
        client.close()


def test_round_trip_after_the_server_closed_the_connection_goes_through_redis_py(redis_client: redis.Redis, key: str) -> None:
    redis_client.set(key, "z")
    name = f"wire-{uuid.uuid4().hex[:8]}"
    redis_client.client_setname(name)
    killer = redis.Redis.from_url(REDIS_URL, protocol=2)
    try:
        clients = [c for c in killer.client_list() if c.get("name") == name]
        assert clients
        killer.client_kill_filter(_id=clients[0]["id"])
    finally:
        killer.close()
    # The pooled connection is dead; the round trip reconnects through redis-py and still answers.
    assert round_trip(redis_client, [("GET", key)]) == [b"z"]


def test_held_connection_serves_every_round_trip_and_reads_every_reply(redis_client: redis.Redis, key: str) -> None:
    held = HeldConnection()
    first = held.round_trip(redis_client, [("CLIENT", "ID"), ("SET", key, "v")])
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        held.round_trip(redis_client, [("HSET", key, "a", 1), ("GET", key)])
    assert held.round_trip(redis_client, [("CLIENT", "ID"), ("GET", key)]) == [first[0], b"v"]
    # Held out of the pool: the client's own commands take another connection.
    assert redis_client.client_id() != first[0]


def test_held_connection_closed_by_the_server_answers_and_is_opened_again(redis_client: redis.Redis, key: str) -> None:
    redis_client.set(key, "z")
    held = HeldConnection()
    (connection,) = held.round_trip(redis_client, [("CLIENT", "ID")])
    redis_client.client_kill_filter(_id=connection)
    # This call meets the closed connection and goes through redis-py; the next opens it again.
    assert held.round_trip(redis_client, [("GET", key)]) == [b"z"]
    reopened, value = held.round_trip(redis_client, [("CLIENT", "ID"), ("GET", key)])
    assert value == b"z" and reopened != connection


def test_held_connection_cut_off_mid_reply_is_not_read_again(redis_client: redis.Redis, key: str, monkeypatch) -> None:
    redis_client.set(key, "w")
    held = HeldConnection()
    held.round_trip(redis_client, [("PING",)])
    ((_, connection),) = held._held.values()

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(connection, "read_response", interrupted)
    with pytest.raises(KeyboardInterrupt):
        held.round_trip(redis_client, [("GET", key)])
    monkeypatch.undo()
    # The unread reply went with the closed connection: the next call meets its own.
    assert held.round_trip(redis_client, [("SET", key, "u"), ("GET", key)]) == [b"OK", b"u"]


def test_held_connection_of_a_parent_process_is_not_used_after_a_fork(redis_client: redis.Redis, key: str) -> None:
    held = HeldConnection()
    (parents,) = held.round_trip(redis_client, [("CLIENT", "ID")])
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        try:
            (own,) = held.round_trip(redis_client, [("CLIENT", "ID")])
            os.write(writer, b"ok" if own != parents else b"shared")
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    assert os.read(reader, 16) == b"ok"
    assert held.round_trip(redis_client, [("CLIENT", "ID")]) == [parents]


def test_watch_applies_only_while_no_watched_key_changed(redis_client: redis.Redis, key: str) -> None:
    lease = f"{key}:lease"
    redis_client.set(lease, "1:me")
    with Watch(redis_client) as watch:
        assert watch.read([lease], [("HSET", key, "a", 0)]) == ([b"1:me"], [1])
        assert watch.execute([("HSET", key, "a", 1), ("PEXPIRE", key, 60_000)]) is True
    assert redis_client.hgetall(key) == {b"a": b"1"}

    with Watch(redis_client) as watch:
        assert watch.read([lease]) == ([b"1:me"], [])
        redis_client.set(lease, "2:other")  # another connection: a new owner
        assert watch.execute([("HSET", key, "a", 2)]) is False
    assert redis_client.hgetall(key) == {b"a": b"1"}

    with Watch(redis_client) as watch:
        watch.read([lease])  # watched, then left without a write: unwatched on the way out
    # No WATCH is left on the pooled connection: a MULTI/EXEC after a change of the key applies.
    conn = redis_client.connection_pool.get_connection()
    try:
        conn.send_packed_command([hiredis.pack_command(c) for c in (("SET", lease, "3"), ("MULTI",), ("GET", lease), ("EXEC",))])
        assert [conn.read_response() for _ in range(4)][-1] == [b"3"]
    finally:
        redis_client.connection_pool.release(conn)


def test_watch_raises_an_error_reply_inside_the_transaction(redis_client: redis.Redis, key: str) -> None:
    lease = f"{key}:lease"
    redis_client.set(lease, "1:me")
    redis_client.set(key, "a string")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"), Watch(redis_client) as watch:
        watch.read([lease])
        watch.execute([("HSET", key, "a", 1)])
    assert redis_client.get(key) == b"a string"
    assert redis_client.ping() is True


def test_round_trip_async_returns_raw_replies_and_raises_error_replies(key: str) -> None:
    async def scenario() -> None:
        client = redis.asyncio.Redis.from_url(REDIS_URL, protocol=2)
        try:
            packed = [hiredis.pack_command(c) for c in (("SET", key, "v"), ("GET", key))]
            assert await round_trip_async(client, packed) == [b"OK", b"v"]
            with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
                await round_trip_async(client, [hiredis.pack_command(("HGET", key, "f"))])
            # The connection cut off after the error was closed: the next round trip starts clean.
            assert await round_trip_async(client, [hiredis.pack_command(("GET", key))]) == [b"v"]
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_refresh_slots_learns_a_forgotten_slot_map(cluster_client: RedisCluster) -> None:
    key = "{wire}:probe"
    cluster_client.set(key, "m")
    cluster_client.nodes_manager.slots_cache.clear()
    with pytest.raises(redis.exceptions.RedisClusterException):
        cluster_client.get_node_from_key(key)
    refresh_slots(cluster_client)
    assert cluster_client.get_redis_connection(cluster_client.get_node_from_key(key)).get(key) == b"m"
