"""Letta's step-complete webhook, rebuilt as a subscriber of the bus, so existing receivers keep working unchanged.

Source: Letta's ``letta/services/webhook_service.py`` (``WebhookService.notify_step_complete``): when
``STEP_COMPLETE_WEBHOOK`` is set, Letta POSTs ``{"step_id": "<id>"}`` as JSON (httpx ``json=``) with
``Authorization: Bearer <STEP_COMPLETE_KEY>`` when that key is set, a 10 s timeout, and treats any non-2xx answer
as a failure. Letta tries once and drops failures; this subscriber reads the same two variables and sends the same
request for every ``letta.agent.step.completed``, ``letta.agent.step.failed`` and ``letta.agent.step.cancelled``
event, but retries:

==================================================  ===============================================================
receiver's answer                                    what happens to the event (JetStream, own durable)
==================================================  ===============================================================
2xx                                                  ack
408, 425, 429, 5xx, timeout, connection error        ``Retry`` after 1, 2, 4, ... s (``Retry-After`` honoured), up
                                                     to ``legacy_webhook_max_backoff_s``; after
                                                     ``legacy_webhook_max_deliver`` deliveries it gives up (logged)
other 3xx / 4xx (redirects are not followed)         ``Reject``: logged, never retried (the request itself is wrong)
==================================================  ===============================================================

Isolation: its own durable (``legacy-step-complete-webhook``), its own NATS connection and its own HTTP pool, so a
slow or failing receiver delays nothing but this subscriber. The URL comes from the operator's environment, like
Letta's, so it is not put through the dispatcher's SSRF guard.
"""

from __future__ import annotations

import logging

import httpx
from nats.aio.client import Client

from bus.retry_after import parse_retry_after
from config.settings import Settings
from subscribers.outcomes import Reject, Retry
from subscribers.event import Event, Start
from subscribers.runner import Subscriber

log = logging.getLogger(__name__)

#: Event types whose steps reached a terminal state; Letta's webhook fires for each of them.
STEP_EVENT_TYPES = ("agent.step.completed", "agent.step.failed", "agent.step.cancelled")

#: Answers worth another try (the rest of 3xx/4xx will not get better by repeating the same request).
RETRYABLE_STATUS = frozenset({408, 425, 429})


def step_payload(event: Event) -> dict[str, str]:
    """The body Letta sends: ``{"step_id": "<id>"}``. Raises :class:`Reject` when the event has no string
    ``data.step_id`` (it cannot be sent)."""
    step_id = event.data.get("step_id")
    if not isinstance(step_id, str) or not step_id:
        raise Reject(f"{event.event_type} {event.event_id} has no data.step_id")
    return {"step_id": step_id}


class LegacyStepWebhook:
    """POSTs ``{"step_id"}`` to ``STEP_COMPLETE_WEBHOOK`` for every terminal step event (see the module docstring).

    ``settings``: ``step_complete_webhook`` (required), ``step_complete_key``, ``legacy_webhook_*`` and the NATS
    settings. ``nc``: an open connection to use (left open); by default it opens its own. ``base_backoff_s``: first
    retry delay in seconds (doubling each delivery, capped at ``legacy_webhook_max_backoff_s``). ``start``: where
    the durable starts when it is first created (``"new"``: steps finishing from now on).

    Raises ``ValueError`` naming ``STEP_COMPLETE_WEBHOOK`` when it is unset.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        nc: Client | None = None,
        base_backoff_s: float = 1.0,
        max_in_flight: int = 16,
        fetch_timeout_s: float = 1.0,
        start: Start = "new",
    ) -> None:
        if not settings.step_complete_webhook:
            raise ValueError("STEP_COMPLETE_WEBHOOK is not set: export the receiver's URL, as for Letta "
                             "(STEP_COMPLETE_WEBHOOK=https://example.com/step-complete, optional STEP_COMPLETE_KEY)")
        if base_backoff_s < 0:
            raise ValueError("base_backoff_s is seconds >= 0")
        self.settings = settings
        self.url = settings.step_complete_webhook
        self.base_backoff_s = float(base_backoff_s)
        headers = {}
        if settings.step_complete_key is not None and settings.step_complete_key.get_secret_value():
            headers["Authorization"] = f"Bearer {settings.step_complete_key.get_secret_value()}"
        self._headers = headers
        self._http: httpx.AsyncClient | None = None
        self._max_in_flight = max_in_flight
        self.subscriber = Subscriber(
            settings.legacy_webhook_durable,
            [settings.event_subject(t) for t in STEP_EVENT_TYPES],
            handler=self.handle,
            settings=settings,
            nc=nc,
            start=start,
            max_in_flight=max_in_flight,
            max_deliver=settings.legacy_webhook_max_deliver,
            ack_wait_s=max(settings.ack_wait_s, 2 * settings.legacy_webhook_timeout_s),
            max_backoff_s=settings.legacy_webhook_max_backoff_s,
            fetch_timeout_s=fetch_timeout_s,
            description="letta-bus legacy step-complete webhook: POST {step_id} to STEP_COMPLETE_WEBHOOK",
        )

    @property
    def stats(self):  # noqa: ANN201 - SubscriberStats
        """The subscriber's counters (:class:`subscribers.outcomes.SubscriberStats`)."""
        return self.subscriber.stats

    def backoff_s(self, num_delivered: int) -> float:
        """Seconds before retrying after delivery ``num_delivered`` (1-based) failed:
        ``base_backoff_s * 2 ** (num_delivered - 1)``, capped at ``legacy_webhook_max_backoff_s``."""
        cap = self.settings.legacy_webhook_max_backoff_s
        return float(min(self.base_backoff_s * 2 ** min(max(num_delivered - 1, 0), 62), cap))

    async def start(self) -> "LegacyStepWebhook":
        """Open the HTTP pool and start the subscriber. Raises like :meth:`subscribers.runner.Subscriber.start`."""
        self._open_http()
        try:
            await self.subscriber.start()
        except BaseException:
            await self._http.aclose()
            raise
        log.info("legacy step-complete webhook: POSTing step ids to %s (durable %s)", self.url,
                 self.settings.legacy_webhook_durable)
        return self

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop the subscriber gracefully (in-flight POSTs finish, ``timeout_s`` seconds at most), then close the
        HTTP pool. Never raises for broker errors."""
        await self.subscriber.stop(timeout_s)
        if self._http is not None:
            await self._http.aclose()

    async def run_forever(self) -> None:
        """Start, run until SIGINT/SIGTERM, stop gracefully."""
        http = self._open_http()
        try:
            await self.subscriber.run_forever()
        finally:
            await http.aclose()

    def _open_http(self) -> httpx.AsyncClient:
        """This subscriber's own connection pool: no redirects, Letta's timeout, one connection per handler slot."""
        if self._http is None or self._http.is_closed:
            self._http = httpx.AsyncClient(
                timeout=self.settings.legacy_webhook_timeout_s,
                follow_redirects=False,
                limits=httpx.Limits(max_connections=self._max_in_flight,
                                    max_keepalive_connections=self._max_in_flight),
            )
        return self._http

    async def __aenter__(self) -> "LegacyStepWebhook":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def handle(self, event: Event) -> None:
        """POST one step id. Returns on 2xx; raises :class:`Retry` or :class:`Reject` (module table)."""
        assert self._http is not None, "start() opens the HTTP pool"
        payload = step_payload(event)
        delay = self.backoff_s(event.num_delivered)
        try:
            response = await self._http.post(self.url, json=payload, headers=self._headers)
        except httpx.TimeoutException:
            raise Retry(delay, f"step {payload['step_id']}: timeout after {self.settings.legacy_webhook_timeout_s:g} s "
                               f"(attempt {event.num_delivered})") from None
        except httpx.HTTPError as exc:
            raise Retry(delay, f"step {payload['step_id']}: {type(exc).__name__}: {exc} "
                               f"(attempt {event.num_delivered})") from None
        status = response.status_code
        if 200 <= status < 300:
            log.debug("legacy step-complete webhook: step %s -> %d", payload["step_id"], status)
            return
        if status >= 500 or status in RETRYABLE_STATUS:
            hinted = parse_retry_after(response.headers.get("Retry-After"))
            if hinted is not None:  # honoured within [delay, 2 x delay], as the dispatcher does
                delay = min(max(hinted, delay), 2 * delay)
            raise Retry(delay, f"step {payload['step_id']}: HTTP {status} (attempt {event.num_delivered})")
        raise Reject(f"step {payload['step_id']}: HTTP {status} from {self.url}; not retried "
                     "(only 408, 425, 429 and 5xx are)")
