"""Dead letters: delivery tasks whose last attempt failed, kept on ``letta_webhooks.dead.<endpoint_id>``.

Operators read them with the nats CLI (``nats stream view LETTA_WEBHOOKS --subject 'letta_webhooks.dead.>'``:
the body is the event envelope, the headers say the endpoint, delivery, attempts, last error and time) or with
``letta-bus dead-letters list``, and send them again with ``letta-bus dead-letters resend``: each becomes a delivery
task again, with a full set of attempts (numbered after the earlier ones, on the same delivery row), and the dead
letter is removed so a second resend cannot duplicate it.
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bus.envelope import H_MSG_ID
from config.settings import Settings
from dispatcher.delivery.fetching import fetch
from dispatcher.delivery.scheduling import (
    H_ATTEMPTS, H_FAILED_AT, H_LAST_ERROR, H_PRIOR_ATTEMPTS, H_RATE_SLOT, H_ROUND_START,
)
from dispatcher.delivery.tasks import TaskInfo


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter: its stream sequence, the task identity, attempts used, last error and failure time."""

    seq: int
    task: TaskInfo
    attempts: int
    last_error: str
    failed_at: str
    headers: dict[str, str]
    body: bytes


async def list_dead_letters(js: JetStreamContext, settings: Settings, endpoint_id: str | None = None,
                            limit: int = 10_000) -> list[DeadLetter]:
    """Dead letters, oldest first (at most ``limit``), for one endpoint or all. Reads with an ephemeral
    consumer that acks nothing, so listing changes nothing."""
    subject = settings.dead_letter_subject(endpoint_id or "*")
    if endpoint_id is not None:  # none for this endpoint: answer at once instead of after a fetch timeout
        info = await js.stream_info(settings.webhooks_stream, subjects_filter=subject)
        if not (info.state.subjects or {}).get(subject):
            return []
    sub = await js.pull_subscribe(subject, stream=settings.webhooks_stream, config=ConsumerConfig(
        ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0))
    found: list[DeadLetter] = []
    try:
        while len(found) < limit:
            msgs = await fetch(sub, min(256, limit - len(found)), "dead-letters", timeout_s=0.5)
            if not msgs:
                break
            for m in msgs:
                h = dict(m.headers or {})
                found.append(DeadLetter(
                    seq=m.metadata.sequence.stream, task=TaskInfo.from_headers(h), attempts=int(h.get(H_ATTEMPTS, 0)),
                    last_error=h.get(H_LAST_ERROR, ""), failed_at=h.get(H_FAILED_AT, ""), headers=h, body=m.data))
            if msgs[-1].metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return found


async def resend(js: JetStreamContext, settings: Settings, letters: list[DeadLetter]) -> int:
    """Publish each dead letter again as a fresh delivery task, then delete it from the stream. Returns how many
    were sent. Raises ``nats.errors.Error`` when a publish fails (the letters not yet sent stay)."""
    sent = 0
    for letter in letters:
        headers = {k: v for k, v in letter.headers.items()
                   if k not in (H_ATTEMPTS, H_LAST_ERROR, H_FAILED_AT, H_PRIOR_ATTEMPTS, H_RATE_SLOT)}
        headers[H_MSG_ID] = f"resend:{letter.seq}"
        headers[H_PRIOR_ATTEMPTS] = headers[H_ROUND_START] = str(letter.attempts)  # numbering goes on, full budget
        await js.publish(settings.delivery_subject(letter.task.endpoint_id), letter.body, headers=headers,
                         timeout=settings.publish_timeout_s)
        await js.delete_msg(settings.webhooks_stream, letter.seq)
        sent += 1
    return sent
