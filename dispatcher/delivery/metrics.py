"""Prometheus metrics of the delivery engine, and the structured log line written for every attempt.

Counters and histograms are module-level (one set per process, as Prometheus expects); the history writer's
counters (``letta_bus_history_records_refused_total``, ``letta_bus_history_records_lost_total``) and the
max_deliver counter (``letta_bus_max_deliver_exhausted_total``) are defined beside the code that counts them
(dispatcher.store.history, dispatcher.delivery.exhausted) and served from the same registry. Gauges of the consumers and the retry backlog are refreshed by
:class:`ConsumerGauges` every ``interval_s`` seconds from JetStream itself.
``letta-bus up`` serves them on ``LETTA_BUS_METRICS_PORT`` (default 9464; 0 turns it off).
"""

from __future__ import annotations

import asyncio
import json
import logging

from nats.js import JetStreamContext
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from config.settings import Settings

log = logging.getLogger(__name__)
attempt_log = logging.getLogger("letta_bus.attempts")

EVENTS = Counter("letta_bus_events_fanned_out_total", "Events read by the fan-out (decodable ones).")
POISON = Counter("letta_bus_poison_events_total", "Undecodable events terminated by the fan-out.")
TASKS = Counter("letta_bus_delivery_tasks_total", "Delivery tasks published by the fan-out (one per endpoint).")
OUTCOMES = Counter(
    "letta_bus_deliveries_total", "Delivery attempts and decisions by outcome.", ["outcome"],
)  # succeeded, retrying, failed, skipped, deferred, blocked
ATTEMPT_SECONDS = Histogram(
    "letta_bus_attempt_duration_seconds", "Duration of webhook POSTs, seconds.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CONSUMER_PENDING = Gauge("letta_bus_consumer_pending", "Messages not yet delivered to a durable.", ["consumer"])
CONSUMER_ACK_PENDING = Gauge("letta_bus_consumer_ack_pending", "Messages delivered, not yet acked.", ["consumer"])
RETRY_BACKLOG = Gauge("letta_bus_retry_backlog", "Delivery tasks waiting in message schedules for a later attempt.")
DEAD_LETTERS = Gauge("letta_bus_dead_letters", "Messages on letta_webhooks.dead.>.")
LOOP_RESTARTS = Counter("letta_bus_loop_restarts_total", "Consumer loops restarted after a crash.", ["loop"])
CIRCUITS = Gauge("letta_bus_circuits", "Endpoint circuit breakers by state (this process).", ["state"])
ENDPOINTS_IN_VIEW = Gauge("letta_bus_endpoints_in_view", "Endpoints in this process's endpoint view.")
ENDPOINT_FULL_LOADS = Counter("letta_bus_endpoint_full_loads_total",
                              "Full loads of the endpoint view (once at start; again only after a long gap).")
ENDPOINT_CHANGES_APPLIED = Counter("letta_bus_endpoint_changes_applied_total",
                                   "Endpoint changes applied by id (change notices).")
ENDPOINT_SECRETS_UNDECRYPTABLE = Counter(
    "letta_bus_endpoint_secrets_undecryptable_total",
    "Endpoints disabled because no key in LETTA_BUS_SECRET_KEYS decrypts their secret.",
)


def serve_metrics(host: str, port: int) -> None:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread. Raises ``ConnectionError`` naming
    ``LETTA_BUS_METRICS_PORT`` when the port is taken."""
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        raise ConnectionError(f"cannot serve metrics on {host}:{port} ({exc.strerror}): set LETTA_BUS_METRICS_PORT "
                              "to a free port, or 0 to turn metrics off") from None


def log_attempt(**fields: object) -> None:
    """One JSON line per attempt on the ``letta_bus.attempts`` logger (INFO): delivery_id, event_id, endpoint_id,
    agent_id, event_type, attempt, outcome, status_code, duration_ms, error."""
    if attempt_log.isEnabledFor(logging.INFO):
        attempt_log.info(json.dumps(fields, separators=(",", ":"), default=str))


class ConsumerGauges:
    """Refreshes the consumer, backlog and circuit gauges from JetStream every ``interval_s`` seconds."""

    def __init__(self, js: JetStreamContext, settings: Settings, circuit_states, interval_s: float = 5.0) -> None:  # noqa: ANN001
        self.js = js
        self.settings = settings
        self.circuit_states = circuit_states  # () -> iterable of "closed" / "open" / "half-open"
        self.interval_s = interval_s

    async def refresh(self) -> None:
        """Read consumer and stream state once."""
        s = self.settings
        for stream, durable in ((s.events_stream, s.fanout_durable), (s.webhooks_stream, s.sender_durable)):
            info = await self.js.consumer_info(stream, durable)
            CONSUMER_PENDING.labels(durable).set(info.num_pending)
            CONSUMER_ACK_PENDING.labels(durable).set(info.num_ack_pending)
        prefix = s.webhooks_subject_prefix
        scheduled = await self.js.stream_info(s.webhooks_stream, subjects_filter=f"{prefix}.schedules.>")
        RETRY_BACKLOG.set(sum((scheduled.state.subjects or {}).values()))
        dead = await self.js.stream_info(s.webhooks_stream, subjects_filter=f"{prefix}.dead.>")
        DEAD_LETTERS.set(sum((dead.state.subjects or {}).values()))
        counts = {"closed": 0, "open": 0, "half-open": 0}
        for state in self.circuit_states():
            counts[state] += 1
        for state, n in counts.items():
            CIRCUITS.labels(state).set(n)

    async def run(self) -> None:
        """Refresh until cancelled; failures are logged and retried at the next tick."""
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - metrics must never take the dispatcher down
                log.debug("metrics refresh failed: %r", exc)
            await asyncio.sleep(self.interval_s)
