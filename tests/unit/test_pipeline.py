"""One decision each, no server: which publish failures are retried with the same id and which are refusals,
how an event is prepared, and what the facade counts as dropped."""

from __future__ import annotations

import asyncio

import msgspec
import nats.errors
import pytest
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError, ServerError, ServiceUnavailableError

from bus import envelope as env
from bus.catalog import EventValidationError
from bus.letta import BusStats, LettaEventBus
from bus.pipeline import is_refusal, is_retryable, prepare
from bus.publisher import EventPublisher
from config.settings import Settings
from tests.helpers import CATALOG_SAMPLES

SETTINGS = Settings(_env_file=None, nats_url="nats://127.0.0.1:1")


@pytest.mark.parametrize("failure", [
    nats.errors.TimeoutError(), asyncio.TimeoutError(), NoStreamResponseError(),
    ServiceUnavailableError(code=503, description="JetStream system temporarily unavailable"),
    ServerError(code=500, description="internal"), nats.errors.ConnectionClosedError(),
    nats.errors.OutboundBufferLimitError(), ConnectionRefusedError(), nats.errors.ConnectionReconnectingError(),
])
def test_transient_failures_are_retried(failure):
    assert is_retryable(failure) and not is_refusal(failure)


@pytest.mark.parametrize("failure", [
    BadRequestError(code=400, err_code=10054, description="message size exceeds maximum allowed"),
    APIError(code=409, description="stream sealed"), nats.errors.MaxPayloadError(), nats.errors.BadHeaderError(),
])
def test_refusals_are_not_retried(failure):
    assert is_refusal(failure) and not is_retryable(failure)


def test_unknown_failures_are_not_refusals():
    """The buffer retries what it cannot classify (bounded by its size) rather than dropping it."""
    assert not is_refusal(RuntimeError("?")) and not is_retryable(RuntimeError("?"))


def test_prepare_carries_the_event_id_as_nats_msg_id():
    envelope = EventPublisher(SETTINGS).build("agent-1", "agent.step.completed", CATALOG_SAMPLES["agent.step.completed"],
                                              organization_id="org-1")
    item = prepare(SETTINGS, envelope)
    assert item.subject == "letta.agent.step.completed" and item.event_id == envelope.event_id
    assert item.headers[env.H_MSG_ID] == envelope.event_id and item.headers[env.H_ORG_ID] == "org-1"
    assert msgspec.json.decode(item.body) == msgspec.to_builtins(envelope)


def test_prepare_refuses_oversized_events_naming_the_setting():
    small = SETTINGS.model_copy(update={"max_event_bytes": 300})
    envelope = EventPublisher(small).build("agent-1", "agent.step.cancelled", {"step_id": "s", "pad": "x" * 300})
    with pytest.raises(EventValidationError, match="LETTA_BUS_MAX_EVENT_BYTES=300"):
        prepare(small, envelope)


def test_dropped_sums_every_kind_of_loss():
    stats = BusStats(accepted=10, published=4, invalid=3, dropped_full=2, dropped_refused=1, dropped_on_close=5)
    assert stats.dropped == 8 and stats.as_dict()["dropped"] == 8 and stats.as_dict()["invalid"] == 3


async def test_refuse_new_when_the_buffer_is_full():
    """Without a broker (never started): the first buffer_max events are kept, later ones refused and counted."""
    bus = LettaEventBus(SETTINGS, mode="fire_and_forget", buffer_max=3)
    ids = [bus.enqueue(agent_id="agent-1", event_type="agent.step.cancelled", payload={"step_id": f"s{i}"})
           for i in range(5)]
    assert all(ids[:3]) and ids[3:] == [None, None]
    assert bus.pending == 3 and bus.stats.dropped_full == 2 and bus.stats.accepted == 5


@pytest.mark.parametrize("kwargs", [dict(mode="sometimes"), dict(buffer_max=-1), dict(batch_size=-5)])
def test_bad_configuration_is_refused(kwargs):
    with pytest.raises(ValueError):
        LettaEventBus(SETTINGS, **kwargs)
