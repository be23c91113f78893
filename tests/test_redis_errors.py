"""``redis_error_code`` on the error replies fraudd tells apart, as a real Redis sends them."""

from __future__ import annotations

import uuid

import pytest
import redis

from fraudd.runtime.redis_clients import FUNCTION_NOT_FOUND, NO_SUCH_KEY, redis_error_code


def _error(call) -> redis.ResponseError:
    with pytest.raises(redis.ResponseError) as caught:
        call()
    return caught.value


def test_error_codes_of_real_replies(redis_client: redis.Redis) -> None:
    stream = f"test-errors-{uuid.uuid4().hex[:10]}"
    try:
        nogroup = _error(lambda: redis_client.xreadgroup("nobody", "c", {stream: ">"}))
        assert redis_error_code(nogroup) == "NOGROUP"
        redis_client.xgroup_create(stream, "g", id="0", mkstream=True)
        assert redis_error_code(_error(lambda: redis_client.xgroup_create(stream, "g", id="0"))) == "BUSYGROUP"
        fenced = _error(lambda: redis_client.eval("return redis.error_reply('FENCED the shard lease has another owner')", 0))
        assert redis_error_code(fenced) == "FENCED"
        missing_function = _error(lambda: redis_client.fcall(f"fraudd_absent_{uuid.uuid4().hex[:8]}", 0))
        assert redis_error_code(missing_function) == FUNCTION_NOT_FOUND
        assert redis_error_code(_error(lambda: redis_client.xinfo_groups(f"{stream}:absent"))) == NO_SUCH_KEY
    finally:
        redis_client.delete(stream)


def test_error_codes_of_a_pipelines_replies(redis_client: redis.Redis) -> None:
    # redis-py tells which command of a pipeline failed in front of the reply (the lease grant on a
    # Redis Cluster is FCALL and WAIT in one pipeline).
    pipeline = redis_client.pipeline(transaction=False)
    pipeline.fcall(f"fraudd_absent_{uuid.uuid4().hex[:8]}", 0)
    pipeline.execute_command("WAIT", 0, 0)
    assert redis_error_code(_error(pipeline.execute)) == FUNCTION_NOT_FOUND
    pipeline.xreadgroup("nobody", "c", {f"test-errors-{uuid.uuid4().hex[:10]}": ">"})
    assert redis_error_code(_error(pipeline.execute)) == "NOGROUP"
