"""uvicorn's httptools HTTP/1.1 protocol, sending a response's head and body in one write.

An ASGI app answers with two messages, the head (``http.response.start``) and the
body, and uvicorn writes each to the socket as it comes: two ``send`` system calls
per response, and on loopback each one also runs the receiving side's network
stack. For a small JSON reply that second call is a good part of the cost of the
request (a hello-world app served 15% more requests per second here with one;
bench/README.md).

:class:`HeadJoiningProtocol` gives every request's response cycle a
:class:`_HeadJoiner` in place of the socket transport. It holds the first write of
the response (the head) until the next write, and sends both together, so an
ordinary response leaves in one system call. A response whose body does not follow
at once (an NDJSON stream waiting for its first request line, say) still has its
head sent within the same event-loop iteration: the joiner flushes it from a
``call_soon`` callback. Writes are never reordered or dropped: the held bytes go out
before anything the cycle writes or closes after them.

Only the cycle's writes are joined; the protocol's own writes (a 400 for a malformed
request, the WebSocket upgrade) go to the socket as before. If a uvicorn release
changes the pieces this relies on (``cycle``, ``cycle.transport``), the protocol
leaves the cycle alone and behaves exactly like uvicorn's (and
``tests/api/test__http11.py`` fails, to say so).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


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


class HeadJoiningProtocol(HttpToolsProtocol):
    """uvicorn's ``httptools`` protocol; each response cycle writes through a joiner."""

    def on_headers_complete(self) -> None:
        previous = getattr(self, "cycle", None)
        super().on_headers_complete()
        cycle = getattr(self, "cycle", None)
        # a new request (an upgrade makes none); its task has not run yet, so nothing was written
        if cycle is not None and cycle is not previous and hasattr(cycle, "transport"):
            cycle.transport = _HeadJoiner(self.transport, self.loop)
