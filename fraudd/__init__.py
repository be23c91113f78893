"""fraudd: real-time fraud scoring of a Redis Stream into PostgreSQL."""

__version__ = "0.1.0"
