"""The sender's HTTP client: webhook POSTs over HTTP/1.1 keep-alive connections, SSRF-guarded at connect time.

Why not aiohttp's ``ClientSession`` (DESIGN.md, "HTTP"): one dispatcher process is CPU-bound, and for the same
signed 1 KB POST at concurrency 64 to a local receiver a ``ClientSession`` request costs about 120 us of CPU on the
project's 2-core machine, this client about 55 us (``bench/http_client.py``). A webhook POST needs little of what a
general client does, and this module does only that. Every receiver is untrusted (a tenant registers its URL), so
every byte it sends back is parsed strictly and every resource it can make this process spend is bounded:

* ``POST <path?query> HTTP/1.1`` with ``Host`` (the URL's host, so virtual hosts and TLS SNI keep the name) and
  ``Content-Length``, the caller's headers and the body as given. A header value with CR, LF or NUL, or one that
  is not ISO-8859-1, is refused with :class:`LocalRequestError` before anything is sent.
* Responses are parsed by llhttp (``httptools.HttpResponseParser``, the parser under uvicorn and Node.js), strict
  RFC 9112: no obs-fold, no ``Content-Length: +5``, no whitespace before a colon, no duplicate Content-Length,
  Transfer-Encoding with Content-Length refused, chunk sizes checked for overflow. A status outside 100-599 is
  refused (RFC 9110, section 15). Anything refused is a :class:`WebhookHTTPError` whose text starts with
  ``invalid response from the receiver:`` and names the fault (the attempt's ``error`` column is ``str(exc)``).
* Bounds (every one checked in ``data_received``, nothing is ever buffered unparsed): the heads of one exchange
  (1xx heads included) at most ``_MAX_HEAD`` = 64 KiB; at most ``_MAX_INFORMATIONAL`` = 16 1xx responses; of the
  body at most ``excerpt_bytes`` kept and at most ``_DRAIN`` = 64 KiB more read (and dropped) to keep the
  connection reusable, past that reading is paused and the connection closed; ``timeout_s`` for everything from
  the wait for a connection slot to the last byte; ``max_connections`` connections open at once (idle ones
  included; the oldest idle connection is closed to make room).
* The status is the verdict: once a final status line and its headers are in, a body that is still arriving when
  ``timeout_s`` runs out, or that the server cuts off by closing, does not turn the attempt into a failure: the
  result has the status, what was read, and ``incomplete`` saying what happened (the connection is closed).
* One pool of idle connections per origin (scheme, host, port), reused last-in first-out, at most
  ``max_idle_per_origin`` kept, each for at most ``keepalive_s`` seconds. Any byte (or EOF) that arrives on an idle
  connection closes it at once, so a stray byte is never read as the next request's response.
* Re-send on a new connection, at most once per POST, only in the well-known race with a server's idle timeout,
  recognised by all of: the connection came from the idle pool (it had carried a whole exchange and showed no byte
  or EOF while idle), the server closed it (EOF or reset) before any byte of the response, and that close came
  within ``stale_window_s`` (0.5 s) of writing the request. Every re-send is counted in ``retried_stale`` and
  marked ``resent=True`` in the result, for the sender to log. Any other failure is the caller's to retry.
* Connect-time SSRF guard: a host name is resolved once through ``resolver`` (a :class:`dispatcher.rules.ssrf.
  GuardedResolver`, which refuses non-public answers with :class:`dispatcher.rules.ssrf.BlockedAddressError`) and the
  connection goes to the vetted address; answers are cached ``dns_ttl_s`` seconds (aiohttp's default is 10 s too).
  IP-literal hosts are connected to as they are: the caller vets them first (:func:`dispatcher.rules.ssrf.
  vet_url_for_request`, as with aiohttp, which skips its resolver for literals).
* https: the default SSL context (certificate and hostname verified against the URL's host name).
* No redirects are followed, no cookies kept, no proxy used, no decompression done. A connection in an unknown
  state (timeout, cancellation, protocol error, bytes past the response) is closed, never reused.

Errors, by whose fault: :class:`WebhookHTTPError` and ``TimeoutError`` are the receiver's (or the network's);
:class:`LocalRequestError` is this process's (a header it cannot send, out of file descriptors or buffers, no
connection slot or DNS slot free in time) and must not count against the endpoint.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import socket
import ssl
import time
from collections.abc import Mapping
from typing import NamedTuple

import httptools
import yarl
from aiohttp.abc import AbstractResolver

from dispatcher.rules.ssrf import ResolverBusyError, parse_ip_host

_MAX_HEAD = 64 * 1024  # bytes of status lines + headers accepted per exchange, 1xx responses included
_MAX_INFORMATIONAL = 16  # 1xx responses accepted before the final one
_DRAIN = 64 * 1024  # bytes of body past the excerpt read to keep a connection reusable
#: errno values of a failed connect that mean this process ran out of something, not that the endpoint failed
_LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class HttpResult(NamedTuple):
    """One response. ``status``: the final status code (200-599); ``excerpt``: at most ``excerpt_bytes`` of the
    body; ``retry_after``: the ``Retry-After`` header as sent, or None; ``resent``: True when the POST was sent a
    second time on a new connection after a stale keep-alive connection (see the module docstring);
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


class LocalRequestError(ValueError):
    """The POST failed for a reason of this process, not of the endpoint: a header value that cannot be sent
    (CR, LF, NUL, not ISO-8859-1), a connect refused by the kernel for lack of resources (EMFILE, ENFILE, ENOBUFS,
    ENOMEM), no connection slot (``max_connections``) or DNS lookup slot free within ``timeout_s``.

    A ``ValueError`` so that a caller catching ``ValueError`` for "this request cannot be sent" keeps doing so;
    the sender should catch it first and not count it against the endpoint's health or circuit."""


class _Attempt:
    """What a POST has got so far, kept outside ``_post`` so that a timeout can still use a known status."""

    __slots__ = ("conn", "waiting_slot", "resent")

    def __init__(self) -> None:
        self.conn: _Connection | None = None
        self.waiting_slot = False
        self.resent = False


class _Connection(asyncio.Protocol):
    """One connection and the state of the exchange on it; parsing happens in ``data_received``."""

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
        self.body_cap = limit + _DRAIN
        self.raw = 0  # bytes of this response received (heads, framing and body)
        self.raw_cap = _MAX_HEAD + limit + _DRAIN
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
        if n <= (self.raw_cap if self.status else _MAX_HEAD) - self.raw:
            self.raw += n
            self._feed(data)
        else:
            self._feed_capped(data)
        if not self.active:
            self._wake()

    def _feed_capped(self, data: bytes) -> None:
        """Feed ``data``, which would pass a bound: the heads' (``_MAX_HEAD``) before the final status, else the
        exchange's (heads + excerpt + drain budget, framing and trailers included)."""
        while self.active:
            had_status = self.status
            limit = self.raw_cap if had_status else _MAX_HEAD
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
                self._fail(f"invalid response from the receiver: the response head is over {_MAX_HEAD} bytes")

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
            if self.informational > _MAX_INFORMATIONAL:
                self._fail(f"invalid response from the receiver: more than {_MAX_INFORMATIONAL} informational "
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


class WebhookHTTPClient:
    """POSTs with a keep-alive pool (see the module docstring). ``await close()`` closes every connection.

    ``resolver``: the SSRF guard for host names (None: IP literals only); ``timeout_s``: seconds for one POST, from
    waiting for a connection slot to the last byte; ``excerpt_bytes``: body bytes kept per response;
    ``max_idle_per_origin``: idle connections kept per (scheme, host, port); ``keepalive_s``: seconds an idle
    connection is kept; ``dns_ttl_s``: seconds a vetted DNS answer is reused; ``max_connections``: connections
    open at once, idle ones included (a POST needing a new one waits for a slot within ``timeout_s``, else
    :class:`LocalRequestError`). Counters: ``connections_opened``, ``retried_stale`` (POSTs re-sent after a stale
    connection), ``open_connections`` (now)."""

    stale_window_s = 0.5  # a close within this many seconds of the request can be the idle-timeout race

    def __init__(self, resolver: AbstractResolver | None, *, timeout_s: float, excerpt_bytes: int = 16384,
                 max_idle_per_origin: int = 64, keepalive_s: float = 15.0, dns_ttl_s: float = 10.0,
                 ssl_context: ssl.SSLContext | None = None, max_connections: int = 1024) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        self.resolver = resolver
        self.timeout_s = timeout_s
        self.excerpt_bytes = excerpt_bytes
        self.max_idle_per_origin = max_idle_per_origin
        self.keepalive_s = keepalive_s
        self.dns_ttl_s = dns_ttl_s
        self.max_connections = max_connections
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], collections.deque[_Connection]] = {}
        self._dns: dict[tuple[str, int], tuple[float, list[dict]]] = {}
        self._swept = time.monotonic()
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.open_connections = 0  # slots taken: connections open or being opened
        self.connections_opened = 0  # counters for tests and monitoring
        self.retried_stale = 0

    async def post(self, url: yarl.URL, body: bytes, headers: Mapping[str, str]) -> HttpResult:
        """POST ``body`` to ``url`` and return the response (:class:`HttpResult`).

        Raises ``TimeoutError`` when no final status came within ``timeout_s`` seconds, :class:`WebhookHTTPError`
        when no usable response came, :class:`LocalRequestError` for a failure of this process (a header it
        cannot send, no file descriptor, no connection slot free in time), :class:`dispatcher.rules.ssrf.
        BlockedAddressError` when the guard refused the host's addresses, another ``OSError`` when the name does
        not resolve, and ``ValueError`` for a URL this client cannot POST to."""
        attempt = _Attempt()
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._post(url, body, headers, attempt)
        except TimeoutError:
            if attempt.waiting_slot:
                raise LocalRequestError(
                    f"no connection slot free within {self.timeout_s:g} s ({self.max_connections} connections "
                    "open: max_connections)") from None
            conn = attempt.conn
            if conn is not None and conn.status:  # the status is known: it is the verdict
                if not conn.done:
                    conn.incomplete = f"the response body did not finish within {self.timeout_s:g} s"
                conn.close()
                return conn.result(attempt.resent)
            raise

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

    async def _post(self, url: yarl.URL, body: bytes, headers: Mapping[str, str], att: _Attempt) -> HttpResult:
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"cannot POST to a {scheme or 'relative'} URL: {url}")
        host = url.raw_host
        if not host:
            raise ValueError(f"the URL has no host: {url}")
        port = url.port or (443 if scheme == "https" else 80)
        key = (scheme, host, port)
        request = _request(url, body, headers)
        now = time.monotonic()
        if now - self._swept > self.keepalive_s:
            self._sweep(now)
        limit = self.excerpt_bytes
        for attempt in range(2):
            conn = self._reuse(key, now) if attempt == 0 else None  # a re-send goes on a new connection
            reused = conn is not None
            if conn is None:
                conn = await self._connect(scheme, host, port, key, att)
            att.conn = conn
            try:
                waiter = conn.start(limit)
                conn.transport.write(request)  # type: ignore[union-attr]
                await waiter
            except BaseException:
                conn.close()  # a timeout or a cancellation: the connection's state is unknown
                raise
            if conn.done:
                if conn.reusable and not conn.closed:
                    self._release(conn)
                else:
                    conn.close()
                return conn.result(att.resent)
            conn.close()
            if conn.error is not None:
                raise WebhookHTTPError(conn.error)
            if conn.got:
                raise WebhookHTTPError("the server closed the connection in the middle of the response head")
            if reused and attempt == 0:
                since = time.monotonic() - now
                if since < self.stale_window_s:  # the idle-timeout race: re-send once, counted
                    self.retried_stale += 1
                    att.resent = True
                    now = time.monotonic()
                    continue
                raise WebhookHTTPError(f"the server closed a reused connection {since:.1f} s after the request "
                                       "without answering (not re-sent)")
            raise WebhookHTTPError("the server closed the connection without answering")
        raise AssertionError("unreachable")  # pragma: no cover

    def _reuse(self, key: tuple[str, str, int], now: float) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_s:
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = collections.deque()
        if len(idle) >= self.max_idle_per_origin or self._slot_waiters:
            conn.close()  # over the origin's idle cap, or a POST waits for a connection slot: it gets this one
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def _sweep(self, now: float) -> None:
        """Close connections idle too long and forget origins without idle connections."""
        self._swept = now
        for key in list(self._idle):
            idle = self._idle[key]
            kept = collections.deque(c for c in idle if not c.closed and now - c.idle_since < self.keepalive_s)
            for conn in idle:
                if conn not in kept:
                    conn.close()
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        for name in [k for k, (expires, _) in self._dns.items() if expires < now]:
            del self._dns[name]

    # --- connection slots (max_connections) ----------------------------------------------------------------------

    async def _take_slot(self, att: _Attempt) -> None:
        """Reserve one of ``max_connections``: at once, by closing the oldest idle connection, or by waiting."""
        if self.open_connections >= self.max_connections:
            self._close_one_idle()
        if self.open_connections < self.max_connections and not self._slot_waiters:
            self.open_connections += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        att.waiting_slot = True
        try:
            await waiter  # resolved by _give_slot: the slot is handed over, the count stays
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._give_slot()  # handed over just as this waiter was cancelled: pass it on
            else:
                waiter.cancel()
                self._slot_waiters.remove(waiter)  # only live waiters stay queued
            raise  # att.waiting_slot stays True: post() tells a slot wait's timeout from the receiver's
        att.waiting_slot = False

    def _give_slot(self) -> None:
        """A connection went: hand its slot to the first live waiter, else free it."""
        waiters = self._slot_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.open_connections -= 1

    def _close_one_idle(self) -> None:
        oldest: _Connection | None = None
        for idle in self._idle.values():
            if idle and (oldest is None or idle[0].idle_since < oldest.idle_since):
                oldest = idle[0]
        if oldest is not None:
            self._idle[oldest.key].popleft()
            oldest.close()

    async def _connect(self, scheme: str, host: str, port: int, key: tuple[str, str, int],
                       att: _Attempt) -> _Connection:
        context = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        targets = await self._addresses(host, port)
        await self._take_slot(att)
        failure: BaseException | None = None
        try:
            for target in targets:
                try:
                    conn = await self._open(target, key, context, host)
                except ssl.SSLCertVerificationError as exc:
                    raise WebhookHTTPError(f"TLS certificate of {host} not accepted: {exc.verify_message}") from None
                except OSError as exc:
                    if exc.errno in _LOCAL_ERRNOS:
                        raise LocalRequestError(f"cannot open a connection to {host}:{port}: {exc} (a limit of this "
                                                "process or host, not the endpoint's)") from None
                    failure = exc  # try the next vetted address
                    continue
                if conn.closed:  # lost during the TLS handshake's last step
                    failure = ConnectionResetError("closed while connecting")
                    continue
                conn.release_slot = self._give_slot
                self.connections_opened += 1
                return conn
        except BaseException:
            self._give_slot()
            raise
        self._give_slot()
        raise WebhookHTTPError(f"cannot connect to {host}:{port}: {failure}")

    async def _open(self, target: dict, key: tuple[str, str, int], context: ssl.SSLContext | None,
                    host: str) -> _Connection:
        """One TCP (and TLS) connection to a vetted ``target`` address; SNI and certificate checks use ``host``."""
        _, conn = await asyncio.get_running_loop().create_connection(
            lambda: _Connection(key), target["host"], target["port"], ssl=context,
            server_hostname=host if context is not None else None, family=target["family"],
            proto=target["proto"], flags=target["flags"])
        return conn  # type: ignore[return-value]

    async def _addresses(self, host: str, port: int) -> list[dict]:
        """Where to connect: an IP literal as it is (vetted by the caller), else the guard's vetted answers."""
        if parse_ip_host(host) is not None:
            return [{"host": host, "port": port, "family": socket.AF_UNSPEC, "proto": 0, "flags": 0}]
        cached = self._dns.get((host, port))
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        if self.resolver is None:
            raise LocalRequestError("a host name needs a resolver (the SSRF guard): none configured")
        try:
            answers = [dict(a, flags=socket.AI_NUMERICHOST) for a in
                       await self.resolver.resolve(host, port, socket.AF_UNSPEC)]
        except ResolverBusyError as exc:
            raise LocalRequestError(str(exc)) from None
        except TimeoutError as exc:  # the guard's own lookup timeout (this POST's timeout arrives as a cancellation)
            raise WebhookHTTPError(f"cannot resolve {host}: {exc}") from None
        self._dns[(host, port)] = (now + self.dns_ttl_s, answers)
        return answers


def _request(url: yarl.URL, body: bytes, headers: Mapping[str, str]) -> bytes:
    """The request's bytes. Raises :class:`LocalRequestError` for a header that cannot be sent as it is."""
    parts = [f"POST {url.raw_path_qs or '/'} HTTP/1.1\r\nHost: {url.host_port_subcomponent}\r\n"
             f"Content-Length: {len(body)}\r\n"]
    for name, value in headers.items():
        if "\n" in value or "\r" in value or "\0" in value:
            raise LocalRequestError(f"header {name!r} has a line break or NUL in its value")
        parts.append(f"{name}: {value}\r\n")
    parts.append("\r\n")
    try:
        return "".join(parts).encode("latin-1") + body
    except UnicodeEncodeError:
        bad = next((n for n, v in headers.items() if not _latin1(n) or not _latin1(v)), "?")
        raise LocalRequestError(f"request header {bad!r} is not ISO-8859-1 text") from None


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True
