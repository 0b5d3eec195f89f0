"""The NATS permissions of each letta-bus role: which subjects it may publish to and subscribe to.

Sources: docs.nats.io "Authorization" (allow/deny lists per user, deny wins, a subject nobody allowed is denied) and
the JetStream wire API (docs.nats.io "JetStream wire API Reference"; the subject constants of nats-server's
``server/jetstream_api.go``). A JetStream operation is a request to an API subject, so permitting it means
permitting a publish there; the answer comes back on the requester's inbox, so each role may subscribe only to
its own inbox prefix (``_INBOX.<user>.>``), not to every ``_INBOX.>`` where the other roles' replies (pulled
messages included) travel. The subjects a role needs:

- PubAck of a JetStream publish: a publish to the stream's subject with a reply inbox; nothing under ``$JS``.
- pull consumer: ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`` (messages arrive on the inbox);
  ack/nak/term/in_progress: a publish to the message's reply subject ``$JS.ACK.<stream>.<consumer>.<...>``.
- create a consumer: ``$JS.API.CONSUMER.CREATE.<stream>.<name>[.<filter subject>]``, the legacy
  ``$JS.API.CONSUMER.DURABLE.CREATE.<stream>.<durable>`` and, for an unnamed ephemeral one,
  ``$JS.API.CONSUMER.CREATE.<stream>``; ``$JS.API.CONSUMER.INFO|DELETE.<stream>.<consumer>``.
- push consumer with flow control (``letta-bus tail``'s ordered consumer): replies on ``$JS.FC.<stream>.>``.
- read one message: ``$JS.API.STREAM.MSG.GET.<stream>``, or ``$JS.API.DIRECT.GET.<stream>[.<subject>]``.
- stream admin (create, update, delete, purge): ``$JS.API.STREAM.CREATE|UPDATE|DELETE|PURGE.<stream>``.

Roles (README, "Security of the bus"):

``admin``       provisions streams and consumers; everything in the account (the ``nats`` CLI, operators).
``dispatcher``  its two durables (pull, ack), publishes delivery tasks, scheduled retries, dead letters and
                operational events (``letta_webhooks.>``), reads stream and consumer info, gets event messages
                (manual retry, and replay by batched direct get: no consumers on the events stream but its own
                durable, so it cannot read from or delete other services' durables), creates and deletes the
                short-lived consumers of dead-letter listing on its own stream, deletes resent dead letters, and
                uses the endpoint control subject, pulls and acks its ``webhook-exhausted`` durable on
                ``LETTA_ADVISORIES`` and reads delivery tasks by sequence (max_deliver exhaustion), and owns the parked
                backlogs (``LETTA_PARKED``: publish ``letta_parked.>``, create/info/pause/pull/ack/delete its
                ``parked-<endpoint_id>`` durables, stream info, purge of a drained subject). No other stream admin,
                and it may not delete its own durables.
``publisher``   Letta: publishes ``letta.>`` and reads its PubAcks; nothing under ``$JS.API``.
``bridge``      ``letta-bus bridge``: publishes events (``letta.>``) and Letta's notifications
                (``letta_bridge.notifications.>``), creates, updates and reads its ``LETTA_BRIDGE`` stream and its
                ``bridge-enricher`` durable there, pulls and acks it. Nothing on the other streams.
``subscriber``  internal services: its own consumers on the events stream (create, pull, ack, delete), reads
                the events stream; may not touch the dispatcher's ``webhook-fanout`` durable, publish events, or
                administer streams.
``svc-<name>``  one internal service (``letta-bus nats-auth add-service <name>``; :func:`service_permissions`):
                only the durables named for it (create, info, pull, ack, delete), plus ``$JS.API.INFO``, stream
                names and the events stream's info that clients of every language call on start. The shared
                ``subscriber`` role may not touch those durables.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from config.settings import Settings

Role = Literal["admin", "dispatcher", "publisher", "subscriber", "bridge"]
ROLES: tuple[Role, ...] = ("admin", "dispatcher", "publisher", "subscriber", "bridge")


@dataclass(frozen=True)
class Permissions:
    """Subjects (NATS wildcards ``*`` and ``>`` allowed) a user may publish and subscribe to. Deny wins over allow;
    a subject in no allow list is denied."""

    publish_allow: list[str]
    subscribe_allow: list[str]
    publish_deny: list[str] = field(default_factory=list)
    subscribe_deny: list[str] = field(default_factory=list)

    def as_conf(self) -> dict[str, dict[str, list[str]]]:
        """The ``permissions`` map of a user in nats-server's config."""
        out: dict[str, dict[str, list[str]]] = {"publish": {"allow": self.publish_allow},
                                                 "subscribe": {"allow": self.subscribe_allow}}
        if self.publish_deny:
            out["publish"]["deny"] = self.publish_deny
        if self.subscribe_deny:
            out["subscribe"]["deny"] = self.subscribe_deny
        return out


def user_name(role: Role) -> str:
    """The NATS user of a role in the generated credentials: ``letta-bus-<role>``."""
    return f"letta-bus-{role}"


def inbox_prefix(user: str) -> str:
    """The reply-subject prefix of a user: ``_INBOX.<user>`` (it may subscribe to ``_INBOX.<user>.>`` only)."""
    return f"_INBOX.{user}"


def role_permissions(role: Role, settings: Settings, *, inbox: str | None = None,
                     service_durables: Sequence[str] = ()) -> Permissions:
    """The permissions of ``role`` for the streams, durables and subjects named in ``settings``. ``inbox``: the
    role's reply prefix (default :func:`inbox_prefix` of :func:`user_name`). ``service_durables``: durables on the
    events stream owned by a service identity (:func:`service_permissions`); the shared ``subscriber`` role may not
    create, pull, ack or delete them, as it may not the dispatcher's ``webhook-fanout``. Raises ``ValueError`` for
    an unknown role."""
    inbox_sub = f"{inbox or inbox_prefix(user_name(role))}.>"
    events, webhooks = settings.events_stream, settings.webhooks_stream
    fanout, sender = settings.fanout_durable, settings.sender_durable
    parked = settings.parked_stream
    api = "$JS.API"
    if role == "admin":
        return Permissions(publish_allow=[">"], subscribe_allow=[">"])
    if role == "publisher":
        return Permissions(publish_allow=[f"{settings.subject_prefix}.>"], subscribe_allow=[inbox_sub])
    if role == "dispatcher":
        return Permissions(
            publish_allow=[
                f"{api}.CONSUMER.MSG.NEXT.{events}.{fanout}",
                f"{api}.CONSUMER.MSG.NEXT.{webhooks}.*",  # webhook-sender, and dead-letter listing
                f"$JS.ACK.{events}.{fanout}.>",
                f"$JS.ACK.{webhooks}.{sender}.>",
                f"{settings.webhooks_subject_prefix}.>",  # tasks, schedules, dead letters, operational events
                f"{api}.STREAM.INFO.{events}",
                f"{api}.STREAM.INFO.{webhooks}",
                f"{api}.CONSUMER.INFO.{events}.{fanout}",
                f"{api}.CONSUMER.INFO.{webhooks}.{sender}",
                f"{api}.STREAM.MSG.GET.{events}",  # manual retry reads the event by its stream sequence
                f"{api}.DIRECT.GET.{events}",  # replay reads events in batches (bus/direct_get.py)
                f"{api}.DIRECT.GET.{events}.>",
                f"{api}.CONSUMER.CREATE.{webhooks}.*.>",  # dead-letter listing
                f"{api}.CONSUMER.DELETE.{webhooks}.*",
                f"{api}.STREAM.MSG.DELETE.{webhooks}",  # a resent dead letter leaves the stream
                # max_deliver exhaustion (dispatcher/delivery/exhausted.py): pull and ack the captured advisories,
                # read the task JetStream gave up on by its sequence
                f"{api}.CONSUMER.MSG.NEXT.{settings.advisories_stream}.{settings.exhausted_durable}",
                f"$JS.ACK.{settings.advisories_stream}.{settings.exhausted_durable}.>",
                f"{api}.CONSUMER.INFO.{settings.advisories_stream}.{settings.exhausted_durable}",
                f"{api}.STREAM.MSG.GET.{webhooks}",
                # parked backlogs (dispatcher/delivery/parking.py): park, one durable per endpoint (create, info,
                # pause, pull, ack, delete), list the parked subjects, purge a drained one
                f"{settings.parked_subject_prefix}.>",
                f"{api}.CONSUMER.CREATE.{parked}.*",
                f"{api}.CONSUMER.CREATE.{parked}.*.>",
                f"{api}.CONSUMER.DURABLE.CREATE.{parked}.*",
                f"{api}.CONSUMER.INFO.{parked}.*",
                f"{api}.CONSUMER.PAUSE.{parked}.*",
                f"{api}.CONSUMER.DELETE.{parked}.*",
                f"{api}.CONSUMER.MSG.NEXT.{parked}.*",
                f"$JS.ACK.{parked}.>",
                f"{api}.STREAM.INFO.{parked}",
                f"{api}.STREAM.PURGE.{parked}",
                settings.control_subject,
                settings.peers_subject,  # dispatcher heartbeats: the fleet-wide agent rate limit
            ],
            publish_deny=[f"{api}.CONSUMER.DELETE.{webhooks}.{sender}"],
            subscribe_allow=[inbox_sub, settings.control_subject, settings.peers_subject],
        )
    if role == "bridge":
        stream, durable = settings.bridge_stream, settings.bridge_durable
        return Permissions(
            publish_allow=[
                f"{settings.subject_prefix}.>",
                f"{settings.bridge_subject_prefix}.notifications.>",
                f"{api}.STREAM.CREATE.{stream}",
                f"{api}.STREAM.UPDATE.{stream}",
                f"{api}.STREAM.INFO.{stream}",
                f"{api}.CONSUMER.CREATE.{stream}.{durable}",
                f"{api}.CONSUMER.CREATE.{stream}.{durable}.>",
                f"{api}.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
                f"{api}.CONSUMER.INFO.{stream}.{durable}",
                f"{api}.CONSUMER.MSG.NEXT.{stream}.{durable}",
                f"$JS.ACK.{stream}.{durable}.>",
            ],
            subscribe_allow=[inbox_sub],
        )
    if role == "subscriber":
        return Permissions(
            publish_allow=[
                f"{api}.CONSUMER.CREATE.{events}",  # unnamed ephemeral (letta-bus tail's ordered consumer)
                f"{api}.CONSUMER.CREATE.{events}.*",
                f"{api}.CONSUMER.CREATE.{events}.*.>",
                f"{api}.CONSUMER.DURABLE.CREATE.{events}.*",
                f"{api}.CONSUMER.INFO.{events}.*",
                f"{api}.CONSUMER.DELETE.{events}.*",
                f"{api}.CONSUMER.MSG.NEXT.{events}.*",
                f"$JS.ACK.{events}.>",
                f"$JS.FC.{events}.>",
                f"{api}.STREAM.INFO.{events}",
                f"{api}.STREAM.MSG.GET.{events}",
                f"{api}.DIRECT.GET.{events}",
                f"{api}.DIRECT.GET.{events}.>",
            ],
            # the dispatcher's durable on the same stream, and every service identity's: no reconfiguring,
            # stealing, acking or deleting; the legacy step webhook's durable (this role's own) may not be deleted
            # (issue 10, finding 9: a deleted one came back with deliver_policy new, skipping what was pending)
            publish_deny=[*(s for d in (fanout, *service_durables) for s in _durable_subjects(events, d)),
                          f"{api}.CONSUMER.DELETE.{events}.{settings.legacy_webhook_durable}"],
            subscribe_allow=[inbox_sub],
        )
    raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")


# --- service identities ---------------------------------------------------------------------------------------

#: A service name: lower-case letter first, then lower-case letters, digits, ``-`` and ``_`` (it is also the name
#: of the service's durable, and durable names may not hold ``.``, ``*``, ``>`` or spaces), 1-48 characters.
SERVICE_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,47}$")
SERVICE_USER_PREFIX = "svc-"


def service_user(service: str) -> str:
    """The NATS user of a service identity: ``svc-<service>`` (``billing`` -> ``svc-billing``)."""
    return f"{SERVICE_USER_PREFIX}{service}"


def check_service_durables(service: str, durables: Sequence[str], settings: Settings) -> list[str]:
    """Validate a service name and the durables it owns; returns them (``[service]`` when ``durables`` is empty,
    else ``durables`` without duplicates, in order).

    The rule: service ``billing`` owns the durable ``billing`` and any ``billing-<suffix>`` it is given; each name
    must match :data:`SERVICE_NAME_RE`. NATS permissions match whole subject tokens only (``*`` is one token, there
    is no ``billing-*``), so each owned durable is listed by name in the server config. The dispatcher's durables
    and the legacy step-complete webhook's (which runs as the shared subscriber role) cannot be owned. Raises
    ``ValueError`` naming the bad name and the fix."""
    if not SERVICE_NAME_RE.match(service):
        raise ValueError(f"service name {service!r}: use 1-48 lower-case letters, digits, '-' and '_', starting with a "
                         "letter (e.g. 'billing'); it also names the service's durable")
    owned = list(dict.fromkeys(durables or [service]))
    reserved = {settings.fanout_durable, settings.sender_durable, settings.legacy_webhook_durable}
    for name in owned:
        if name != service and not (name.startswith(f"{service}-") and SERVICE_NAME_RE.match(name)):
            raise ValueError(f"durable {name!r} of service {service!r}: a service owns only durables named "
                             f"{service!r} or {service!r} + '-<suffix>' (lower-case letters, digits, '-', '_')")
        if name in reserved:
            raise ValueError(f"durable {name!r} belongs to letta-bus itself (LETTA_BUS_FANOUT_DURABLE, "
                             "LETTA_BUS_SENDER_DURABLE, LETTA_BUS_LEGACY_WEBHOOK_DURABLE): pick another service name")
    return owned


def service_permissions(service: str, durables: Sequence[str], settings: Settings, *,
                        inbox: str | None = None) -> Permissions:
    """The permissions of the service identity ``service`` (user :func:`service_user`) owning ``durables`` (names
    checked by :func:`check_service_durables`) on the events stream.

    Allowed: what a JetStream client of any language needs to start (``$JS.API.INFO``: account info, which nats.js
    ``jetstreamManager()`` requests first; ``$JS.API.STREAM.NAMES``: stream lookup by subject; stream info of the
    events stream) and, for each owned durable only, create/update (``CONSUMER.CREATE`` with or without a filter
    subject token, the legacy ``CONSUMER.DURABLE.CREATE``), info, delete, pull (``CONSUMER.MSG.NEXT``) and
    ack/nak/term/in-progress (``$JS.ACK.<stream>.<durable>.>``); replies on its own ``inbox`` prefix only (default
    ``_INBOX.svc-<service>``; nats.js and Go default to ``_INBOX``, so they set it: README). Everything else is
    denied by omission: other consumers (create, delete, pull, ack, info), ephemeral consumers, consumer and stream
    lists with configs (``CONSUMER.LIST|NAMES``, ``STREAM.LIST``), stream admin, direct gets, publishing events
    (``letta.>``) and the webhooks stream. Raises ``ValueError`` like :func:`check_service_durables`."""
    owned = check_service_durables(service, durables, settings)
    events, api = settings.events_stream, "$JS.API"
    per_durable = [s for d in owned for s in (*_durable_subjects(events, d), f"{api}.CONSUMER.INFO.{events}.{d}")]
    return Permissions(
        publish_allow=[f"{api}.INFO", f"{api}.STREAM.NAMES", f"{api}.STREAM.INFO.{events}", *per_durable],
        subscribe_allow=[f"{inbox or inbox_prefix(service_user(service))}.>"],
    )


def _durable_subjects(stream: str, durable: str) -> list[str]:
    """The subjects that create/update, delete, pull from and ack the durable ``durable`` of ``stream``."""
    api = "$JS.API"
    return [
        f"{api}.CONSUMER.CREATE.{stream}.{durable}",
        f"{api}.CONSUMER.CREATE.{stream}.{durable}.>",  # with one filter subject (nats-py, nats.js)
        f"{api}.CONSUMER.DURABLE.CREATE.{stream}.{durable}",  # the legacy create API
        f"{api}.CONSUMER.DELETE.{stream}.{durable}",
        f"{api}.CONSUMER.MSG.NEXT.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
    ]
