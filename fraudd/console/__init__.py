"""``fraudd console``: the web application where analysts work fraudd's review and decline decisions.

A service on the runtime like the ingest: server processes under the supervisor share one socket;
the supervisor's housekeeping turns new decisions into cases, returns expired leases to the queue
and sets the queue's gauges. Handlers (``views``) are thin: SQL lives in one module per concern
(``queue``, ``cases``, ``audit``, ``users``, ``sessions``), a verdict's whole effect in ``verdicts``.
"""
