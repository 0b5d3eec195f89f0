"""Helpers shared by the ``letta-bus`` commands: settings with readable errors, consoles, exits, and running an
action against the store, NATS or the management API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from config.settings import Settings

console = Console()
err = Console(stderr=True)
T = TypeVar("T")


def settings_or_exit() -> Settings:
    """``Settings()``, or exit 2 naming each bad ``LETTA_BUS_*`` variable."""
    try:
        return Settings()
    except ValidationError as exc:
        for e in exc.errors():
            field = ".".join(str(p) for p in e["loc"])
            err.print(f"[red]setting LETTA_BUS_{field.upper()}[/]: {e['msg']}")
        raise typer.Exit(2) from None


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` to stderr and return the exit to raise (code 2: bad input, 1: anything else)."""
    err.print(f"[red]error[/]: {message}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)


async def with_store(settings: Settings, action):  # noqa: ANN001, ANN201
    """Run ``action(store)`` against the settings' database (migrated first), then close it."""
    from dispatcher.store.database import Store

    store = Store.from_settings(settings)
    try:
        await store.upgrade_schema()
        return await action(store)
    finally:
        await store.close()


async def with_js(settings: Settings, action, role: str = "dispatcher"):  # noqa: ANN001, ANN201
    """Run ``action(js)`` on a fresh connection to the settings' NATS server with ``role``'s credentials
    (bus/auth.py; default the dispatcher's, whose permissions cover the dead-letter commands), then drain it."""
    from bus.connection import connect

    nc = await connect(settings.client_url, name="letta-bus-cli", timeout_s=settings.connect_timeout_s,
                       settings=settings, role=role)
    try:
        return await action(nc.jetstream())
    finally:
        await nc.drain()


def api_call(settings: Settings, fn: Callable[[Any], T]) -> T:
    """Run ``fn(client)`` with an :class:`dispatcher.cli.api_client.ApiClient`; API errors exit with their message
    (code 2 for 4xx but 404/409/410, 1 otherwise)."""
    from dispatcher.cli.api_client import ApiClient, ApiError, ApiUnreachable

    try:
        with ApiClient(settings) as client:
            return fn(client)
    except ApiUnreachable as exc:
        raise fail(str(exc)) from None
    except ApiError as exc:
        raise fail(f"{exc.message} (HTTP {exc.status})", 2 if exc.status in (400, 401, 422) else 1) from None
