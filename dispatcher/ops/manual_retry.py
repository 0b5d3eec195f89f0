"""Manual retry: send a delivery again, one (``POST /v1/webhook-deliveries/{id}/retry``) or all failed ones of an
agent since a time (``POST /v1/agents/{id}/webhook/retry-failed``).

The event body is read back from ``LETTA_EVENTS`` at the delivery's stream sequence (``deliveries.event_seq``),
so the webhook body is byte-for-byte the published envelope. The task goes to the sender as a dead-letter resend
does (:func:`dispatcher.ops.dead_letters.resend`): same delivery id (same row), ``Letta-Prior-Attempts`` =
``Letta-Round-Start`` = attempts made so far, so attempt numbers continue and the retry gets a full set of
attempts. The delivery is claimed (``pending``) before the publish, atomically, so two retries of one delivery
cannot both queue a task; ``Nats-Msg-Id = retry:<delivery_id>:<attempts>`` makes a repeated publish a duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from bus.envelope import H_MSG_ID, decode_head
from config.settings import Settings
from dispatcher.delivery.scheduling import H_PRIOR_ATTEMPTS, H_ROUND_START
from dispatcher.delivery.tasks import H_DELIVERY_ID, task_headers
from dispatcher.store.database import Store
from dispatcher.store.models import Delivery
from dispatcher.store.queries import claim_for_retry, failed_deliveries, get_delivery, unclaim


class RetryRefused(Exception):
    """A retry that cannot be made. ``kind``: ``not_found`` (no such delivery), ``conflict`` (its state or its
    endpoint's forbids it: in progress, endpoint deleted or disabled, no stream sequence) or ``gone`` (the event
    left the stream: older than the replay window)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


async def retry_delivery(js: JetStreamContext, settings: Settings, store: Store, delivery_id: str) -> Delivery:
    """Queue one delivery again; returns the row as it was before the retry. Raises :class:`RetryRefused`, or a
    ``nats.errors.Error`` when the publish fails (the delivery keeps its previous status then)."""
    delivery, _ = await get_delivery(store, delivery_id)
    if delivery is None:
        raise RetryRefused("not_found", f"no delivery {delivery_id}")
    if delivery.event_seq is None:
        raise RetryRefused("conflict", f"delivery {delivery_id} has no stream sequence (a test delivery, or one "
                                       "recorded before sequences were kept): it cannot be read back to retry")
    endpoint = await store.get_endpoint(delivery.endpoint_id)
    if endpoint is None:
        raise RetryRefused("conflict", f"endpoint {delivery.endpoint_id} of delivery {delivery_id} was deleted")
    if not endpoint.enabled:
        raise RetryRefused("conflict", f"endpoint {endpoint.id} is disabled ({endpoint.disabled_reason}): enable "
                                       "it first")
    if not await claim_for_retry(store, delivery_id):
        raise RetryRefused("conflict", f"delivery {delivery_id} is {delivery.status}: an attempt is already coming")
    try:
        raw = await js.get_msg(settings.events_stream, delivery.event_seq)
        head = decode_head(raw.data)
        if head.event_id != delivery.event_id:
            raise NotFoundError()
    except NotFoundError:
        await unclaim(store, delivery_id, delivery.status, delivery.last_error or "")
        raise RetryRefused("gone", f"event {delivery.event_id} (sequence {delivery.event_seq}) is no longer in "
                                   f"{settings.events_stream}: it is older than the replay window") from None
    headers = task_headers(head, delivery.endpoint_id, delivery.event_seq, delivery.replay_id)
    headers[H_DELIVERY_ID] = delivery.id
    headers[H_MSG_ID] = f"retry:{delivery.id}:{delivery.attempts}"
    headers[H_PRIOR_ATTEMPTS] = headers[H_ROUND_START] = str(delivery.attempts)
    try:
        await js.publish(settings.delivery_subject(delivery.endpoint_id), raw.data, headers=headers,
                         timeout=settings.publish_timeout_s)
    except Exception:
        await unclaim(store, delivery_id, delivery.status, delivery.last_error or "")
        raise
    return delivery


@dataclass
class BulkRetry:
    """Result of :func:`retry_failed`: ``queued`` tasks, ``refused`` (delivery id -> why), ``remaining`` failed
    deliveries past ``limit`` (call again to go on: queued ones are no longer ``failed``)."""

    queued: int = 0
    refused: dict[str, str] = field(default_factory=dict)
    remaining: int = 0


async def retry_failed(js: JetStreamContext, settings: Settings, store: Store, *, agent_id: str | None,
                       since: datetime, endpoint_ids: list[str] | None = None, limit: int = 1000) -> BulkRetry:
    """Retry every failed delivery of ``agent_id``'s events (None: any agent's) created since ``since`` (to
    ``endpoint_ids`` only, when given), oldest first, at most ``limit`` per call. Refusals are collected, not raised."""
    rows = await failed_deliveries(store, agent_id=agent_id, since=since, endpoint_ids=endpoint_ids,
                                   limit=limit + 1)
    result = BulkRetry(remaining=max(0, len(rows) - limit))
    for row in rows[:limit]:
        try:
            await retry_delivery(js, settings, store, row.id)
            result.queued += 1
        except RetryRefused as exc:
            result.refused[row.id] = str(exc)
    return result
