"""The management API (FastAPI): agents' webhooks, organization and global endpoints, delivery history, manual
retry, replay, status and health. :func:`dispatcher.api.app.create_app` builds it; ``letta-bus up`` serves it with
:class:`dispatcher.api.server.ApiServer` in the dispatcher's event loop. OpenAPI: ``/openapi.json``, ``/docs``.

May import :mod:`dispatcher.ops`, :mod:`dispatcher.bridge`, :mod:`dispatcher.delivery`, :mod:`dispatcher.store`
and :mod:`dispatcher.rules`; only :mod:`dispatcher.cli` imports it.
"""
