"""The way into fraudd: putting transactions on the input stream."""

from .publisher import Publisher

__all__ = ["Publisher"]
