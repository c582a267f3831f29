"""uvicorn's ``websockets-sansio`` protocol, reading and writing plain messages' frames itself.

A session socket carries thousands of small messages a second, each one a step. For
each, uvicorn's protocol runs ``websockets``' frame parser (a generator resumed per
read, a ``Frame`` object and an event list), queues an ASGI event on an
``asyncio.Queue``, stops reading from the socket until the app takes it and starts
again after, and frames the reply through ``websockets`` again. Measured on the
WebSocket benchmark that was ~15% of the event loop's time (bench/README.md).

This protocol keeps uvicorn's and ``websockets``' handling of everything but the
common case. Once the handshake request is parsed, it splits the incoming bytes into
frames itself, and a *plain* frame, a whole message in one masked, uncompressed,
unfragmented text or binary frame within the size limit while the connection is
open, becomes a ``websocket.receive`` event right here. Every other frame (ping,
pong, close, fragments, compressed frames, anything malformed or too large, UTF-8
that does not decode) is handed to ``websockets`` whole, so it is answered exactly as
before: pongs, closing handshakes, close codes 1002, 1007 and 1009. As ``websockets``
only ever gets whole frames, its parser always stands between two frames, so the two
readers take turns without losing their place. Incoming events go to a deque, and
reading stops only once :data:`PAUSE_AT` of them wait for the app (uvicorn stops after
each one). Replies to ``websocket.send`` on an open, uncompressed connection are
framed here and written in one call, after waiting for the transport to take writes
as uvicorn does; other sends (accept, close, compressed replies) go to uvicorn's
code.

**Fragment floods.** ``websockets`` bounds a message's payload, not its frames: four
million one-byte continuation frames (a 4 MB message) cost seconds of CPU, and empty ones
never reach the size limit. Here a message may have at most :attr:`WsLimits.max_frames`
frames (``GRUSERVE_WS_MAX_FRAMES``; more closes with 1008), and its frames' headers count
with its payload against the message size limit (more closes with 1009).

The app sees the same ASGI events either way. The protocol relies on uvicorn
passing it the handshake request alone as its first data (true of its HTTP
protocols), and on attributes of uvicorn's class that are not public
(:data:`_UVICORN_PIECES`, and :data:`_CONN_PIECES` of ``websockets``' connection);
``tests/api/test__websocket.py`` fails if they change. A connection that finds one
missing is served by uvicorn's own methods alone, and says so once
(:mod:`~gruserve.api.protocols._uvicorn_fit`).
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import CloseCode
from websockets.protocol import State

try:  # websockets' C helper; the pure-Python one where it was not built
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

from gruserve.api.protocols import _uvicorn_fit

PAUSE_AT = 16
"""Events waiting for the app at which the protocol stops reading the socket."""

_TEXT, _BINARY = 0x1, 0x2
_SHORT, _LONG = struct.Struct("!BBH"), struct.Struct("!BBQ")
# what the protocol reads of uvicorn's class, and of its ``websockets`` connection, beyond
# their public interfaces
_UVICORN_PIECES = (
    "conn",
    "queue",
    "read_paused",
    "writable",
    "handshake_initiated",
    "handshake_complete",
    "close_sent",
    "disconnected",
    "initial_response",
    "handle_events",
    "handle_parser_exception",
)
_CONN_PIECES = ("state", "extensions", "parser_exc", "receive_data", "fail")


class _Inbox:
    """Events for the app, in arrival order (what uvicorn keeps in an ``asyncio.Queue``)."""

    __slots__ = ("_waiter", "events")

    def __init__(self) -> None:
        self.events: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, event: Any) -> None:
        self.events.append(event)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def qsize(self) -> int:
        return len(self.events)

    async def get(self) -> Any:
        while not self.events:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self.events.popleft()


@dataclass(frozen=True)
class WsLimits:
    """Per-message limits beyond ``websockets``' size limit (see the module).

    Args:
        max_frames: most frames (first and continuations) in one message.
    """

    max_frames: int = 1024


def frame_header(opcode: int, length: int) -> bytes:
    """A final, unmasked frame's header (what a server sends)."""
    if length < 126:
        return bytes((0x80 | opcode, length))
    if length < 65536:
        return _SHORT.pack(0x80 | opcode, 126, length)
    return _LONG.pack(0x80 | opcode, 127, length)


class GruServeWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's ``websockets-sansio`` protocol; plain messages framed without ``websockets``,
    and fragmented ones bounded by :attr:`limits`."""

    limits: ClassVar[WsLimits] = WsLimits()

    @classmethod
    def bound(cls, limits: WsLimits) -> type[GruServeWebSocketProtocol]:
        """This protocol with ``limits`` (uvicorn builds protocols from a class alone)."""
        return type(cls.__name__, (cls,), {"limits": limits})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._frames = 0  # frames of the fragmented message being read
        self._message_bytes = 0  # its frames' headers and payloads so far
        self._max_size: int | None = self.config.ws_max_size
        self._framing = False  # True once the handshake request is parsed: frames are read here
        self._pending = bytearray()  # the start of a frame not yet whole
        self._needed = 0  # bytes that frame takes, once its header is in
        lacking = _uvicorn_fit.missing(self, _UVICORN_PIECES) + _uvicorn_fit.missing(
            getattr(self, "conn", None), _CONN_PIECES, prefix="conn."
        )
        self._fits = not lacking
        if self._fits:
            # uvicorn's own methods put to and read ``queue``; this module reads the same
            # object through ``_inbox``, typed as what it is
            self.queue = self._inbox = _Inbox()  # type: ignore[assignment]
        else:  # this connection is uvicorn's: its methods, found before the class's
            _uvicorn_fit.report("websockets-sansio", lacking)
            self.receive = super().receive  # type: ignore[method-assign]
            self.send = super().send  # type: ignore[method-assign]

    def data_received(self, data: bytes) -> None:
        if not self._framing:
            super().data_received(data)
            # uvicorn passes the handshake request alone: websockets' parser now waits for a frame
            self._framing = (
                self._fits
                and self.handshake_initiated
                and not getattr(self.conn.reader, "buffer", True)
                and hasattr(self.conn, "current_size")
            )
            return
        pending = self._pending
        if pending:
            pending += data
            if len(pending) < self._needed:
                return  # a large frame arriving in pieces: copied once, when whole
            data, self._pending = bytes(pending), bytearray()
        self._read_frames(data)

    def _read_frames(self, data: bytes) -> None:
        """Turn the whole frames in ``data`` into events; keep the rest for the next read."""
        end, at = len(data), 0
        conn, inbox = self.conn, self._inbox
        self._needed = 0
        while end - at >= 2:
            first, second = data[at], data[at + 1]
            length, head = second & 0x7F, 2
            if length == 126:
                if end - at < 4:
                    break
                length, head = int.from_bytes(data[at + 2 : at + 4], "big"), 4
            elif length == 127:
                if end - at < 10:
                    break
                length, head = int.from_bytes(data[at + 2 : at + 10], "big"), 10
            if self._max_size is not None and length > self._max_size:
                self._hand_over(data[at:])  # websockets refuses it (1009) unread
                return
            if second & 0x80:
                head += 4
            stop = at + head + length
            if stop > end:
                self._needed = stop - at
                break
            opcode = first & 0x0F
            if (opcode == 0 or not first & 0x80) and not self._fragment(opcode, stop - at):
                return
            plain = (
                first & 0xF0 == 0x80  # final, no extension bits
                and opcode in (_BINARY, _TEXT)
                and second & 0x80  # masked, as every client frame must be
                and conn.state is State.OPEN  # accepted, and neither side has closed
                and conn.current_size is None  # not inside a fragmented message
            )
            if plain:
                payload = apply_mask(data[at + head : stop], data[at + head - 4 : at + head])
                if opcode == _BINARY:
                    inbox.put_nowait({"type": "websocket.receive", "bytes": payload})
                else:
                    try:
                        text = payload.decode()
                    except UnicodeDecodeError:
                        plain = False  # websockets closes with 1007
                    else:
                        inbox.put_nowait({"type": "websocket.receive", "text": text})
            if not plain and not self._to_websockets(data[at:stop]):
                return
            at = stop
        if at < end:
            self._pending = bytearray(data[at:])
        if len(inbox.events) >= PAUSE_AT and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def _fragment(self, opcode: int, size: int) -> bool:
        """Count a frame of a fragmented message (``size``: header and payload); False once
        the message has too many frames or bytes, and the connection is failed."""
        if opcode != 0:  # the first frame of a message
            self._frames = self._message_bytes = 0
        self._frames += 1
        self._message_bytes += size
        if self._frames > self.limits.max_frames:
            code = CloseCode.POLICY_VIOLATION
            reason = f"more than {self.limits.max_frames} frames (GRUSERVE_WS_MAX_FRAMES)"
        elif self._max_size is not None and self._message_bytes > self._max_size:
            code = CloseCode.MESSAGE_TOO_BIG
            reason = f"frames over {self._max_size} bytes (GRUSERVE_MAX_REQUEST_BYTES)"
        else:
            return True
        self.conn.fail(code, reason)
        self._framing = False
        self.handle_parser_exception()
        return False

    def _to_websockets(self, frame: bytes) -> bool:
        """Have ``websockets`` handle one whole frame; False once it has failed the connection."""
        self.conn.receive_data(frame)
        if self.conn.parser_exc is not None:
            self._framing = False
            self.handle_parser_exception()
            return False
        self.handle_events()
        return True

    def _hand_over(self, data: bytes) -> None:
        """Leave the rest of the connection to uvicorn's reading."""
        self._framing = False
        super().data_received(data)

    async def receive(self) -> Any:
        inbox = self._inbox
        events = inbox.events
        event = events.popleft() if events else await inbox.get()
        if self.read_paused and not events:
            self.read_paused = False
            self.transport.resume_reading()
        return event

    async def send(self, message: Any) -> None:
        if message["type"] == "websocket.send":
            if not self.writable.is_set():
                await self.writable.wait()
            if self._writes_plain():
                data = message.get("bytes")
                if data is not None:
                    self.transport.write(frame_header(_BINARY, len(data)) + data)
                    return
                text = message.get("text")
                if text is not None:
                    encoded = text.encode()
                    self.transport.write(frame_header(_TEXT, len(encoded)) + encoded)
                    return
        await super().send(message)

    def _writes_plain(self) -> bool:
        """Whether a message can be framed here: open, accepted, uncompressed, not closing."""
        return (
            self.handshake_complete
            and not self.close_sent
            and not self.disconnected
            and self.initial_response is None
            and self.conn.state is State.OPEN
            and not self.conn.extensions
            and not self.transport.is_closing()
        )
