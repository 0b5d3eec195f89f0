"""One HTTP/1.1 response on a webhook connection, parsed as it arrives and bounded: the receiver is untrusted.

Source: issue 10 (hostile receivers), RFC 9112 and RFC 9110. Used by :mod:`dispatcher.delivery.webhook_http`.

* Responses are parsed by llhttp (``httptools.HttpResponseParser``, the parser under uvicorn and Node.js), strict
  RFC 9112: no obs-fold, no ``Content-Length: +5``, no whitespace before a colon, no duplicate Content-Length,
  Transfer-Encoding with Content-Length refused, chunk sizes checked for overflow. A status outside 100-599 is
  refused (RFC 9110, section 15). Anything refused is a :class:`WebhookHTTPError` whose text starts with
  ``invalid response from the receiver:`` and names the fault (the attempt's ``error`` column is ``str(exc)``).
* Bounds (every one checked in ``data_received``, nothing is ever buffered unparsed): the heads of one exchange
  (1xx heads included) at most ``MAX_HEAD`` = 64 KiB; at most ``MAX_INFORMATIONAL`` = 16 1xx responses; of the
  body at most ``excerpt_bytes`` kept and at most ``DRAIN`` = 64 KiB more read (and dropped) to keep the
  connection reusable, past that reading is paused and the connection closed.
* The status is the verdict: once a final status line and its headers are in, a body that is still arriving when
  ``timeout_s`` runs out, or that the server cuts off by closing, does not turn the attempt into a failure: the
  result has the status, what was read, and ``incomplete`` saying what happened (the connection is closed).
* Any byte (or EOF) that arrives while no request is active closes the connection at once, so a stray byte is never
  read as the next request's response; bytes after a complete response make the connection not reusable.
"""

from __future__ import annotations

import asyncio
from typing import NamedTuple

import httptools

MAX_HEAD = 64 * 1024  # bytes of status lines + headers accepted per exchange, 1xx responses included
MAX_INFORMATIONAL = 16  # 1xx responses accepted before the final one
DRAIN = 64 * 1024  # bytes of body past the excerpt read to keep a connection reusable


class HttpResult(NamedTuple):
    """One response. ``status``: the final status code (200-599); ``excerpt``: at most ``excerpt_bytes`` of the
    body; ``retry_after``: the ``Retry-After`` header as sent, or None; ``resent``: True when the POST was sent a
    second time on a new connection after a stale keep-alive connection (:mod:`dispatcher.delivery.webhook_http`);
    ``incomplete``: None, or why the body is shorter than announced (the server closed the connection in the
    middle of it, or it did not finish within ``timeout_s``). The status stands either way."""

    status: int
    excerpt: bytes
    retry_after: str | None
    resent: bool = False
    incomplete: str | None = None


class WebhookHTTPError(Exception):
    """No usable response: the connection failed, was closed early, or the server did not speak HTTP/1.x (the
    message says which, e.g. ``invalid response from the receiver: Invalid character in Content-Length``)."""


class ResponseConnection(asyncio.Protocol):
    """One connection of :class:`dispatcher.delivery.webhook_http.WebhookHTTPClient` (``key``: its origin, scheme,
    host and port) and the state of the exchange on it: :meth:`start` before writing a request, then await the
    future it returns; parsing happens in ``data_received``, bounded as the module docstring says."""

    __slots__ = ("key", "transport", "parser", "waiter", "closed", "idle_since", "active", "got", "status",
                 "excerpt", "room", "body_bytes", "body_cap", "retry_after", "keep_alive", "done", "reusable",
                 "error", "incomplete", "raw", "raw_cap", "informational", "release_slot")

    def __init__(self, key: tuple[str, str, int]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.idle_since = 0.0
        self.active = False  # a request was written and its response is not finished
        self.release_slot = None  # the client's slot release, called once when the connection goes
        self._reset(0)

    def _reset(self, limit: int) -> None:
        self.got = False  # any byte of the response arrived
        self.status = 0  # the final status once its head is complete
        self.excerpt = b""
        self.room = limit  # bytes of the excerpt still to keep
        self.body_bytes = 0
        self.body_cap = limit + DRAIN
        self.raw = 0  # bytes of this response received (heads, framing and body)
        self.raw_cap = MAX_HEAD + limit + DRAIN
        self.retry_after: str | None = None
        self.keep_alive = False
        self.done = False
        self.reusable = False
        self.error: str | None = None
        self.incomplete: str | None = None
        self.informational = 0

    def start(self, limit: int) -> asyncio.Future[None]:
        """Prepare for one response (body excerpt of at most ``limit`` bytes); the future completes when it is
        finished, refused, or the connection is lost."""
        self._reset(limit)
        self.active = True
        self.waiter = waiter = asyncio.get_running_loop().create_future()
        return waiter

    # --- asyncio.Protocol --------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.active:  # a byte on an idle connection (or after the response): never read it as a response
            self.close()
            return
        self.got = True
        n = len(data)
        if n <= (self.raw_cap if self.status else MAX_HEAD) - self.raw:
            self.raw += n
            self._feed(data)
        else:
            self._feed_capped(data)
        if not self.active:
            self._wake()

    def _feed_capped(self, data: bytes) -> None:
        """Feed ``data``, which would pass a bound: the heads' (``MAX_HEAD``) before the final status, else the
        exchange's (heads + excerpt + drain budget, framing and trailers included)."""
        while self.active:
            had_status = self.status
            limit = self.raw_cap if had_status else MAX_HEAD
            room = limit - self.raw
            if len(data) <= room:
                self.raw += len(data)
                self._feed(data)
                return
            self.raw = limit
            self._feed(data[:room])
            data = data[room:]
            if not self.active or (self.status and not had_status):
                continue  # done, or the final head ended inside: the rest is checked against the body's bound
            if self.status:
                self._finish(False)  # the status stands; the rest of the body is not read
                self._feed_done()
            else:
                self._fail(f"invalid response from the receiver: the response head is over {MAX_HEAD} bytes")

    def eof_received(self) -> bool:
        return False  # close the transport: a response is never followed by a half-open write

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()
        if self.active:
            self.active = False
            if self.status and not self.done:
                self.done = True
                if self.keep_alive:  # framed by Content-Length or chunked, and cut short
                    self.incomplete = "the server closed the connection in the middle of the response body"
                # else the body was delimited by the close: it is complete
        self._wake()

    # --- httptools callbacks -----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:  # a second message after the response: stray bytes
            self.reusable = False
            raise _Stop()

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 11 and not self.status and name.lower() == b"retry-after":  # not from trailers
            self.retry_after = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                self._fail("the server switched protocols (101)")
                raise _Stop()
            if status < 100:
                self._fail(f"invalid response from the receiver: status {status:03d} (RFC 9110: 100-599)")
                raise _Stop()
            self.informational += 1
            if self.informational > MAX_INFORMATIONAL:
                self._fail(f"invalid response from the receiver: more than {MAX_INFORMATIONAL} informational "
                           "(1xx) responses")
                raise _Stop()
            self.retry_after = None  # 1xx headers do not belong to the final response
            return
        if status > 599:
            self._fail(f"invalid response from the receiver: status {status} (RFC 9110: 100-599)")
            raise _Stop()
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._fail(f"invalid response from the receiver: HTTP/{version} on an HTTP/1.1 connection")
            raise _Stop()
        self.status = status
        self.keep_alive = parser.should_keep_alive()  # False: the body (if any) runs until the server closes

    def on_body(self, body: bytes) -> None:
        if self.done:
            return
        room = self.room
        if room:
            if len(body) <= room:
                self.excerpt += body
                self.room = room - len(body)
            else:
                self.excerpt += body[:room]
                self.room = 0
        self.body_bytes += len(body)
        if not self.room and (not self.keep_alive or self.body_bytes > self.body_cap):
            self._finish(False)  # excerpt full and the rest is close-delimited or over the drain budget
            raise _Stop()

    def on_message_complete(self) -> None:
        if self.status and not self.done:
            self._finish(self.keep_alive and self.parser.should_keep_alive())

    # --- state -------------------------------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            if self.active and not self.done:  # pragma: no cover - only _Stop is raised, after setting state
                self._fail("invalid response from the receiver")
        except httptools.HttpParserUpgrade:
            if self.active and not self.done:
                self._fail("the server switched protocols (101)")
        except httptools.HttpParserError as exc:
            if self.done:  # garbage after a complete response: the response stands, the connection does not
                self.reusable = False
            else:
                self._fail(f"invalid response from the receiver: {exc}")
        if self.done:
            self._feed_done()

    def _feed_done(self) -> None:
        self.active = False
        if not self.reusable:
            self._stop_reading()

    def _finish(self, reusable: bool) -> None:
        self.done = True
        self.reusable = reusable

    def _fail(self, error: str) -> None:
        self.error = error
        self.active = False
        self._stop_reading()

    def _stop_reading(self) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            try:
                transport.pause_reading()  # nothing more is read; the caller closes the connection
            except (AttributeError, RuntimeError):  # pragma: no cover - closing already
                pass

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _gone(self) -> None:
        self.closed = True
        release = self.release_slot
        if release is not None:
            self.release_slot = None
            release()

    def close(self) -> None:
        self.active = False
        self._gone()
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def result(self, resent: bool) -> HttpResult:
        return HttpResult(self.status, self.excerpt, self.retry_after, resent, self.incomplete)


class _Stop(Exception):
    """Raised in a parser callback to stop parsing the rest of the data (the state says why)."""
