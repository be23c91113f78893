"""The way into fraudd: putting transactions on the input stream.

``Publisher`` is imported when first asked for, not with the package: the package's settings are
read by every ``fraudd`` command as it starts, and the publisher brings numpy (``scoring.dedup``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .publisher import Publisher

__all__ = ["Publisher"]


def __getattr__(name: str) -> object:
    if name == "Publisher":
        from .publisher import Publisher

        return Publisher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
