"""A shard owned through a lease, and what a worker meets once it no longer holds it.

Leases are granted, renewed and given back by ``shards.py`` (the lease function of
``features.lua``); the calls that write for an owned shard (the features commit, the settle
script) check the lease's token atomically with their writes and raise ``Fenced`` when another
owner holds it.
"""

from __future__ import annotations

from dataclasses import dataclass


class Fenced(RuntimeError):
    """This worker's lease on the shard is gone (expired or taken over): it must not write for it."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A shard owned through a lease: its key in Redis and the token it must still hold."""

    key: str
    token: str
