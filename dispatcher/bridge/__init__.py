"""The stock-Letta bridge: an HTTP server (``server``) that takes the notifications an unmodified Letta server
sends (the step webhook, run and batch callbacks), reads the objects back through Letta's REST API
(``letta_client``) and publishes catalog events mapped by pure functions (``events``).

The Letta facade for a fork of Letta (:mod:`bus.letta`) stays in ``bus``: Letta's process imports it and must need
only ``bus``, never the dispatcher. Beside :mod:`dispatcher.ops`: may import :mod:`dispatcher.delivery`,
:mod:`dispatcher.store` and :mod:`dispatcher.rules`; not ``ops``.
"""
