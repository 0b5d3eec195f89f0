"""The dispatcher service: endpoint view, fan-out, sender, parked backlogs, history writer and pruner, peers and
gauges, started and stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

from nats.aio.client import Client

from bus.streams import supports_schedules
from config.settings import Settings
from dispatcher.delivery import metrics
from dispatcher.delivery.control import ChangeListener
from dispatcher.delivery.endpoints import EndpointCache
from dispatcher.delivery.exhausted import ExhaustionHandler
from dispatcher.delivery.fanout import FanOut
from dispatcher.delivery.health import EndpointHealth
from dispatcher.delivery.metrics import ConsumerGauges
from dispatcher.delivery.parking import ParkingLot
from dispatcher.delivery.peers import Peers
from dispatcher.delivery.scheduling import Rescheduler
from dispatcher.delivery.sender import Sender
from dispatcher.delivery.webhook_http import WebhookHTTPClient
from dispatcher.rules.ssrf import GuardedResolver
from dispatcher.store.database import Store
from dispatcher.store.history import HistoryWriter
from dispatcher.store.retention import HistoryPruner

log = logging.getLogger(__name__)


class Dispatcher:
    """Delivers webhooks for every event on the bus.

    ``await start()`` needs the streams and durables provisioned (:func:`bus.streams.provision`) and the schema
    created. ``await stop()`` stops fetching, lets POSTs in flight finish (at most ``http_timeout_s`` + 1 seconds),
    writes their history and acks them; anything unfinished stays unacked and is redelivered later.
    """

    def __init__(self, settings: Settings, nc: Client, store: Store) -> None:
        self.settings = settings
        self.nc = nc
        self.store = store
        self.endpoints = EndpointCache(store, settings.endpoint_refresh_s)
        self.history = HistoryWriter(store, flush_s=settings.history_flush_s, batch=settings.history_batch,
                                     give_up_s=settings.history_give_up_s, keepalive_s=settings.ack_wait_s / 3,
                                     stop_give_up_s=min(10.0, settings.ack_wait_s / 2))
        self.pruner = HistoryPruner(store, settings)  # history older than history_retention_days, in small batches
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.http: WebhookHTTPClient | None = None
        self.fanout: FanOut | None = None
        self.sender: Sender | None = None
        self.exhausted: ExhaustionHandler | None = None

    async def start(self) -> None:
        """Load endpoints and start the consumers (fan-out, sender, max-deliver advisories, parked backlogs) and the
        background work (endpoint reconciliation, health writes, peer heartbeats, history pruning, gauges)."""
        js = self.nc.jetstream()
        # endpoint writes reach this process by id at once (a notice during the load waits for it, then applies)
        self.changes = ChangeListener(self.nc, self.settings.control_subject, self.endpoints.apply,
                                      self.endpoints.reconcile)
        await self.changes.start()
        await self.endpoints.refresh()  # the one full load, in slices; reconciliations by updated_at after it
        self.resolver = GuardedResolver(allow_cidrs=self.settings.ssrf_allow_cidrs)
        self.http = WebhookHTTPClient(self.resolver, timeout_s=self.settings.http_timeout_s,
                                      excerpt_bytes=self.settings.response_excerpt_bytes,
                                      max_idle_per_origin=self.settings.sender_concurrency,
                                      max_connections=self.settings.http_max_connections)
        self.history.start()
        self.fanout = FanOut(js, self.settings, self.endpoints, self.history)
        self.health = EndpointHealth(self.store, js, self.settings, self.endpoints)
        self.endpoints.on_undecryptable = self.health.disable  # that endpoint alone, in the database too
        self.rescheduler = Rescheduler(js, self.settings, schedules=supports_schedules(self.nc))
        self.parking = ParkingLot(js, self.settings, self.endpoints)
        self.health.on_disable.append(self.parking.wake)
        self.sender = Sender(js, self.settings, self.endpoints, self.history, self.health, self.rescheduler,
                             self.http, self.parking)
        self.peers = Peers(self.nc, self.settings.peers_subject, self.settings.peer_heartbeat_s)
        await self.peers.start()
        self.sender.rate_share = self.peers.count  # the agent rate limit is the fleet's (delivery/peers.py)
        self.exhausted = ExhaustionHandler(js, self.settings, self.endpoints, self.store)
        self._tasks = [
            asyncio.create_task(self._supervise("fan-out", self.fanout.run), name="fanout"),
            asyncio.create_task(self._supervise("sender", self.sender.run), name="sender"),
            # max_deliver exhaustion on either durable: dead letter + failed row (dispatcher/delivery/exhausted.py)
            asyncio.create_task(self._supervise("max-deliver", self.exhausted.run), name="max-deliver"),
            # backlogs of endpoints whose circuit is open: probe once per cool-down, drain (delivery/parking.py)
            asyncio.create_task(self._supervise("parking", self.parking.run), name="parking"),
        ]
        self._refresher = asyncio.create_task(self.endpoints.run(), name="endpoint-refresh")
        self._health_writer = asyncio.create_task(self.health.run(), name="endpoint-health")
        gauges = ConsumerGauges(js, self.settings, lambda: [g.state for g in self.sender.gates.values()],
                                interval_s=self.settings.metrics_refresh_s)
        self._gauges = asyncio.create_task(gauges.run(), name="metrics-gauges")
        self._pruner = asyncio.create_task(self.pruner.run(), name="history-prune")
        _freeze_startup_objects()


    async def _supervise(self, name: str, loop) -> None:  # noqa: ANN001 - (asyncio.Event) -> Awaitable[None]
        """Run a consumer loop until stop; if it ends with an error, log it and start it again after a pause (1 s,
        doubling to 30 s), so a bug in one message's handling cannot leave a process that looks alive but delivers
        nothing. Unacked messages of the crashed loop are redelivered after ack_wait."""
        pause = 1.0
        while not self._stop.is_set():
            try:
                await loop(self._stop)
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - restart the loop, loudly
                log.exception("dispatcher %s loop crashed; restarting it in %.0f s", name, pause)
                metrics.LOOP_RESTARTS.labels(name).inc()
            try:
                await asyncio.wait_for(self._stop.wait(), pause)
            except asyncio.TimeoutError:
                pass
            pause = min(pause * 2, 30.0)

    async def stop(self) -> None:
        """Graceful stop (see the class docstring). Safe to call twice."""
        self._stop.set()
        if self._tasks:
            for result in await asyncio.gather(*self._tasks, return_exceptions=True):
                if isinstance(result, BaseException):
                    log.error("dispatcher task ended with %r", result, exc_info=result)
            self._tasks = []
            await self.changes.stop()
            await self.peers.stop()
            self._health_writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_writer
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.health.flush(), 2.0)  # the last changes, if the database answers
            for background in (self._refresher, self._gauges, self._pruner):
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await background  # a reload cut short must release its connection before the store closes
            await self.history.stop()
        if self.http is not None:
            await self.http.close()
            await self.resolver.close()
            self.http = None


_frozen = False


def _freeze_startup_objects() -> None:
    """Move everything alive after start-up (modules, SQLAlchemy metadata, settings: about 140,000 objects) out of
    the cyclic garbage collector's reach, once per process. Each full collection then scans only what was made
    since: measured on the 2-core machine, 10-50 ms instead of 100-165 ms of stopped event loop, several times a
    minute at a few thousand deliveries per second (the collector pauses were the tail of the delivery latency)."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()
        gc.freeze()
