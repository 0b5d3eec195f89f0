"""Reading JetStream pull consumers on the hot path, and one pull that never ends the consumer loop calling it.

:class:`PullStream` keeps pull requests outstanding so that messages stream in while the previous ones are being
processed, and hands them out in batches of whatever has arrived. Compared with nats-py's ``fetch`` (which awaits
``next_msg`` per message: a task, a ``wait_for`` timer and a uuid4 each, plus a round trip per batch) it costs one
future per batch, and a message published to an idle stream reaches the caller at once instead of at the next pull.

Pull requests (ADR-13, "Pull Subscribe internals") ask for ``batch`` messages and expire after ``expires_s``
seconds; the server ends each with the messages, or a status message: ``408`` (expired; ``Nats-Pending-Messages``
says how many it did not fill), ``409`` (e.g. leadership change, consumer deleted) or ``404`` (no messages). The
credit (messages asked for and not yet received) is tracked per request, oldest first, as the server serves them;
a request that outlives ``expires_s`` plus a grace period without an answer (lost in a reconnect) is written off.
Unsubscribing ends the requests still waiting on the server (it drops requests whose reply subject has no interest).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

log = logging.getLogger(__name__)

_STATUS = "Status"
_PENDING_MSGS = "Nats-Pending-Messages"


async def fetch(sub: JetStreamContext.PullSubscription, batch: int, who: str, timeout_s: float = 1.0) -> list[Msg]:
    """Up to ``batch`` messages, waiting at most ``timeout_s`` seconds; ``[]`` when none came.

    Nothing but cancellation escapes: nats-py raises its own ``TimeoutError`` or a bare ``asyncio.TimeoutError``
    (``_fetch_n``) when no message arrived, and other errors while reconnecting or while the consumer is briefly
    unavailable (leader change); those are logged and followed by a 0.5 s pause.
    """
    try:
        return await sub.fetch(batch, timeout=timeout_s)
    except asyncio.TimeoutError:  # nats.errors.TimeoutError subclasses it
        return []
    except Exception as exc:  # noqa: BLE001 - keep consuming through reconnects and leader changes
        log.warning("%s fetch: %r", who, exc)
        await asyncio.sleep(0.5)
        return []


def reply_numbers(msg: Msg) -> tuple[int, int]:
    """(stream sequence, times delivered) of a JetStream message, read from its ack subject
    (``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>``) without building
    nats-py's ``Msg.metadata`` (dataclasses and a datetime per message); other forms go to ``Msg.metadata``."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[5]), int(tokens[4])
    metadata = msg.metadata
    return metadata.sequence.stream, metadata.num_delivered


class PullStream:
    """Messages of one durable pull consumer, read ahead by at most ``read_ahead`` messages.

    ``await start()``; then ``await take(limit)`` returns up to ``limit`` messages (those that arrived, waiting at
    most ``timeout_s`` for the first one, ``[]`` if none came); ``await close()`` unsubscribes. Messages taken
    are the caller's to ack; messages arrived but not taken when the stream closes are nak'ed. ``who`` names the
    stream in log lines.
    """

    def __init__(self, js: JetStreamContext, stream: str, durable: str, *, read_ahead: int, who: str,
                 expires_s: float = 2.0, grace_s: float = 1.0) -> None:
        self.js = js
        self.nc: Client = js._nc  # noqa: SLF001 - the connection the context publishes on
        self.who = who
        self.read_ahead = max(1, read_ahead)
        self.expires_s = expires_s
        self.grace_s = grace_s
        self._next_subject = f"{getattr(js, '_prefix', '$JS.API')}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = ""
        self._sub: Subscription | None = None
        self._buffer: collections.deque[Msg] = collections.deque()
        self._requests: collections.deque[list[float]] = collections.deque()  # [unfilled, give-up time]
        self._credit = 0  # messages asked for, not yet received
        self._waiter: asyncio.Future[None] | None = None
        self._pause_until = 0.0  # after an error status: no new request before this (monotonic seconds)
        self._reconnects = 0
        self.statuses: collections.Counter[str] = collections.Counter()

    async def start(self) -> "PullStream":
        """Subscribe to the stream's inbox."""
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._inbox, cb=self._on_msg, pending_msgs_limit=0,
                                            pending_bytes_limit=0)
        self._reconnects = self.nc.stats.get("reconnects", 0)
        return self

    async def close(self) -> None:
        """Unsubscribe (the server drops the requests still waiting: no interest) and nak what arrived and was not
        taken, so JetStream redelivers it at once (to another process on the same durable, or after a restart)."""
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # noqa: BLE001 - the connection may be closed already
                log.debug("%s unsubscribe: %r", self.who, exc)
            self._sub = None
        while self._buffer:
            msg = self._buffer.popleft()
            try:
                await msg.nak()
            except Exception as exc:  # noqa: BLE001 - closed connection: redelivered after ack_wait instead
                log.debug("%s nak on close: %r", self.who, exc)
        self._wake()

    @property
    def buffered(self) -> int:
        """Messages arrived and not taken yet."""
        return len(self._buffer)

    async def take(self, limit: int, timeout_s: float = 1.0) -> list[Msg]:
        """Up to ``limit`` messages; waits at most ``timeout_s`` seconds when none has arrived. Never raises but
        for cancellation: a failed pull request is logged and retried after a pause."""
        if not self._buffer:
            await self._request()
            if not self._buffer:
                loop = asyncio.get_running_loop()
                self._waiter = loop.create_future()
                timer = loop.call_later(timeout_s, self._wake)
                try:
                    await self._waiter
                finally:
                    timer.cancel()
                    self._waiter = None
        buffer = self._buffer
        if len(buffer) <= limit:
            msgs = list(buffer)
            buffer.clear()
        else:
            msgs = [buffer.popleft() for _ in range(limit)]
        await self._request()  # read ahead while the caller works on these
        return msgs

    async def _request(self) -> None:
        """Ask for more when what is buffered and asked for falls below ``read_ahead`` by a quarter of it."""
        now = time.monotonic()
        requests = self._requests
        while requests and requests[0][1] < now:  # no answer long after it expired: lost (e.g. a reconnect)
            self._credit -= int(requests.popleft()[0])
        reconnects = self.nc.stats.get("reconnects", 0)
        if reconnects != self._reconnects:  # requests of the old connection may be gone with it
            self._reconnects = reconnects
            requests.clear()
            self._credit = 0
        want = self.read_ahead - len(self._buffer) - self._credit
        if want < max(1, self.read_ahead // 4) or now < self._pause_until or self._sub is None:
            return
        body = json.dumps({"batch": want, "expires": int(self.expires_s * 1e9)}).encode()
        try:
            await self.nc.publish(self._next_subject, body, reply=self._inbox)
        except Exception as exc:  # noqa: BLE001 - reconnecting, closed: try again later
            log.warning("%s pull request: %r", self.who, exc)
            self._pause_until = now + 0.5
            return
        requests.append([want, now + self.expires_s + self.grace_s])
        self._credit += want

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        if headers is not None and not msg.data and _STATUS in headers:
            self._on_status(msg, headers)
            return
        self._buffer.append(msg)
        requests = self._requests
        if requests:
            self._credit -= 1
            head = requests[0]
            head[0] -= 1
            if head[0] <= 0:
                requests.popleft()
        if self._waiter is not None:
            self._wake()

    def _on_status(self, msg: Msg, headers: dict[str, str]) -> None:
        status = headers[_STATUS]
        self.statuses[status] += 1
        if status == "100":  # idle heartbeat (not asked for); nothing ends
            return
        requests = self._requests
        if status in ("404", "408"):  # the oldest request ended unfilled (or one written off already)
            if requests:
                self._credit -= int(requests.popleft()[0])
        else:  # 409 and others: leadership change, consumer deleted, limits... start over after a pause
            log.warning("%s pull request ended: %s %s", self.who, status, headers.get("Description", ""))
            requests.clear()
            self._credit = 0
            self._pause_until = time.monotonic() + 0.5
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
