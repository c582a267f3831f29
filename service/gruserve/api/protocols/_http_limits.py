"""Limits on what one HTTP connection may cost before it has even sent a request.

uvicorn's httptools protocol reads a header block for as long as it comes and as large as
it grows (httptools buffers a header value until it ends), keeps a connection that sends
nothing open forever, and accepts connections until the process runs out of file
descriptors. All of this happens before any route, and before the API-key check. A
:class:`HeadGuard` per connection, driven by
:class:`~gruserve.api.protocols._http11.GruServeHttpProtocol`,
bounds it (:class:`HttpLimits`, from ``GRUSERVE_MAX_HEADER_BYTES``,
``GRUSERVE_HEADER_TIMEOUT_S`` and ``GRUSERVE_MAX_CONNECTIONS``):

- a header block (request line and headers) larger than ``max_header_bytes`` is answered
  431 and the connection closed;
- a connection whose header block is not complete ``header_timeout_s`` after it opened, or
  after its request's first byte, is closed (idle keep-alive connections have uvicorn's
  keep-alive timeout);
- a connection opened while ``max_connections`` are open is answered 503 at once and closed.

A refusal is written, then the write side is shut and what the client still sends is read
and dropped for up to :data:`LINGER_S` before the socket closes: closing a socket with
unread input makes the kernel reset the connection, and the client would lose the reply.

Counting is by the chunks the transport hands over (at most 256 KiB each): a chunk counts
toward the header block only when the parser saw no request begin and no header block end
in it, so a body or a pipelined request is never counted, and a header block is cut off
at most one chunk past the limit.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson

LINGER_S = 2.0
"""How long a refused connection's further input is drained before the socket closes."""

_REASONS = {431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


@dataclass(frozen=True)
class HttpLimits:
    """Per-connection limits of ``gruserve serve`` (see the module).

    Args:
        max_header_bytes: largest request line plus headers, in bytes.
        header_timeout_s: seconds a header block may take to arrive in full.
        max_connections: most open connections (HTTP and WebSocket) at once.
    """

    max_header_bytes: int = 65_536
    header_timeout_s: float = 10.0
    max_connections: int = 1_000


def refusal(status: int, kind: str, message: str) -> bytes:
    """A complete ``connection: close`` response with gruserve's JSON error body."""
    body = orjson.dumps({"error": {"type": kind, "message": message, "field": None}})
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status]),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        )
    )


class HeadGuard:
    """One connection's header-block budget, deadline and refusals.

    Args:
        limits: the limits.
        loop: the event loop (for the deadline).
    """

    __slots__ = ("_events", "_head_bytes", "_in_head", "_timer", "limits", "lingering", "loop")

    def __init__(self, limits: HttpLimits, loop: asyncio.AbstractEventLoop) -> None:
        self.limits, self.loop = limits, loop
        self._timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._in_head = False
        self._events = 0  # requests begun and header blocks ended: see the module
        self.lingering = False
        """A refusal was written: further input is dropped unparsed."""

    def opened(self, transport: asyncio.Transport, connections: int) -> bool:
        """A new connection, with ``connections`` open in all (this one included); False if
        it is refused (503 written)."""
        if connections > self.limits.max_connections:
            message = (
                f"the server holds its maximum of {self.limits.max_connections} connections "
                "(setting GRUSERVE_MAX_CONNECTIONS); retry shortly"
            )
            self.refuse(transport, refusal(503, "TooManyConnections", message))
            return False
        self._arm(transport)
        return True

    def message_begun(self, transport: asyncio.Transport) -> None:
        """The parser saw a request's first byte."""
        self._events += 1
        self._in_head, self._head_bytes = True, 0
        if self._timer is None:
            self._arm(transport)

    def head_complete(self) -> None:
        """The parser has the whole header block: its deadline and budget are done."""
        self._events += 1
        self._in_head, self._head_bytes = False, 0
        self.disarm()

    def mark(self) -> int:
        """Taken before feeding a chunk to the parser; given back to :meth:`fed`."""
        return self._events

    def fed(self, transport: asyncio.Transport, size: int, mark: int) -> None:
        """After the parser took a chunk of ``size`` bytes: count it toward the header block
        if it lay wholly inside one (see the module), and refuse the request past the limit."""
        if not self._in_head or self._events != mark or transport.is_closing():
            return
        self._head_bytes += size
        if self._head_bytes > self.limits.max_header_bytes:
            message = (
                f"the request line and headers exceed {self.limits.max_header_bytes} bytes "
                "(setting GRUSERVE_MAX_HEADER_BYTES)"
            )
            self.refuse(transport, refusal(431, "HeadersTooLarge", message))

    def refuse(self, transport: asyncio.Transport, response: bytes) -> None:
        """Write ``response``, shut the write side, drain input for a while, then close."""
        self.disarm()
        self.lingering = True
        transport.write(response)
        if transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(LINGER_S, transport.close)
        else:  # pragma: no cover - TLS transports cannot half-close
            transport.close()

    def disarm(self) -> None:
        """Cancel the deadline (the header block arrived, or the connection is gone)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, transport: asyncio.Transport) -> None:
        self._timer = self.loop.call_later(self.limits.header_timeout_s, self._expired, transport)

    def _expired(self, transport: asyncio.Transport) -> None:
        self._timer = None
        if not transport.is_closing():
            transport.close()
