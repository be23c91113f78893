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


def test_error_codes_of_replies_inside_a_pipeline(redis_client: redis.Redis) -> None:
    """redis-py names the failing command of a pipeline before the reply's message."""
    stream = f"test-errors-{uuid.uuid4().hex[:10]}"
    pipe = redis_client.pipeline(transaction=False)
    pipe.fcall(f"fraudd_absent_{uuid.uuid4().hex[:8]}", 0).execute_command("WAIT", 0, 0)
    missing_function = _error(pipe.execute)
    assert "of pipeline caused error" in str(missing_function)
    assert redis_error_code(missing_function) == FUNCTION_NOT_FOUND
    pipe = redis_client.pipeline(transaction=False)
    pipe.xreadgroup("nobody", "c", {stream: ">"})
    assert redis_error_code(_error(pipe.execute)) == "NOGROUP"
