"""Putting transactions on the input stream.

``publish`` is the one way fraudd writes to ``transactions:raw`` (the demo, the benchmark's
producer, DLQ replay): one script call per chunk appends many entries, which costs Redis and the
client a fraction of one XADD command per message.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

CHUNK = 1000

_XADD_MANY = """
local ids = {}
for i = 1, #ARGV do
  ids[i] = redis.call('XADD', KEYS[1], '*', 'data', ARGV[i])
end
return ids
"""


class Publisher:
    """Appends payloads (the ``data`` field of DESIGN.md's input message) to a stream."""

    def __init__(self, client: redis.Redis, stream: str) -> None:
        self._stream = stream
        self._script = client.register_script(_XADD_MANY)

    def publish(self, payloads: Sequence[bytes]) -> list[str]:
        """Append ``payloads`` in order; returns their entry ids."""
        ids: list[str] = []
        for start in range(0, len(payloads), CHUNK):
            reply = self._script(keys=[self._stream], args=list(payloads[start : start + CHUNK]))
            ids += [i.decode() if isinstance(i, bytes) else i for i in reply]
        return ids
