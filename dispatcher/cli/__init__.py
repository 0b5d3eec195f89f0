"""The ``letta-bus`` command line (typer + rich; ``app`` is the entry point) and what it runs: ``runtime`` (the
whole stack of ``letta-bus up``: embedded nats-server, store, dispatcher, management API), ``demo`` and its
``receiver`` (a reference receiver that verifies both signatures), and ``api_client`` (the CLI's client of the
management API).

The top of the dispatcher: may import every package below it; nothing imports it.
"""
