"""fraudd's benchmark: ``python -m bench throughput | latency | soak``.

Every figure is measured against a real ``fraudd run`` subprocess on the machine's Redis and
PostgreSQL, in a namespace of its own (streams, key tag and PostgreSQL schema) that is dropped
afterwards, and is reported beside baselines run in the same invocation on the same transactions:
the machine's speed drifts between hours, so only ratios measured side by side mean anything.
"""
