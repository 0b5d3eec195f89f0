"""letta-bus settings, read from the environment (prefix ``LETTA_BUS_``) and an optional ``.env`` file.

Every field documents its unit. List-valued settings take JSON in the environment, e.g.
``LETTA_BUS_RETRY_SCHEDULE_S='[5, 300, 1800]'``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: The Standard Webhooks example retry schedule (seconds after the previous attempt): 5 s, 5 min, 30 min,
#: 2 h, 5 h, 10 h, 14 h, 20 h, 24 h. Source: https://www.standardwebhooks.com/ ("Retry schedule").
STANDARD_WEBHOOKS_SCHEDULE_S: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)


class Settings(BaseSettings):
    """All letta-bus settings. Construct with keyword overrides in tests: ``Settings(nats_url=...)``.

    Raises ``pydantic.ValidationError`` naming the offending field (and its ``LETTA_BUS_`` variable) on bad input.
    """

    model_config = SettingsConfigDict(env_prefix="LETTA_BUS_", env_file=".env", extra="ignore")

    env: Literal["development", "production"] = Field(
        "development", description="production requires https webhook URLs."
    )

    # --- NATS ---------------------------------------------------------------------------------------------------
    nats_url: str | None = Field(
        None, description="NATS server URL(s), comma-separated. Unset: `letta-bus up` starts an embedded nats-server."
    )
    nats_conf: Path = Field(PROJECT_ROOT / "nats.conf", description="Config file for the embedded nats-server.")
    embedded_port: int | None = Field(
        None, ge=-1, le=65535, description="Client port of the embedded server; unset: nats.conf's (4222); -1: a free one."
    )
    embedded_monitor_port: int | None = Field(
        None, ge=-1, le=65535, description="Monitoring port of the embedded server; unset: nats.conf's (8222)."
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="Seconds to wait for the first connection.")
    publish_timeout_s: float = Field(2.0, gt=0, description="Seconds to wait for a PubAck before retrying.")
    publish_attempts: int = Field(3, ge=1, description="Tries per publish, all with the same Nats-Msg-Id.")

    # --- NATS authentication and TLS (README: "Security of the bus") ---------------------------------------------
    nats_user: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.@-]+$", description="NATS user of this process (one per role: admin, "
        "dispatcher, publisher, subscriber). Unset: the generated credentials of the process's role in nats_auth_dir "
        "when that file exists, else anonymous.",
    )
    nats_password: SecretStr | None = Field(None, description="Password of nats_user.")
    nats_inbox_prefix: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$", description="Prefix of this process's reply subjects "
        "(PubAcks, pulled messages, API answers); each role may subscribe only to its own. Unset: _INBOX.<nats_user>.",
    )
    nats_auth_dir: Path = Field(
        Path("./var/nats-auth"), description="Where the embedded server's generated credentials live (mode 0700; "
        "<role>.env files mode 0600) and where processes look for their role's credentials.",
    )
    provision: bool = Field(
        True, description="`letta-bus up` creates or updates the streams and durables. false: an admin provisions them "
        "(`letta-bus provision`) and the dispatcher's NATS user may not.",
    )
    nats_tls_ca_file: Path | None = Field(
        None, description="PEM CA bundle that signed the NATS server's certificate; set: connections use TLS.",
    )
    nats_tls_cert_file: Path | None = Field(None, description="PEM client certificate for mutual TLS (with the key).")
    nats_tls_key_file: Path | None = Field(None, description="PEM private key of nats_tls_cert_file.")

    publish_mode: Literal["awaited", "fire_and_forget"] = Field(
        "awaited", description="LettaEventBus: wait for the PubAck, or buffer and publish in the background.",
    )
    publish_buffer_max: int = Field(
        10_000, ge=1, description="Events LettaEventBus holds while the broker does not acknowledge; newer ones are "
        "refused and counted.",
    )
    publish_batch: int = Field(256, ge=1, description="Events per pipelined publish round of LettaEventBus.")
    publish_close_timeout_s: float = Field(
        5.0, ge=0, description="Seconds LettaEventBus.close() flushes before counting the rest as dropped.",
    )

    # --- Streams and consumers ----------------------------------------------------------------------------------
    subject_prefix: str = Field("letta", pattern=r"^[a-z][a-z0-9_]*$", description="Event subject = prefix.event_type.")
    events_stream: str = Field("LETTA_EVENTS", pattern=r"^[A-Za-z0-9_-]+$")
    webhooks_stream: str = Field("LETTA_WEBHOOKS", pattern=r"^[A-Za-z0-9_-]+$")
    webhooks_subject_prefix: str = Field("letta_webhooks", pattern=r"^[a-z][a-z0-9_]*$")
    stream_replicas: int = Field(1, ge=1, le=5, description="1 embedded; 3 in a cluster.")
    events_max_age_s: float = Field(7 * 86400, gt=0, description="Seconds events stay in LETTA_EVENTS (replay window).")
    duplicate_window_s: float = Field(120, gt=0, description="Seconds JetStream drops a repeated Nats-Msg-Id.")
    webhooks_duplicate_window_s: float = Field(
        1200, gt=0, description="Seconds LETTA_WEBHOOKS drops a repeated delivery task id (<event_id>:<endpoint_id>). "
        "Must exceed the fan-out's retry horizon (bus.streams.fanout_retry_horizon_s), so a fan-out retried after a "
        "failed PubAck never queues a second task for the endpoints it already reached.",
    )
    webhooks_max_bytes: int = Field(
        4 * 1024**3, ge=-1, description="Bytes LETTA_WEBHOOKS may hold (tasks, scheduled retries, dead letters); -1: "
        "no limit. Full: the oldest messages go first (discard old: nats-server refuses discard new on a stream with "
        "message schedules); by then they are tasks delivered long ago.",
    )
    parked_stream: str = Field(
        "LETTA_PARKED", pattern=r"^[A-Za-z0-9_-]+$",
        description="Stream holding the backlogs of endpoints whose circuit is open, one subject per endpoint.",
    )
    parked_subject_prefix: str = Field("letta_parked", pattern=r"^[a-z][a-z0-9_]*$")
    parked_max_bytes: int = Field(
        4 * 1024**3, ge=-1, description="Bytes the parked backlogs may hold; -1: no limit. Full: new tasks are not "
        "parked (discard new) but deferred as before, so nothing queued is dropped.",
    )
    fanout_durable: str = Field("webhook-fanout", pattern=r"^[A-Za-z0-9_-]+$")
    sender_durable: str = Field("webhook-sender", pattern=r"^[A-Za-z0-9_-]+$")
    advisories_stream: str = Field(
        "LETTA_ADVISORIES", pattern=r"^[A-Za-z0-9_-]+$",
        description="Stream keeping JetStream's MAX_DELIVERIES advisories of the two dispatcher durables.",
    )
    exhausted_durable: str = Field(
        "webhook-exhausted", pattern=r"^[A-Za-z0-9_-]+$",
        description="Durable on advisories_stream: dead-letters what JetStream stopped delivering (max_deliver).",
    )
    ack_wait_s: float = Field(30.0, gt=0, description="Seconds before an unacked message is redelivered.")
    max_ack_pending: int = Field(1000, ge=1, description="Unacked messages a consumer may have outstanding.")
    fetch_batch: int = Field(256, ge=1, description="Messages per pull request (at most max_ack_pending / 4).")

    # --- Delivery -----------------------------------------------------------------------------------------------
    http_timeout_s: float = Field(5.0, gt=0, description="Seconds for one webhook POST, connect to last byte.")
    http_max_connections: int = Field(
        1024, ge=1, description="Webhook connections open at once per dispatcher process (idle ones included), kept "
        "below the process's file limit: a POST that finds none free within http_timeout_s is a local error, not "
        "the endpoint's.")
    retry_schedule_s: list[float] = Field(
        list(STANDARD_WEBHOOKS_SCHEDULE_S),
        min_length=0,
        description="Delay in seconds before each retry; len + 1 = attempts per delivery (max_deliver).",
    )
    sender_concurrency: int = Field(256, ge=1, description="Webhook POSTs in flight per dispatcher process.")
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop",
        description="Event loop of `letta-bus up`: uvloop (15-25 % more deliveries per CPU-second in bench/e2e.py; "
        "Linux and macOS) or asyncio (the standard library's).",
    )
    nak_max_delay_s: float = Field(
        30.0, ge=0, description="Retries due within this many seconds are naks; later ones are re-published as "
        "JetStream message schedules so they do not hold a max_ack_pending slot.",
    )
    endpoint_max_concurrency: int = Field(16, ge=1, description="POSTs in flight to one endpoint per process.")
    circuit_failure_threshold: int = Field(5, ge=1, description="Consecutive failures that open an endpoint's circuit.")
    circuit_cooldown_s: float = Field(30.0, gt=0, description="Seconds an open circuit waits before a probe request.")
    circuit_max_cooldown_s: float = Field(
        900.0, gt=0, description="Each failed probe doubles the cool-down, up to this many seconds.",
    )
    agent_rate_limit_per_s: float | None = Field(
        None, gt=0, description="Deliveries per second per agent (all its endpoints); unset: no limit. Over the "
        "limit deliveries wait, they are not dropped.",
    )
    peer_heartbeat_s: float = Field(
        2.0, gt=0, description="Seconds between a dispatcher's presence heartbeats (core NATS); a peer silent for 3 "
        "heartbeats is gone. Each process takes 1/N of agent_rate_limit_per_s, N = live dispatchers.",
    )
    endpoint_idle_evict_s: float = Field(
        300.0, gt=0, description="Seconds after its last delivery an idle endpoint's gate and an agent's rate limiter "
        "are dropped from memory (they hold nothing then: closed circuit, nothing in flight, bucket full).",
    )
    agent_rate_burst: int = Field(20, ge=1, description="Deliveries an agent may send at once before the rate applies.")
    disable_after_s: float = Field(
        5 * 86400, gt=0, description="Seconds an endpoint may fail without a success before it is disabled (Svix: 5 days).",
    )
    disable_after_failures: int = Field(
        10, ge=1, description="Consecutive failed attempts also required before disabling a failing endpoint.",
    )
    response_excerpt_bytes: int = Field(16384, ge=0, description="Bytes of the response body kept per attempt.")
    max_event_bytes: int = Field(256 * 1024, gt=0, description="Events larger than this are refused at publish.")

    # --- Management API (dispatcher/api) ----------------------------------------------------------------------
    api_host: str = Field("127.0.0.1", description="Address the management API listens on (0.0.0.0: all).")
    api_port: int = Field(8289, ge=-1, le=65535, description="Port of the API in `letta-bus up`; 0 turns it off, "
                          "-1 picks a free one.")
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Bearer keys the API accepts (JSON list). Required in production; in development without keys "
        "one is generated into api_key_file (mode 0600) and `letta-bus up` prints where.",
    )
    api_key_file: Path = Field(Path("./var/api.key"), description="Development API key file (mode 0600).")
    console_url: str | None = Field(
        None, description="Public address of the console in portal links (e.g. https://hooks.example.com/console/); "
        "unset: the API's address as the request that created the link reached it.")
    api_url: str | None = Field(
        None, description="Where the CLI finds the API; unset: http://<api_host>:<api_port>.",
    )
    control_subject: str = Field(
        "letta_bus.control.endpoints", pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$",
        description="Core NATS subject of endpoint change notices (outside every stream's subjects).",
    )
    peers_subject: str = Field(
        "letta_bus.control.dispatchers", pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$",
        description="Core NATS subject of dispatcher heartbeats (dispatcher/delivery/peers.py), outside every stream.",
    )
    webhook_test_wait_s: float = Field(
        15.0, gt=0, description="Seconds `POST .../webhook/test` waits for the attempt before answering 504.",
    )

    # --- Security -----------------------------------------------------------------------------------------------
    ssrf_allow_cidrs: list[str] = Field(
        default_factory=list,
        description='Non-public networks webhooks may reach (SSRF guard allowlist), e.g. ["127.0.0.0/8", "::1/128"] '
        "for development. Never in production.",
    )
    secret_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Fernet keys encrypting endpoint secrets at rest, newest first (JSON list). Required in "
        "production; in development a key file is created (secret_key_file).",
    )
    secret_key_file: Path = Field(Path("./var/secret.key"), description="Development key file (mode 0600).")
    secret_rotation_window_s: float = Field(
        86400, ge=0, description="Seconds a rotated-out webhook secret still signs deliveries (default 24 h).",
    )

    # --- Observability ------------------------------------------------------------------------------------------
    metrics_host: str = Field("127.0.0.1", description="Address of the Prometheus /metrics endpoint.")
    metrics_port: int = Field(9464, ge=0, le=65535, description="Port of /metrics (`letta-bus up`); 0 turns it off.")
    metrics_refresh_s: float = Field(10.0, gt=0, description="Seconds between reads of consumer and backlog gauges.")

    # --- Storage ------------------------------------------------------------------------------------------------
    database_url: str = Field(
        "sqlite+aiosqlite:///./var/letta-bus.db",
        description="SQLAlchemy async URL: sqlite+aiosqlite:///path or postgresql+asyncpg://user@host/db.",
    )
    history_flush_s: float = Field(0.05, gt=0, description="Seconds between delivery-history batch writes.")
    history_batch: int = Field(1000, ge=1, description="Most delivery-history rows written in one transaction.")
    history_give_up_s: float | None = Field(
        None, gt=0,
        description="Seconds a delivery-history batch is retried while the database is unavailable before its acks "
        "go out without its rows (counted in letta_bus_history_records_lost_total). Unset (the default): kept and "
        "retried until the database is back, the messages kept alive with in_progress(); nothing is lost.",
    )
    endpoint_refresh_s: float = Field(
        1.0, gt=0, description="Seconds between endpoint reconciliations: the endpoints changed since the last one, "
        "read by their indexed updated_at (the fallback for a lost change notice; the table is loaded whole only at "
        "start).",
    )
    history_retention_days: float = Field(
        30, gt=0, description="Days delivery history (deliveries and their attempts) is kept; older rows are pruned "
        "in small batches off the hot path (Svix keeps 90).",
    )
    history_prune_batch: int = Field(1000, ge=1, description="Deliveries deleted per pruning transaction.")
    history_prune_interval_s: float = Field(
        60.0, gt=0, description="Seconds between pruning rounds; a round deletes batches until nothing is older than "
        "the retention, pausing history_prune_pause_s between batches.",
    )
    history_prune_pause_s: float = Field(0.05, ge=0, description="Seconds between two pruning batches of a round.")

    # --- Letta: the stock-Letta bridge (letta-bus bridge) and the legacy step-complete webhook ------------------
    letta_base_url: str = Field(
        "http://127.0.0.1:8283", description="Letta server the bridge reads steps and runs from (REST API root)."
    )
    letta_token: SecretStr | None = Field(None, description="Bearer token for the Letta REST API, if it needs one.")
    letta_user_id: str | None = Field(
        None, description="Letta user the bridge reads as (sent as the `user_id` header); unset: Letta's default user."
    )
    letta_timeout_s: float = Field(5.0, gt=0, description="Seconds for one Letta REST request.")
    bridge_host: str = Field("127.0.0.1", description="Address `letta-bus bridge` listens on (0.0.0.0: all).")
    bridge_port: int = Field(8290, ge=0, le=65535, description="Port of `letta-bus bridge` (0: a free one).")
    bridge_key: SecretStr | None = Field(
        None, description="The STEP_COMPLETE_KEY Letta sends as `Authorization: Bearer <key>` with the step webhook. "
        "Required in production; unset in development: no check. Run/job callbacks need no key (Letta shows their "
        "URL to every API user): the bridge publishes only what it reads back from Letta.",
    )
    bridge_stream: str = Field(
        "LETTA_BRIDGE", pattern=r"^[A-Za-z0-9_-]+$",
        description="Stream holding Letta's notifications between the bridge's 202 and their enrichment.",
    )
    bridge_subject_prefix: str = Field("letta_bridge", pattern=r"^[a-z][a-z0-9_]*$")
    bridge_durable: str = Field("bridge-enricher", pattern=r"^[A-Za-z0-9_-]+$")
    bridge_settle_s: float = Field(
        30.0, gt=0, description="Seconds the enricher waits, after a notification was stored, for Letta to finish "
        "writing what it announced (a step's messages, a run's status and steps); then it publishes what Letta "
        "has (a step) or drops the notification as unconfirmed (a run or job Letta does not show as finished).",
    )
    bridge_concurrency: int = Field(8, ge=1, le=256, description="Notifications the enricher handles at once.")
    step_complete_webhook: str | None = Field(
        None, validation_alias=AliasChoices("step_complete_webhook", "STEP_COMPLETE_WEBHOOK"),
        description="Letta's own variable (no LETTA_BUS_ prefix): where the legacy step-complete webhook POSTs "
        '{"step_id": ...}. Set: `letta-bus up` runs that subscriber too.',
    )
    step_complete_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("step_complete_key", "STEP_COMPLETE_KEY"),
        description="Letta's own variable: sent as `Authorization: Bearer <key>` by the legacy step-complete webhook.",
    )
    legacy_webhook_durable: str = Field("legacy-step-complete-webhook", pattern=r"^[A-Za-z0-9_-]+$")
    legacy_webhook_timeout_s: float = Field(10.0, gt=0, description="Seconds per legacy POST (Letta's is 10 s).")
    legacy_webhook_max_deliver: int = Field(
        20, ge=1, description="Attempts per step event before the legacy webhook gives up on it (about 1 h).",
    )
    legacy_webhook_max_backoff_s: float = Field(
        300.0, ge=0, description="Cap of the legacy webhook's retry delay: 1, 2, 4, ... seconds up to this.",
    )

    @field_validator("step_complete_webhook", "letta_base_url")
    @classmethod
    def _http_url(cls, value: str | None, info) -> str | None:  # noqa: ANN001
        if info.field_name == "step_complete_webhook" and not (value or "").strip():
            return None  # Letta treats an empty STEP_COMPLETE_WEBHOOK as unset
        if value is not None and not value.startswith(("http://", "https://")):
            name = "STEP_COMPLETE_WEBHOOK" if info.field_name == "step_complete_webhook" else "LETTA_BUS_LETTA_BASE_URL"
            raise ValueError(f"{name} must be an http:// or https:// URL, got {value!r}")
        return value

    @field_validator("ssrf_allow_cidrs")
    @classmethod
    def _cidrs_valid(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not a CIDR: use e.g. LETTA_BUS_SSRF_ALLOW_CIDRS='[\"127.0.0.0/8\"]'") from None
        return value

    @field_validator("retry_schedule_s")
    @classmethod
    def _delays_positive(cls, value: list[float]) -> list[float]:
        if any(d < 0 for d in value):
            raise ValueError("retry delays are seconds >= 0, e.g. LETTA_BUS_RETRY_SCHEDULE_S='[5, 300, 1800]'")
        return value

    @model_validator(mode="after")
    def _nats_credentials_paired(self) -> "Settings":
        if (self.nats_user is None) != (self.nats_password is None):
            raise ValueError("LETTA_BUS_NATS_USER and LETTA_BUS_NATS_PASSWORD go together: set both, or neither "
                             "(then the role's generated file in LETTA_BUS_NATS_AUTH_DIR is used when it exists)")
        if (self.nats_tls_cert_file is None) != (self.nats_tls_key_file is None):
            raise ValueError("LETTA_BUS_NATS_TLS_CERT_FILE and LETTA_BUS_NATS_TLS_KEY_FILE go together (mutual TLS): "
                             "set both, or neither")
        return self

    @property
    def pull_batch(self) -> int:
        """Messages per pull: ``fetch_batch``, capped at a quarter of ``max_ack_pending``. A pull that would pass
        max_ack_pending while acks are still on their way waits out its whole timeout instead of returning."""
        return max(1, min(self.fetch_batch, self.max_ack_pending // 4))

    @property
    def max_attempts(self) -> int:
        """Attempts per delivery: the first try plus one per scheduled retry (the consumer's max_deliver)."""
        return len(self.retry_schedule_s) + 1

    @property
    def api_base_url(self) -> str:
        """Where the CLI calls the API: ``api_url``, else ``http://<api_host>:<api_port>`` (0.0.0.0 -> 127.0.0.1)."""
        if self.api_url:
            return self.api_url.rstrip("/")
        host = "127.0.0.1" if self.api_host in ("0.0.0.0", "") else self.api_host
        return f"http://{host}:{self.api_port if self.api_port > 0 else 8289}"

    @property
    def client_url(self) -> str:
        """Where clients (CLI, publishers) connect: ``nats_url``, else the embedded server's default address."""
        return self.nats_url or f"nats://127.0.0.1:{self.embedded_port if self.embedded_port not in (None, -1) else 4222}"

    @property
    def embedded(self) -> bool:
        """True when no NATS URL is set and letta-bus runs its own nats-server."""
        return not self.nats_url

    def event_subject(self, event_type: str) -> str:
        """Subject of an event type: ``letta.agent.step.completed``."""
        return f"{self.subject_prefix}.{event_type}"

    def dead_letter_subject(self, endpoint_id: str) -> str:
        """Subject of dead letters for one endpoint: ``letta_webhooks.dead.<endpoint_id>``."""
        return f"{self.webhooks_subject_prefix}.dead.{endpoint_id}"

    def delivery_subject(self, endpoint_id: str) -> str:
        """Subject of a delivery task for one endpoint: ``letta_webhooks.deliveries.<endpoint_id>``."""
        return f"{self.webhooks_subject_prefix}.deliveries.{endpoint_id}"
