"""Moving a delivery task in time: nak with delay, re-publish at a later time, or dead-letter it.

Source: DESIGN.md, "Retries". A nak with delay keeps the task in the sender consumer's ``max_ack_pending`` window
for the whole delay, so one endpoint that is down for hours, retried by nak, would stall every endpoint. Delays up
to ``nak_max_delay_s`` are naks; longer ones ack the task and re-publish it as a JetStream message schedule
(ADR-51, nats-server >= 2.12: ``Nats-Schedule: @at <RFC 3339>`` and ``Nats-Schedule-Target``) that the server
publishes back to ``letta_webhooks.deliveries.<endpoint_id>`` when due (1-2 s after the given second). A re-published
task carries the attempts it already used in ``Letta-Prior-Attempts``, so its attempt number is
``Letta-Prior-Attempts + num_delivered``. On servers without schedules, re-publishing falls back to a nak.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from bus.envelope import H_MSG_ID
from config.settings import Settings
from dispatcher.delivery.fetching import reply_numbers

log = logging.getLogger(__name__)

H_PRIOR_ATTEMPTS = "Letta-Prior-Attempts"
H_ROUND_START = "Letta-Round-Start"  # attempts made before a manual resend: a resend gets a full set again
H_SCHEDULE = "Nats-Schedule"
H_SCHEDULE_TARGET = "Nats-Schedule-Target"
#: Schedule headers of a task: ours, and those nats-server sets on the copy a schedule fires (``Nats-Scheduler``,
#: ``Nats-Schedule-Next``). A copy re-published with the latter is refused (400 "message schedules invalid
#: scheduler"), so every re-publish of a task drops them all.
SCHEDULE_HEADERS = frozenset({H_SCHEDULE, H_SCHEDULE_TARGET, "Nats-Scheduler", "Nats-Schedule-Next"})
H_LAST_ERROR = "Letta-Last-Error"
H_ATTEMPTS = "Letta-Attempts"
H_FAILED_AT = "Letta-Failed-At"
H_BUSY = "Letta-Deferred-Busy"  # set on a task deferred because its endpoint was busy
H_RATE_SLOT = "Letta-Rate-Slot"  # Unix seconds of the agent rate-limit slot a deferred task already reserved


def prior_attempts(msg: Msg) -> int:
    """Attempts a task used before it was last re-published (0 for a task straight from fan-out)."""
    try:
        return int((msg.headers or {}).get(H_PRIOR_ATTEMPTS, 0))
    except ValueError:
        return 0


def attempt_number(msg: Msg) -> int:
    """1-based number of the attempt this delivery of ``msg`` is, counted over the delivery's whole history."""
    return prior_attempts(msg) + reply_numbers(msg)[1]


def round_attempt(msg: Msg) -> int:
    """1-based number of this attempt within its round: the first delivery, or a manual resend, which starts a
    new round with a full set of attempts (``Letta-Round-Start`` = attempts made before it)."""
    try:
        start = int((msg.headers or {}).get(H_ROUND_START, 0))
    except ValueError:
        start = 0
    return attempt_number(msg) - start


def task_ref(msg: Msg, settings: Settings) -> str:
    """The task's reference in ``Nats-Msg-Id`` values and schedule subjects: its stream sequence for a task of
    ``LETTA_WEBHOOKS`` (as always), ``<stream>-<seq>`` for one read from another stream (a parked task, from
    ``LETTA_PARKED``), so the two sequences never collide in a duplicate window. One subject token."""
    seq = reply_numbers(msg)[0]
    tokens = (msg.reply or "").split(".")
    stream = tokens[2] if len(tokens) > 2 and tokens[0] == "$JS" else msg.metadata.stream
    return str(seq) if stream == settings.webhooks_stream else f"{stream}-{seq}"


class Rescheduler:
    """Retries, deferrals and dead letters for the sender. ``schedules`` is False on servers before 2.12."""

    def __init__(self, js: JetStreamContext, settings: Settings, schedules: bool) -> None:
        self.js = js
        self.settings = settings
        self.schedules = schedules
        self.rescheduled = 0
        self.dead_lettered = 0

    async def retry(self, msg: Msg, endpoint_id: str, delay_s: float) -> None:
        """The attempt failed and another is due in ``delay_s`` seconds."""
        if delay_s <= self.settings.nak_max_delay_s or not self.schedules:
            await msg.nak(delay=delay_s)
        else:
            msg.headers.pop(H_RATE_SLOT, None)  # a retry waits for a fresh rate-limit slot
            msg.headers.pop(H_BUSY, None)
            await self._republish(msg, endpoint_id, delay_s, used=attempt_number(msg))

    async def defer(self, msg: Msg, endpoint_id: str, delay_s: float) -> None:
        """Try again in ``delay_s`` seconds without using up an attempt (circuit open, endpoint busy, agent over
        its rate limit). Falls back to a nak (which does count) on servers without schedules."""
        if not self.schedules:
            await msg.nak(delay=delay_s)
            return
        await self._republish(msg, endpoint_id, delay_s, used=attempt_number(msg) - 1)

    async def _republish(self, msg: Msg, endpoint_id: str, delay_s: float, used: int) -> None:
        at = datetime.now(timezone.utc) + timedelta(seconds=max(delay_s, 1.0) + 1.0)  # @at has whole seconds
        seq = task_ref(msg, self.settings)
        headers = {k: v for k, v in (msg.headers or {}).items() if k not in SCHEDULE_HEADERS}
        headers[H_MSG_ID] = f"schedule:{seq}"  # a repeated re-publish of the same task is dropped as a duplicate
        headers[H_PRIOR_ATTEMPTS] = str(max(used, 0))
        headers[H_SCHEDULE] = "@at " + at.strftime("%Y-%m-%dT%H:%M:%SZ")
        headers[H_SCHEDULE_TARGET] = self.settings.delivery_subject(endpoint_id)
        subject = f"{self.settings.webhooks_subject_prefix}.schedules.{endpoint_id}.{seq}"
        await self.js.publish(subject, msg.data, headers=headers, timeout=self.settings.publish_timeout_s)
        await msg.ack()
        self.rescheduled += 1

    async def dead_letter(self, msg: Msg, endpoint_id: str, attempts: int, error: str | None) -> None:
        """Copy the task to ``letta_webhooks.dead.<endpoint_id>`` with the last error, then ack it."""
        headers = {k: v for k, v in (msg.headers or {}).items() if k not in SCHEDULE_HEADERS}
        headers[H_MSG_ID] = f"dead:{task_ref(msg, self.settings)}"
        headers[H_ATTEMPTS] = str(attempts)
        headers[H_LAST_ERROR] = (error or "unknown")[:1000].replace("\r", " ").replace("\n", " ")
        headers[H_FAILED_AT] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        await self.js.publish(self.settings.dead_letter_subject(endpoint_id), msg.data, headers=headers,
                              timeout=self.settings.publish_timeout_s)
        await msg.ack()
        self.dead_lettered += 1
