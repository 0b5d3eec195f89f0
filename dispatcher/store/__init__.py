"""The dispatcher's database (SQLAlchemy 2, async; SQLite embedded, PostgreSQL in production).

``database`` (:class:`~dispatcher.store.database.Store`: engine, sessions, endpoint configuration and its write
checks), ``models`` (tables), ``secrets`` (signing secrets: generation, encryption at rest), ``history`` (the
batched delivery-history writer), ``queries`` (deliveries and attempts read back), ``migrate`` and
``migrations/`` (Alembic).

May import :mod:`dispatcher.rules` only.
"""
