"""Request and response bodies of the API (pydantic). Times are RFC 3339; a time without offset is taken as UTC.
Unknown request fields are refused (422), so a misspelt field never passes silently."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from bus.names import AGENT_ID_MAX, ORGANIZATION_ID_MAX, check_id, id_regex
from dispatcher.store.models import Attempt, Delivery, Endpoint
from dispatcher.store.queries import aware

Scope = Literal["agent", "organization", "global"]
_strict = ConfigDict(extra="forbid")


def _grammar(field: str, max_len: int) -> tuple[AfterValidator, dict[str, Any]]:
    """The id grammar of :mod:`bus.names` as a pydantic validator (a 422 naming the field, with the rule and the
    bad character) and as the OpenAPI ``pattern`` / ``maxLength`` of the field."""
    return AfterValidator(lambda v: v if v is None else check_id(field, v)), {"pattern": id_regex(max_len),
                                                                             "maxLength": max_len}


_agent_check, _agent_schema = _grammar("agent_id", AGENT_ID_MAX)
_org_check, _org_schema = _grammar("organization_id", ORGANIZATION_ID_MAX)
_empty_is_none = BeforeValidator(lambda v: None if v == "" else v)

#: ``{agent_id}`` in a path: a Letta agent id per :mod:`bus.names` (422 naming ``agent_id`` otherwise).
AgentIdPath = Annotated[str, Path(description="Letta agent id, e.g. agent-<uuid4> (bus.names)",
                                  json_schema_extra=_agent_schema), _agent_check]
#: Optional owner ids in a body; ``""`` counts as absent.
OptionalAgentId = Annotated[str | None, Field(json_schema_extra=_agent_schema), _empty_is_none, _agent_check]
OptionalOrganizationId = Annotated[str | None, Field(json_schema_extra=_org_schema), _empty_is_none, _org_check]


class WebhookIn(BaseModel):
    """``PUT /v1/agents/{agent_id}/webhook``: the Letta webhook shape. ``secret``: at least 16 characters; omit
    it to keep the current one (or get a generated ``whsec_`` secret for a new webhook). ``events``:
    ``webhook_events`` patterns (NATS wildcards), empty = every event. ``allow_unknown_events``: accept patterns
    that match no event type of the catalog (for event types Letta will add). ``organization_id``: the agent's
    organization (then only that organization's events of the agent are delivered); an organization's or agent's
    credential sets its own, the operator may give one."""

    model_config = _strict
    url: str = Field(max_length=2048, examples=["https://example.com/hooks/letta"])
    secret: str | None = Field(None, max_length=512)
    events: list[str] = Field(default_factory=list, max_length=100, examples=[["agent.step.*", "agent.run.completed"]])
    enabled: bool = True
    allow_unknown_events: bool = False
    organization_id: OptionalOrganizationId = None


class EndpointIn(WebhookIn):
    """``POST /v1/webhooks``: an endpoint of any scope. ``agent`` needs ``agent_id`` (one per agent),
    ``organization`` needs ``organization_id``, ``global`` receives every agent's events."""

    scope: Scope
    agent_id: OptionalAgentId = None
    organization_id: OptionalOrganizationId = None


class EndpointPatch(BaseModel):
    """``PATCH /v1/webhooks/{endpoint_id}``: the fields to change (absent: unchanged)."""

    model_config = _strict
    url: str | None = Field(None, max_length=2048)
    secret: str | None = Field(None, max_length=512)
    events: list[str] | None = Field(None, max_length=100)
    enabled: bool | None = None
    allow_unknown_events: bool = False


class EndpointOut(BaseModel):
    """An endpoint as stored, never with its secret. ``secret`` is set only in the response that generated it
    (shown once). ``previous_secret_valid_until``: end of a rotation window, during which both secrets sign."""

    id: str
    scope: Scope
    agent_id: str | None
    organization_id: str | None
    url: str
    events: list[str]
    enabled: bool
    disabled_reason: str | None
    has_secret: bool
    previous_secret_valid_until: datetime | None
    failing_since: datetime | None
    created_at: datetime
    updated_at: datetime
    secret: str | None = Field(None, description="the generated secret, in the creating response only")

    @classmethod
    def of(cls, e: Endpoint, secret: str | None = None) -> "EndpointOut":
        return cls(id=e.id, scope=e.scope, agent_id=e.agent_id, organization_id=e.organization_id, url=e.url,
                   events=list(e.events or []), enabled=e.enabled, disabled_reason=e.disabled_reason,
                   has_secret=bool(e.secret), previous_secret_valid_until=aware(e.previous_secret_expires_at),
                   failing_since=aware(e.failing_since), created_at=aware(e.created_at),
                   updated_at=aware(e.updated_at), secret=secret)


class EndpointList(BaseModel):
    data: list[EndpointOut]


class RotateIn(BaseModel):
    """``POST .../rotate-secret``: ``secret`` to set (>= 16 characters), or omit it to generate one."""

    model_config = _strict
    secret: str | None = Field(None, max_length=512)


class SecretOut(BaseModel):
    """The new secret, shown once; the previous one keeps signing until ``previous_secret_valid_until``."""

    endpoint_id: str
    secret: str
    previous_secret_valid_until: datetime | None


class TestResult(BaseModel):
    """Outcome of ``POST .../webhook/test``: the first attempt's status code, duration (ms) and error.
    ``status`` is the delivery's (``succeeded``, ``retrying``, ``failed``, ``skipped``) or ``timeout``."""

    __test__ = False
    delivery_id: str
    event_id: str
    status: str
    status_code: int | None
    duration_ms: float | None
    error: str | None
    response_excerpt: str | None


class AttemptOut(BaseModel):
    number: int
    status_code: int | None
    duration_ms: float
    response_excerpt: str | None
    error: str | None
    at: datetime

    @classmethod
    def of(cls, a: Attempt) -> "AttemptOut":
        return cls(number=a.number, status_code=a.status_code, duration_ms=a.duration_ms,
                   response_excerpt=a.response_excerpt, error=a.error, at=aware(a.at))


class DeliveryOut(BaseModel):
    """One event for one endpoint. ``attempts`` counts tries; ``replayed`` is true for deliveries made by a
    replay (``replay_id``); ``event_seq`` is the event's sequence in LETTA_EVENTS."""

    id: str
    event_id: str
    endpoint_id: str
    agent_id: str
    event_type: str
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    event_seq: int | None
    replay_id: str | None
    replayed: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, d: Delivery) -> "DeliveryOut":
        return cls(id=d.id, event_id=d.event_id, endpoint_id=d.endpoint_id, agent_id=d.agent_id,
                   event_type=d.event_type, status=d.status, attempts=d.attempts, last_status_code=d.last_status_code,
                   last_error=d.last_error, event_seq=d.event_seq, replay_id=d.replay_id,
                   replayed=d.replay_id is not None, created_at=aware(d.created_at), updated_at=aware(d.updated_at))


class DeliveryDetail(DeliveryOut):
    """A delivery with every attempt, in attempt order."""

    attempt_log: list[AttemptOut]


class DeliveryPage(BaseModel):
    """Newest first; pass ``next_cursor`` as ``cursor`` for the next page (None: this is the last)."""

    data: list[DeliveryOut]
    next_cursor: str | None


class RetryOut(BaseModel):
    delivery_id: str
    status: Literal["queued"] = "queued"
    previous_status: str
    attempts_so_far: int


class RetryFailedIn(BaseModel):
    """``POST .../webhook/retry-failed``: failed deliveries created at or after ``since``, at most ``limit`` per
    call (oldest first); call again while ``remaining`` > 0."""

    model_config = _strict
    since: datetime
    limit: int = Field(1000, ge=1, le=10000)


class RetryFailedOut(BaseModel):
    queued: int
    remaining: int
    refused: dict[str, str]


class ReplayIn(BaseModel):
    """``POST .../webhook/replay``: re-deliver the agent's events published in [``since``, ``until``) whose type
    matches ``events`` (default: the webhook's own patterns). To continue a paged replay pass back
    ``replay_id``, ``start_seq`` (= the last ``next_seq``) and ``end_seq``; ``limit``: events scanned per call."""

    model_config = _strict
    since: datetime | None = None
    until: datetime | None = None
    events: list[str] | None = Field(None, max_length=100)
    allow_unknown_events: bool = False
    replay_id: str | None = Field(None, pattern=r"^rpl_[0-9a-f]{32}$")
    start_seq: int | None = Field(None, ge=1)
    end_seq: int | None = Field(None, ge=0)
    limit: int | None = Field(None, ge=1)


class ReplayOut(BaseModel):
    replay_id: str
    scanned: int
    queued: int
    done: bool
    next_seq: int | None
    end_seq: int


class HealthOut(BaseModel):
    """``status`` is ``ok`` when NATS, the database and both consumers answer, else ``degraded`` (HTTP 503)."""

    status: Literal["ok", "degraded"]
    nats: dict[str, Any]
    database: dict[str, Any]
    consumers: dict[str, Any]
    dispatcher: dict[str, Any]


class StatusOut(BaseModel):
    """``GET /v1/status``: ``endpoints`` lists at most ``limit`` endpoints, those needing attention first
    (``attention`` says why); ``endpoint_totals`` counts the whole fleet (endpoints, enabled, disabled, failing,
    backlog, failed_24h, attention); ``endpoints_truncated``: some endpoints are not listed."""

    streams: list[dict[str, Any]]
    consumers: list[dict[str, Any]]
    endpoints: list[dict[str, Any]]
    endpoint_totals: dict[str, int]
    endpoints_truncated: bool


class ResendIn(BaseModel):
    """``POST /v1/webhooks/{id}/dead-letters/resend``: at most ``limit`` dead letters, oldest first."""

    model_config = _strict
    limit: int = Field(1000, ge=1, le=10000)


class ResendOut(BaseModel):
    sent: int


class DeadLetterOut(BaseModel):
    """A dead letter: the delivery task whose last attempt failed (``failed_at`` as the header holds it)."""

    seq: int
    delivery_id: str
    event_id: str
    event_type: str
    agent_id: str
    attempts: int
    last_error: str
    failed_at: str

    @classmethod
    def of(cls, letter: Any) -> "DeadLetterOut":  # dispatcher.ops.dead_letters.DeadLetter
        t = letter.task
        return cls(seq=letter.seq, delivery_id=t.delivery_id, event_id=t.event_id, event_type=t.event_type,
                   agent_id=t.agent_id, attempts=letter.attempts, last_error=letter.last_error,
                   failed_at=letter.failed_at)


class DeadLetterList(BaseModel):
    data: list[DeadLetterOut]


AccessScope = Literal["operator", "organization", "agent"]
AccessRole = Literal["admin", "read"]


class GrantIn(BaseModel):
    """The scope and role of a new key or portal session: ``operator`` (only an operator may give it),
    ``organization`` (``organization_id``) or ``agent`` (``agent_id``, with ``organization_id`` the agent's
    organization; an organization's credential fills in its own). A grant never exceeds the caller's own."""

    model_config = _strict
    scope: AccessScope
    role: AccessRole = "read"
    organization_id: OptionalOrganizationId = None
    agent_id: OptionalAgentId = None


class ApiKeyIn(GrantIn):
    """``POST /v1/api-keys``. ``name``: a label for listings (who holds the key)."""

    name: str = Field("", max_length=200)


class GrantOut(BaseModel):
    """What a stored key and a portal session share: id, scope, role, owner ids, who created it, when, and when
    it was revoked (None: live)."""

    id: str
    scope: AccessScope
    role: AccessRole
    organization_id: str | None
    agent_id: str | None
    created_by: str | None
    created_at: datetime
    revoked_at: datetime | None

    @staticmethod
    def fields_of(row: Any) -> dict[str, Any]:  # dispatcher.store.models.ApiKey or PortalSession
        return {"id": row.id, "scope": row.scope, "role": row.role, "organization_id": row.organization_id,
                "agent_id": row.agent_id, "created_by": row.created_by, "created_at": aware(row.created_at),
                "revoked_at": aware(row.revoked_at)}


class ApiKeyOut(GrantOut):
    """A key as stored: never the key itself, except in ``key`` of the response that created it (shown once)."""

    name: str
    prefix: str
    key: str | None = None

    @classmethod
    def of(cls, row: Any, key: str | None = None) -> "ApiKeyOut":  # dispatcher.store.models.ApiKey
        return cls(**cls.fields_of(row), name=row.name, prefix=row.prefix, key=key)


class ApiKeyList(BaseModel):
    data: list[ApiKeyOut]


class PortalSessionIn(GrantIn):
    """``POST /v1/portal-sessions``: a console link for ``ttl`` seconds (default 3600, at most 7 days)."""

    role: AccessRole = "admin"
    ttl: int = Field(3600, ge=1, le=7 * 86400, description="seconds the link stays valid")


class PortalSessionOut(GrantOut):
    """A portal session. ``url`` opens the console in its scope (the token after ``#`` never reaches a server
    log); ``token`` is the same credential, usable as a bearer token. Both only in the creating response."""

    expires_at: datetime
    url: str | None = None
    token: str | None = None

    @classmethod
    def of(cls, row: Any, url: str | None = None, token: str | None = None) -> "PortalSessionOut":
        return cls(**cls.fields_of(row), expires_at=aware(row.expires_at), url=url, token=token)
