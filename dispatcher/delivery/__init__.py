"""The delivery engine: the fan-out of events into per-endpoint delivery tasks, the sender that POSTs them
(signing, the HTTP/1.1 client, outcome, retry scheduling, dead letters), and what keeps endpoints apart
(concurrency gates, circuit breakers, per-agent rate limits). ``service`` assembles it as one
:class:`~dispatcher.delivery.service.Dispatcher`; ``endpoints`` is its in-memory view of the endpoint table and
``control`` the change notices that keep that view current; ``metrics`` its Prometheus metrics.

May import :mod:`dispatcher.store` and :mod:`dispatcher.rules`.
"""
