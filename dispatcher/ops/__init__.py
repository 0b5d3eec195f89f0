"""Operator actions on top of the delivery engine: replay from ``LETTA_EVENTS`` (``replay``), manual retry
(``manual_retry``), dead letters (``dead_letters``), status reports (``status``) and ``ping`` (a
``webhook.test`` event sent to one endpoint, waiting for its attempt).

May import :mod:`dispatcher.delivery`, :mod:`dispatcher.store` and :mod:`dispatcher.rules`; not
:mod:`dispatcher.bridge`.
"""
