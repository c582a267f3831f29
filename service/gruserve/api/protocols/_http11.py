"""uvicorn's httptools HTTP/1.1 protocol, with two savings for small, frequent requests.

**One write per response.** An ASGI app answers with two messages, the head
(``http.response.start``) and the body, and uvicorn writes each to the socket as it
comes: two ``send`` system calls per response, and on loopback each one also runs the
receiving side's network stack. For a small JSON reply that second call is a good part
of the cost of the request (a hello-world app served 15% more requests per second here
with one; bench/README.md). Every ASGI response cycle writes through a
:class:`_HeadJoiner`, which holds the first write of the response (the head) until the
next one and sends both together. A response whose body does not follow at once (an
NDJSON stream waiting for its first request line, say) still has its head sent within
the same event-loop iteration: the joiner flushes it from a ``call_soon`` callback.
Writes are never reordered or dropped.

**Direct routes.** An app may name, as its ``direct_routes`` attribute, requests that it
answers without ASGI (:class:`DirectRoutes`; gruserve's is the session step,
:class:`gruserve.api.v1.fast_step.DirectStep`). For those the protocol builds no ASGI
scope, cycle, event or ``receive``/``send`` pair: a :class:`_DirectCycle` collects the
body, awaits the app's ``(status, headers, body)`` and writes it in one call. uvicorn's
own connection handling is kept: the cycle stands in ``self.cycle`` and in the pipeline
where uvicorn's cycles do (pipelined requests are answered in order, whichever path
each takes), it is started as uvicorn starts a cycle (so graceful shutdown waits for
it), and it ends through the protocol's ``on_response_complete`` (keep-alive timer,
reading resumed). A lost connection cancels the app's work at once. Requests the app
does not match, and every request when the access log is on (it is written from
uvicorn's cycles), take uvicorn's ASGI path unchanged.

**Edge limits.** Each connection has a :class:`~gruserve.api.protocols._http_limits.HeadGuard`:
a header block size limit (431), a deadline for the header block, and a cap on open
connections (503 at accept); :meth:`GruServeHttpProtocol.bound` makes the protocol class
with the server's :class:`~gruserve.api.protocols._http_limits.HttpLimits`.

The protocol's own writes (a 400 for a malformed request, the WebSocket upgrade) go
to the socket as before. This relies on pieces of uvicorn that are not public
(:data:`_UVICORN_PIECES`, and ``cycle.transport``): if a release changes them, the
protocol leaves cycles alone and answers everything through ASGI, like uvicorn's own,
and says so once (:mod:`~gruserve.api.protocols._uvicorn_fit`;
``tests/api/test__http11.py`` and ``tests/api/test_direct_step.py`` fail, to say so).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, ClassVar, Protocol

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gruserve.api.errors import ClientDisconnected
from gruserve.api.protocols import _uvicorn_fit
from gruserve.api.protocols._disconnect import Watch
from gruserve.api.protocols._http_limits import HeadGuard, HttpLimits

Headers = list[tuple[bytes, bytes]]


class DirectRoutes(Protocol):
    """Requests an app answers straight from the HTTP protocol (``app.direct_routes``)."""

    def match(self, method: bytes, path: bytes, headers: Headers) -> Any:
        """What :meth:`answer` needs of the request line and headers (the session id, say),
        or None: not a direct request."""

    def answer(
        self, matched: Any, body: bytes, watch: Watch
    ) -> Awaitable[tuple[int, Headers, bytes]]:
        """``(status, headers, body)``; ``watch`` wraps the work that a disconnect cancels
        (raising :class:`~gruserve.api.errors.ClientDisconnected` then)."""


class _HeadJoiner:
    """The transport one response cycle writes to: its first write waits for the second."""

    __slots__ = ("_held", "_loop", "_pristine", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._held: bytes | None = None
        self._pristine = True  # nothing written yet: the next write is the one to hold

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif self._pristine:
            self._pristine = False
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Send the held bytes, if any (called at the latest in the loop iteration after)."""
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:  # anything else a transport has
        return getattr(self._transport, name)


class _DirectCycle:
    """One request to a direct route: its body, the app's answer, and the write.

    Stands where uvicorn keeps its ``RequestResponseCycle`` and has the attributes
    uvicorn's protocol reads or sets there (``response_complete``, ``disconnected``,
    ``keep_alive``, ``message_event``, ``run_asgi``).
    """

    __slots__ = (
        "_waiter",
        "_watching",
        "body",
        "disconnected",
        "keep_alive",
        "matched",
        "more_body",
        "protocol",
        "response_complete",
        "routes",
        "task",
    )

    def __init__(
        self,
        protocol: GruServeHttpProtocol,
        routes: DirectRoutes,
        matched: Any,
        keep_alive: bool,
    ) -> None:
        self.protocol = protocol
        self.routes = routes
        self.matched = matched
        self.keep_alive = keep_alive
        self.body = b""
        self.more_body = True
        self.response_complete = self.disconnected = False
        self.task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._watching = False

    @property
    def message_event(self) -> _DirectCycle:
        """What uvicorn signals on a lost connection: this cycle's :meth:`set`."""
        return self

    def set(self) -> None:
        """The body is complete, or the connection is lost (``disconnected`` set)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.disconnected and self._watching and self.task is not None:
            self.task.cancel()

    async def watch(self, work: Awaitable[Any]) -> Any:
        """Await ``work``; cancel it, raising ClientDisconnected, if the connection is lost."""
        if self.disconnected:
            work.close()  # type: ignore[attr-defined]
            raise ClientDisconnected
        self._watching = True
        try:
            return await work
        except asyncio.CancelledError:
            task = self.task
            if self.disconnected and task is not None and task.uncancel() == 0:
                raise ClientDisconnected from None
            raise
        finally:
            self._watching = False

    async def run_asgi(self, app: Any) -> None:
        """Answer the request (named as uvicorn's cycles: its pipeline starts them by it)."""
        protocol = self.protocol
        self.task = asyncio.current_task()
        try:
            if self.more_body:
                self._waiter = protocol.loop.create_future()
                await self._waiter
            if self.disconnected:
                return
            status, headers, body = await self.routes.answer(self.matched, self.body, self.watch)
            if protocol.flow.write_paused and not self.disconnected:
                await protocol.flow.drain()
            self._write(status, headers, body)
        except BaseException as exc:
            protocol.logger.error("Exception in a direct route", exc_info=exc)
            if not self.response_complete and not self.disconnected:
                self.keep_alive = False
                self._write(500, _PLAIN_500, b"Internal Server Error")
            if not isinstance(exc, Exception):
                raise

    def _write(self, status: int, headers: Headers, body: bytes) -> None:
        transport = self.protocol.transport
        if self.disconnected or transport.is_closing():
            return
        content = [STATUS_LINE[status]]
        for name, value in self.protocol.server_state.default_headers:
            content += (name, b": ", value, b"\r\n")
        for name, value in headers:
            content += (name, b": ", value, b"\r\n")
        if not self.keep_alive:
            content.append(b"connection: close\r\n")
        content += (b"\r\n", body)
        transport.write(b"".join(content))
        self.response_complete = True
        if not self.keep_alive:
            transport.close()
        self.protocol.on_response_complete()


_PLAIN_500 = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21")]
# what the direct path needs of uvicorn's protocol beyond its public interface
_UVICORN_PIECES = (
    "cycle",
    "pipeline",
    "flow",
    "parser",
    "expect_100_continue",
    "_start_asgi_task",
    "on_response_complete",
)


class GruServeHttpProtocol(HttpToolsProtocol):
    """uvicorn's ``httptools`` protocol; ASGI responses in one write, direct routes without
    ASGI, and the edge limits of :attr:`limits`."""

    limits: ClassVar[HttpLimits] = HttpLimits()

    @classmethod
    def bound(cls, limits: HttpLimits) -> type[GruServeHttpProtocol]:
        """This protocol with ``limits`` (uvicorn builds protocols from a class alone)."""
        return type(cls.__name__, (cls,), {"limits": limits})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = HeadGuard(self.limits, self.loop)
        routes = getattr(self.app, "direct_routes", None)
        lacking = _uvicorn_fit.missing(self, _UVICORN_PIECES)
        if lacking and routes is not None:
            _uvicorn_fit.report("httptools", lacking)
        usable = not lacking and not self.access_log and self.limit_concurrency is None
        self.direct: DirectRoutes | None = routes if usable else None

    # -- edge limits ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.guard.opened(transport, len(self.connections))

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        guard = self.guard
        if guard.lingering:  # refused: drained, never parsed
            return
        mark = guard.mark()
        super().data_received(data)
        guard.fed(self.transport, len(data), mark)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.guard.message_begun(self.transport)

    # -- requests ----------------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self.guard.head_complete()
        if self.direct is not None and self._start_direct():
            return
        previous = getattr(self, "cycle", None)
        super().on_headers_complete()
        cycle = getattr(self, "cycle", None)
        # a new request (an upgrade makes none); its task has not run yet, so nothing was written
        if cycle is not None and cycle is not previous and hasattr(cycle, "transport"):
            cycle.transport = _HeadJoiner(self.transport, self.loop)

    def _start_direct(self) -> bool:
        """Start a direct cycle for this request if it is one (HTTP/1.1, no upgrade, no
        ``Expect``, a path of the app's), as uvicorn would start its own."""
        parser = self.parser
        if parser.get_http_version() != "1.1" or parser.should_upgrade():
            return False
        if self.expect_100_continue:
            return False
        try:
            path = httptools.parse_url(self.url).path
        except httptools.HttpParserInvalidURLError:
            return False
        matched = self.direct.match(parser.get_method(), path, self.headers)  # type: ignore[union-attr]
        if matched is None:
            return False
        existing = self.cycle
        cycle = _DirectCycle(self, self.direct, matched, parser.should_keep_alive())  # type: ignore[arg-type]
        self.cycle = cycle  # type: ignore[assignment]
        if existing is None or existing.response_complete:
            self._start_asgi_task(cycle, self.app)  # type: ignore[arg-type]
        else:  # pipelined behind a request still being answered
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, self.app))  # type: ignore[arg-type]
        return True

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if type(cycle) is _DirectCycle:
            cycle.body += body
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if type(cycle) is _DirectCycle:
            cycle.more_body = False
            cycle.set()
            return
        super().on_message_complete()
