"""``LETTA_BUS_EVENT_LOOP`` picks the event loop ``letta-bus up`` runs on (dispatcher.cli.runtime.run_loop)."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from config.settings import Settings
from dispatcher.cli.runtime import run_loop


def _loop_module(event_loop: str) -> str:
    seen: list[str] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    run_loop(main(), Settings(_env_file=None, event_loop=event_loop))
    return seen[0]


def test_uvloop_by_default_and_asyncio_when_asked():
    assert Settings(_env_file=None).event_loop == "uvloop"
    assert _loop_module("uvloop").startswith("uvloop")
    assert _loop_module("asyncio").startswith("asyncio")


def test_an_unknown_event_loop_names_the_setting(monkeypatch):
    monkeypatch.setenv("LETTA_BUS_EVENT_LOOP", "trio")
    with pytest.raises(ValidationError, match="event_loop"):
        Settings(_env_file=None)
