"""Stream and consumer definitions, and idempotent provisioning.

Source: DESIGN.md, "Events" and "Delivery". ``LETTA_EVENTS`` keeps every event (limits retention, file storage,
``max_age`` = the replay window, 2-minute duplicate window). ``LETTA_WEBHOOKS`` keeps per-endpoint delivery tasks;
it is deliberately not a WorkQueue stream (nats-server #7817 lost messages with R3 WorkQueue on 2.12.3/4).
``LETTA_ADVISORIES`` keeps JetStream's MAX_DELIVERIES advisories of the dispatcher's two durables, so a message
JetStream stops delivering ends in a dead letter and a ``failed`` row (dispatcher/delivery/exhausted.py).

Provisioning creates what is missing and updates what differs; it compares by JetStream error code (10058 stream
name in use with another config, 10126 consumer replicas above the stream's while a stream scales up), never by
message text.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig,
)
from nats.js.errors import APIError, NotFoundError

from config.settings import Settings

log = logging.getLogger(__name__)

ERR_STREAM_NAME_IN_USE = 10058
ERR_STREAM_NOT_FOUND = 10059
ERR_INSUFFICIENT_RESOURCES = 10047
ERR_CONSUMER_REPLICAS_EXCEED_STREAM = 10126

#: Bytes allowed for headers on top of ``max_event_bytes`` in the events stream's ``max_msg_size``.
HEADER_ROOM = 16 * 1024

#: The fan-out's nak delay after a failed fan-out doubles from 2 s up to this many seconds.
FANOUT_MAX_RETRY_DELAY_S = 60.0


def fanout_retry_delay_s(delivered: int) -> float:
    """Seconds the fan-out waits before retrying an event it could not fan out on its ``delivered``-th delivery
    (1-based): 2, 4, 8, ... up to :data:`FANOUT_MAX_RETRY_DELAY_S`."""
    return min(2.0 ** max(delivered, 1), FANOUT_MAX_RETRY_DELAY_S)


def fanout_retry_horizon_s(settings: Settings, max_deliver: int) -> float:
    """Seconds from an event's first fan-out to its last one when every delivery fails: the nak delays, plus per
    delivery a PubAck wait (``publish_timeout_s``) and, once, an ``ack_wait_s`` (a process dying mid-fan-out)."""
    delays = sum(fanout_retry_delay_s(n) for n in range(1, max_deliver))
    return delays + max_deliver * settings.publish_timeout_s + settings.ack_wait_s


def fanout_max_deliver(settings: Settings) -> int:
    """Deliveries of one event to the fan-out before JetStream gives up on it (then dispatcher/delivery/exhausted.py
    dead-letters it): as many as fit in ``webhooks_duplicate_window_s``, so every re-fan-out of an event is inside
    the window in which LETTA_WEBHOOKS drops the tasks it stored already (task id ``<event_id>:<endpoint_id>``), and
    an endpoint reached by the first try never gets a second task. At least 2; about 20 (17 minutes) by default."""
    n = 2
    while n < 1000 and fanout_retry_horizon_s(settings, n + 1) <= settings.webhooks_duplicate_window_s:
        n += 1
    return n

#: JetStream's advisory when a consumer stops delivering a message at ``max_deliver``:
#: ``<prefix>.<stream>.<consumer>``, body ``{"stream", "consumer", "stream_seq", "deliveries", ...}``.
MAX_DELIVERIES_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"

#: Advisories ``LETTA_ADVISORIES`` keeps at most (about 250 bytes each); past it the oldest go first.
ADVISORIES_MAX_MSGS = 1_000_000

#: Deliveries of one advisory to the exhaustion handler; it naks a failed one with delays doubling from 1 s to 60 s,
#: so about 16 hours of retries before the advisory itself is given up (logged by the server as its own advisory).
EXHAUSTED_MAX_DELIVER = 1000


def events_stream_config(settings: Settings) -> StreamConfig:
    """``LETTA_EVENTS``: subjects ``letta.>``; ``max_age`` from ``events_max_age_s`` (seconds)."""
    return StreamConfig(
        name=settings.events_stream,
        description="Letta agent lifecycle events (envelope JSON, one subject per event type). Replay window = max_age.",
        subjects=[f"{settings.subject_prefix}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=settings.stream_replicas,
        max_age=settings.events_max_age_s,
        duplicate_window=settings.duplicate_window_s,
        max_msg_size=settings.max_event_bytes + HEADER_ROOM,  # the server counts headers, the limit is on bodies
        allow_direct=True,  # replay and manual retry read stored events by direct get (bus/direct_get.py)
        metadata={"letta_bus.role": "events", "letta_bus.envelope": "event_id,event_type,timestamp,agent_id,organization_id,data"},
    )


def supports_schedules(nc: Client) -> bool:
    """True when the connected server runs JetStream message schedules (ADR-51: nats-server >= 2.12)."""
    version = nc.connected_server_version
    return (version.major, version.minor) >= (2, 12)


def webhooks_stream_config(settings: Settings, *, schedules: bool = True) -> StreamConfig:
    """``LETTA_WEBHOOKS``: subjects ``letta_webhooks.>``: ``deliveries.<endpoint_id>`` tasks,
    ``schedules.<endpoint_id>.<seq>`` retries waiting for their time, ``dead.<endpoint_id>`` dead letters and
    ``endpoint.disabled`` operational events. Tasks must outlive the retry schedule, so ``max_age`` is twice the
    replay window; ``max_bytes`` bounds it, dropping the oldest messages when full (acked tasks, by then: the sender
    reads the stream in order, and parked backlogs live in their own stream); its duplicate
    window covers the fan-out's retry horizon (:func:`fanout_max_deliver`). ``schedules`` enables message schedules
    (pass :func:`supports_schedules`)."""
    return StreamConfig(
        name=settings.webhooks_stream,
        description="Webhook delivery tasks (deliveries.<endpoint_id>), scheduled retries (schedules.>), "
        "dead letters (dead.<endpoint_id>) and operational events (endpoint.>).",
        allow_msg_schedules=True if schedules else None,
        subjects=[f"{settings.webhooks_subject_prefix}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=settings.stream_replicas,
        max_age=2 * settings.events_max_age_s,
        max_bytes=settings.webhooks_max_bytes,
        discard=DiscardPolicy.OLD,  # nats-server: "message scheduling cannot use discard new" (error 10052)
        duplicate_window=settings.webhooks_duplicate_window_s,
        metadata={"letta_bus.role": "webhook-deliveries"},
    )


def parked_stream_config(settings: Settings) -> StreamConfig:
    """``LETTA_PARKED``: subjects ``letta_parked.<endpoint_id>``, the backlogs of endpoints whose circuit is open
    (dispatcher/delivery/parking.py), one durable ``parked-<endpoint_id>`` each, made by the dispatcher. Limits
    retention (a drained subject is purged up to its consumer's ack floor), file storage, no message schedules, so
    it can use ``max_bytes`` = ``parked_max_bytes`` with discard NEW: a full stream refuses a park and the sender
    defers the task as before, nothing parked is ever dropped for room. ``max_age`` keeps a parked task at least as
    long as ``LETTA_WEBHOOKS`` keeps one (twice the replay window) and at least ``disable_after_s`` plus the retry
    schedule and the longest cool-down (the latest a parked task is settled: delivered, or failed at disable);
    seconds. Duplicate window as ``LETTA_WEBHOOKS`` (``Nats-Msg-Id = park:<seq>``: a redelivered task parks once)."""
    horizon = settings.disable_after_s + sum(settings.retry_schedule_s) + settings.circuit_max_cooldown_s
    max_age = max(2 * settings.events_max_age_s, horizon + 86_400.0)
    return StreamConfig(
        name=settings.parked_stream,
        description="Backlogs of endpoints whose circuit is open (letta_parked.<endpoint_id>), each read by a "
        "paused durable parked-<endpoint_id> that probes once per cool-down.",
        subjects=[f"{settings.parked_subject_prefix}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=settings.stream_replicas,
        max_age=max_age,
        max_bytes=settings.parked_max_bytes,
        discard=DiscardPolicy.NEW,
        duplicate_window=min(settings.webhooks_duplicate_window_s, max_age),
        metadata={"letta_bus.role": "parked-backlogs"},
    )


def max_deliveries_subject(stream: str, consumer: str) -> str:
    """Subject of the MAX_DELIVERIES advisory of one consumer, ``<MAX_DELIVERIES_ADVISORY>.<stream>.<consumer>``;
    nats-server publishes it in the consumer's account when a message has reached ``max_deliver``."""
    return f"{MAX_DELIVERIES_ADVISORY}.{stream}.{consumer}"


def advisories_stream_config(settings: Settings) -> StreamConfig:
    """``LETTA_ADVISORIES``: the MAX_DELIVERIES advisories of the dispatcher's two durables (``webhook-fanout`` on
    the events stream, ``webhook-sender`` on the webhooks stream), kept on file so an advisory published while no
    dispatcher runs its exhaustion handler is processed later (dispatcher/delivery/exhausted.py). Other services'
    durables are not captured. Bounded: ``max_age`` = the replay window (the events it names are gone after it),
    at most :data:`ADVISORIES_MAX_MSGS` messages (the oldest, already processed ones, are dropped first)."""
    return StreamConfig(
        name=settings.advisories_stream,
        description="JetStream MAX_DELIVERIES advisories of webhook-fanout and webhook-sender: each becomes a dead "
        "letter and a failed delivery row (letta-bus dispatcher, durable webhook-exhausted).",
        subjects=[max_deliveries_subject(settings.events_stream, settings.fanout_durable),
                  max_deliveries_subject(settings.webhooks_stream, settings.sender_durable)],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=settings.stream_replicas,
        max_age=settings.events_max_age_s,
        max_msgs=ADVISORIES_MAX_MSGS,
        discard=DiscardPolicy.OLD,
        metadata={"letta_bus.role": "max-deliver-advisories"},
    )


def exhausted_consumer_config(settings: Settings) -> ConsumerConfig:
    """Durable ``webhook-exhausted`` on ``LETTA_ADVISORIES``: the dispatcher dead-letters and fails what each
    advisory names, then acks it (a failure naks it, retried up to :data:`EXHAUSTED_MAX_DELIVER` times)."""
    return ConsumerConfig(
        durable_name=settings.exhausted_durable,
        name=settings.exhausted_durable,
        description="letta-bus dispatcher: max_deliver exhausted -> dead letter + failed delivery row",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        max_deliver=EXHAUSTED_MAX_DELIVER,
        max_ack_pending=64,
        num_replicas=settings.stream_replicas,
    )


def fanout_consumer_config(settings: Settings) -> ConsumerConfig:
    """Durable ``webhook-fanout`` on ``LETTA_EVENTS``: turns each event into one delivery task per endpoint."""
    return ConsumerConfig(
        durable_name=settings.fanout_durable,
        name=settings.fanout_durable,
        description="letta-bus dispatcher: event -> one delivery task per matching endpoint",
        deliver_policy=DeliverPolicy.NEW,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        max_deliver=fanout_max_deliver(settings),
        max_ack_pending=settings.max_ack_pending,
        filter_subject=f"{settings.subject_prefix}.>",
        num_replicas=settings.stream_replicas,
    )


def sender_consumer_config(settings: Settings) -> ConsumerConfig:
    """Durable ``webhook-sender`` on ``LETTA_WEBHOOKS``: POSTs each delivery task; ``max_deliver`` = attempts."""
    return ConsumerConfig(
        durable_name=settings.sender_durable,
        name=settings.sender_durable,
        description="letta-bus dispatcher: signed HTTP POST of each delivery task",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_attempts,
        max_ack_pending=settings.max_ack_pending,
        filter_subject=f"{settings.webhooks_subject_prefix}.deliveries.>",
        num_replicas=settings.stream_replicas,
    )


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or update it when it exists with another config. Raises ``nats.js.errors.APIError``
    when the server refuses both (e.g. subjects overlapping another stream, or a change it cannot apply)."""
    try:
        await js.add_stream(config)
        return
    except APIError as exc:
        # 10047: the server counts an existing stream's max_bytes twice against max_file_store when it is added
        # again (LETTA_WEBHOOKS and LETTA_PARKED reserve 4 GiB each by default): an update counts it once
        if exc.err_code == ERR_INSUFFICIENT_RESOURCES and await _exists(js, config.name):
            await js.update_stream(config)
            return
        if exc.err_code != ERR_STREAM_NAME_IN_USE:
            raise
    log.info("stream %s exists with another config; updating it", config.name)
    await js.update_stream(config)


async def _exists(js: JetStreamContext, stream: str) -> bool:
    try:
        await js.stream_info(stream)
    except NotFoundError:
        return False
    return True


async def ensure_consumer(js: JetStreamContext, stream: str, config: ConsumerConfig, *, wait_s: float = 10.0) -> None:
    """Create the durable consumer or update it in place (the server's create-or-update). Raises
    ``nats.js.errors.APIError`` when the change is not allowed (e.g. a different deliver_policy).

    A stream that was just given more replicas (R1 -> R3 on a cluster) takes a moment (about 0.2 s here) to add
    them, and until then the server refuses a consumer with as many replicas (error 10126): that refusal is retried
    for at most ``wait_s`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    delay = 0.05
    while True:
        try:
            await js.add_consumer(stream, config)
            return
        except APIError as exc:
            if exc.err_code != ERR_CONSUMER_REPLICAS_EXCEED_STREAM or loop.time() + delay > deadline:
                raise
        log.info("stream %s is still adding replicas; retrying consumer %s in %.2f s", stream, config.name, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


async def provision(js: JetStreamContext, settings: Settings, *, schedules: bool = True) -> None:
    """Create or update the four streams (events, webhooks, parked, advisories) and the dispatcher's three durable
    consumers (the parked backlogs' durables are the dispatcher's to make). Idempotent. ``schedules``: see
    :func:`webhooks_stream_config`. The advisories stream is created before the durables, so it captures from their
    first delivery on."""
    await ensure_stream(js, events_stream_config(settings))
    await ensure_stream(js, webhooks_stream_config(settings, schedules=schedules))
    await ensure_stream(js, parked_stream_config(settings))
    await ensure_stream(js, advisories_stream_config(settings))
    await ensure_consumer(js, settings.advisories_stream, exhausted_consumer_config(settings))
    await ensure_consumer(js, settings.events_stream, fanout_consumer_config(settings))
    await ensure_consumer(js, settings.webhooks_stream, sender_consumer_config(settings))
