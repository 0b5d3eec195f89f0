"""Consumers of the letta-bus event stream for internal services (see DESIGN.md, "Subscribers for internal services").

    from subscribers import Subscriber, Event, Retry, Reject

``Subscriber`` runs a typed async handler per event (ack / ``Retry`` -> nak with delay / ``Reject`` -> term / other
errors -> nak with backoff); ``tail`` prints live events for operators.
"""

from subscribers.outcomes import Reject, Retry, SubscriberStats
from subscribers.event import Event, Start, start_config
from subscribers.runner import Subscriber
from subscribers.tail import format_event, tail

__all__ = [
    "Event",
    "Reject",
    "Retry",
    "Start",
    "Subscriber",
    "SubscriberStats",
    "format_event",
    "start_config",
    "tail",
]
