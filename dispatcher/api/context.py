"""What the API's routes work with: settings, store, NATS connection, the accepted keys, and the dispatcher
running in the same process (None when the API runs without one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request
from nats.aio.client import Client
from nats.js import JetStreamContext

from config.settings import Settings
from dispatcher.delivery.control import announce_change
from dispatcher.store.database import Store

if TYPE_CHECKING:
    from dispatcher.delivery.service import Dispatcher


@dataclass
class ApiContext:
    """Shared by every request. ``api_keys`` are the operator's bootstrap keys (plaintext; see :mod:`.auth`)."""

    settings: Settings
    store: Store
    nc: Client
    api_keys: list[str] = field(default_factory=list)
    dispatcher: "Dispatcher | None" = None
    #: HMAC key of portal session tokens (:mod:`dispatcher.api.portal`); derived from the store's secret key.
    portal_key: bytes = b""

    def __post_init__(self) -> None:
        if not self.portal_key:
            self.portal_key = self.store.secret_box.derive_key("portal-session")

    @property
    def js(self) -> JetStreamContext:
        """A JetStream context on :attr:`nc`."""
        return self.nc.jetstream()

    async def changed(self, endpoint_id: str, change: str) -> None:
        """Announce an endpoint write to every dispatcher (:mod:`dispatcher.delivery.control`); never raises. The
        local dispatcher, if any, also applies it right here (that one row), so it holds before the response is sent."""
        await announce_change(self.nc, self.settings.control_subject, endpoint_id, change)
        if self.dispatcher is not None:
            try:
                await self.dispatcher.endpoints.apply(endpoint_id)
            except Exception:  # noqa: BLE001 - the notice and the reconciliation follow
                pass


def get_ctx(request: Request) -> ApiContext:
    """FastAPI dependency: the :class:`ApiContext` of the app."""
    return request.app.state.ctx
