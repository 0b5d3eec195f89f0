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
                uses the endpoint control subject. No stream admin, and it may not delete its own durables.
``publisher``   Letta: publishes ``letta.>`` and reads its PubAcks; nothing under ``$JS.API``.
``subscriber``  internal services: its own consumers on the events stream (create, pull, ack, delete), reads
                the events stream; may not touch the dispatcher's ``webhook-fanout`` durable, publish events, or
                administer streams.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from config.settings import Settings

Role = Literal["admin", "dispatcher", "publisher", "subscriber"]
ROLES: tuple[Role, ...] = ("admin", "dispatcher", "publisher", "subscriber")


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


def role_permissions(role: Role, settings: Settings, *, inbox: str | None = None) -> Permissions:
    """The permissions of ``role`` for the streams, durables and subjects named in ``settings``. ``inbox``: the
    role's reply prefix (default :func:`inbox_prefix` of :func:`user_name`). Raises ``ValueError`` for an unknown
    role."""
    inbox_sub = f"{inbox or inbox_prefix(user_name(role))}.>"
    events, webhooks = settings.events_stream, settings.webhooks_stream
    fanout, sender = settings.fanout_durable, settings.sender_durable
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
                settings.control_subject,
            ],
            publish_deny=[f"{api}.CONSUMER.DELETE.{webhooks}.{sender}"],
            subscribe_allow=[inbox_sub, settings.control_subject],
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
            publish_deny=[  # the dispatcher's durable on the same stream: no reconfiguring, stealing or acking
                f"{api}.CONSUMER.CREATE.{events}.{fanout}",
                f"{api}.CONSUMER.CREATE.{events}.{fanout}.>",
                f"{api}.CONSUMER.DURABLE.CREATE.{events}.{fanout}",
                f"{api}.CONSUMER.DELETE.{events}.{fanout}",
                f"{api}.CONSUMER.MSG.NEXT.{events}.{fanout}",
                f"$JS.ACK.{events}.{fanout}.>",
            ],
            subscribe_allow=[inbox_sub],
        )
    raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
