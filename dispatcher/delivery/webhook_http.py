"""The sender's HTTP client: webhook POSTs over HTTP/1.1 keep-alive connections, SSRF-guarded at connect time.

Why not aiohttp's ``ClientSession`` (DESIGN.md, "HTTP"): one dispatcher process is CPU-bound, and for the same
signed 1 KB POST at concurrency 64 to a local receiver a ``ClientSession`` request costs about 120 us of CPU on the
project's 2-core machine, this client about 55 us (``bench/http_client.py``). A webhook POST needs little of what a
general client does, and this module does only that. Every receiver is untrusted (a tenant registers its URL), so
every byte it sends back is parsed strictly and every resource it can make this process spend is bounded:

* ``POST <path?query> HTTP/1.1`` with ``Host`` (the URL's host, so virtual hosts and TLS SNI keep the name) and
  ``Content-Length``, the caller's headers and the body as given. A header value with CR, LF or NUL, or one that
  is not ISO-8859-1, is refused with :class:`LocalRequestError` before anything is sent.
* Responses (:mod:`dispatcher.delivery.http_response`): parsed strictly by llhttp, every read bounded, the status
  the verdict once its head is in, and any byte (or EOF) on an idle connection closes it. Bounds of this client:
  ``timeout_s`` for everything from the wait for a connection slot to the last byte; ``max_connections``
  connections open at once (idle ones included; the oldest idle connection is closed to make room).
* One pool of idle connections per origin (scheme, host, port), reused last-in first-out, at most
  ``max_idle_per_origin`` kept, each for at most ``keepalive_s`` seconds.
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

import yarl
from aiohttp.abc import AbstractResolver

from dispatcher.delivery.http_response import HttpResult, ResponseConnection, WebhookHTTPError
from dispatcher.rules.ssrf import ResolverBusyError, parse_ip_host

__all__ = ["HttpResult", "LocalRequestError", "WebhookHTTPClient", "WebhookHTTPError"]

#: errno values of a failed connect that mean this process ran out of something, not that the endpoint failed
_LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


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
        self.conn: ResponseConnection | None = None
        self.waiting_slot = False
        self.resent = False


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
        self._idle: dict[tuple[str, str, int], collections.deque[ResponseConnection]] = {}
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

    def _reuse(self, key: tuple[str, str, int], now: float) -> ResponseConnection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_s:
                return conn
            conn.close()
        return None

    def _release(self, conn: ResponseConnection) -> None:
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
        oldest: ResponseConnection | None = None
        for idle in self._idle.values():
            if idle and (oldest is None or idle[0].idle_since < oldest.idle_since):
                oldest = idle[0]
        if oldest is not None:
            self._idle[oldest.key].popleft()
            oldest.close()

    async def _connect(self, scheme: str, host: str, port: int, key: tuple[str, str, int],
                       att: _Attempt) -> ResponseConnection:
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
                    host: str) -> ResponseConnection:
        """One TCP (and TLS) connection to a vetted ``target`` address; SNI and certificate checks use ``host``."""
        _, conn = await asyncio.get_running_loop().create_connection(
            lambda: ResponseConnection(key), target["host"], target["port"], ssl=context,
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
