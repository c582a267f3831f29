"""Frames read and written in the protocol (_websocket.py), against uvicorn's own protocol.

Every scenario feeds the same client bytes (made by ``websockets``' sans-I/O client:
real masks, fragments, pings, compression) to both protocol classes serving one echo
app, and checks that the client gets byte-identical replies, the app the same events
and the connection ends the same way; the client then parses what it got, so the
replies are also checked for what they say.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    ServerPerMessageDeflateFactory,
)
from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol
from websockets.uri import parse_uri
from websockets.utils import apply_mask

from conftest import live_server, serve
from gruserve.api.protocols import _uvicorn_fit, _websocket
from gruserve.api.protocols._websocket import (
    PAUSE_AT,
    GruServeWebSocketProtocol,
    WsLimits,
    frame_header,
)
from gruserve.server import uvicorn_options
from gruserve.settings import Settings

MAX_SIZE = 100_000


class _Transport:
    """What the protocol wrote, and its calls to pause and resume reading."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.pauses = self.resumes = 0

    def write(self, data: bytes) -> None:
        if not self.closed:  # as asyncio's transports, which drop writes after close
            self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.pauses += 1

    def resume_reading(self) -> None:
        self.resumes += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )


@dataclass
class _Run:
    written: bytes
    events: list[dict[str, Any]]
    closed: bool
    transport: _Transport
    parser_calls: int = 0  # times websockets' parser was given data
    left: int = 0  # events queued for the app that it never took


@dataclass
class _Client:
    """A sans-I/O client whose handshake is done; ``chunks`` are the bytes to feed, in reads."""

    protocol: ClientProtocol
    request: bytes
    chunks: list[bytes] = field(default_factory=list)

    def flush(self) -> None:
        """The frames made since the last flush, as one read."""
        data = b"".join(self.protocol.data_to_send())
        if data:
            self.chunks.append(data)

    def raw(self, data: bytes) -> None:
        self.flush()
        self.chunks.append(data)


def _client(deflate: bool = False) -> _Client:
    extensions = [ClientPerMessageDeflateFactory(client_max_window_bits=12)] if deflate else None
    client = ClientProtocol(parse_uri("ws://127.0.0.1:8000/ws"), extensions=extensions)
    client.send_request(client.connect())
    request = b"".join(client.data_to_send())
    # websockets' server answers the handshake as uvicorn configures it, so the client
    # compresses as it will with either protocol
    server = ServerProtocol(
        extensions=[
            ServerPerMessageDeflateFactory(
                server_max_window_bits=12,
                client_max_window_bits=12,
                compress_settings={"memLevel": 5},
            )
        ]
    )
    server.receive_data(request)
    server.send_response(server.accept(server.events_received()[0]))  # type: ignore[arg-type]
    client.receive_data(b"".join(server.data_to_send()))
    client.events_received()
    assert bool(client.extensions) == deflate
    return _Client(client, request)


async def _serve(
    cls: type[WebSocketsSansIOProtocol],
    client: _Client,
    read: bool = True,
    hold_writes: bool = False,
) -> _Run:
    """Feed the client's bytes to ``cls`` serving an echo app; what came out.

    ``read=False``: the app takes no message until all are fed; ``hold_writes``: the
    transport says its buffer is full (``pause_writing``) until then. ``written`` is then
    what was written while held; the rest follows in ``transport.written``.
    """
    events: list[dict[str, Any]] = []
    release = asyncio.Event()
    if read:
        release.set()

    async def echo(scope: Any, receive: Any, send: Any) -> None:
        events.append(await receive())
        await send({"type": "websocket.accept"})
        await release.wait()
        while True:
            event = await receive()
            events.append(event)
            if event["type"] != "websocket.receive":
                return
            if event.get("text") == "close":  # the app closes; the client's reply ends it
                await send({"type": "websocket.close", "code": 1000})
            elif event.get("bytes") is not None:
                await send({"type": "websocket.send", "bytes": event["bytes"]})
            else:
                await send({"type": "websocket.send", "text": event["text"]})

    config = uvicorn.Config(
        echo, ws=cls, ws_max_size=MAX_SIZE, lifespan="off", log_level="critical"
    )
    config.load()
    protocol = cls(config=config, server_state=ServerState(), app_state={})
    transport = _Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(client.request)  # uvicorn passes the handshake request alone
    run = _Run(b"", events, False, transport)
    receive_data = protocol.conn.receive_data

    def counted(data: bytes | bytearray) -> None:
        run.parser_calls += 1
        receive_data(data)

    protocol.conn.receive_data = counted  # type: ignore[method-assign]
    await _settle()
    if hold_writes:
        protocol.pause_writing()
    for chunk in client.chunks:
        if transport.closed:
            break
        protocol.data_received(chunk)
        await _settle()
    held = bytes(transport.written)
    release.set()
    if hold_writes:
        protocol.resume_writing()
    await _settle()
    if not transport.closed:
        protocol.connection_lost(None)
    await _settle()
    run.written, run.closed = bytes(transport.written), transport.closed
    run.left = protocol.queue.qsize()
    if not read or hold_writes:
        run.written = held
    return run


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def _replies(client: _Client, written: bytes) -> list[Frame]:
    """The frames the client reads from what the server wrote (the handshake response first)."""
    protocol = client.protocol
    head, _, frames = written.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    protocol.receive_data(frames)
    return [e for e in protocol.events_received() if isinstance(e, Frame)]


async def _compare(client: _Client) -> tuple[_Run, list[Frame]]:
    """Run both protocols on the client's bytes; they must agree. Ours, and its replies."""
    client.flush()
    ours = await _serve(GruServeWebSocketProtocol, client)
    theirs = await _serve(WebSocketsSansIOProtocol, client)
    assert ours.written == theirs.written
    assert ours.events == theirs.events
    assert ours.closed == theirs.closed
    assert ours.left == theirs.left
    return ours, _replies(client, ours.written)


MESSAGES: list[bytes | str] = [
    b"",
    b"\x01",
    bytes(range(125)),
    bytes(126),  # 16-bit length
    bytes(range(256)) * 256,  # 65,536 bytes: 64-bit length
    "héllo",
    "",
]


def _send(client: _Client, message: bytes | str) -> None:
    if isinstance(message, str):
        client.protocol.send_text(message.encode())
    else:
        client.protocol.send_binary(message)


def _echoed(frames: list[Frame]) -> list[bytes | str]:
    return [
        bytes(f.data).decode() if f.opcode is Opcode.TEXT else bytes(f.data)
        for f in frames
        if f.opcode in (Opcode.TEXT, Opcode.BINARY)
    ]


async def test_plain_messages_skip_websockets_parser_with_the_same_replies() -> None:
    client = _client()
    for message in MESSAGES:
        _send(client, message)
        client.flush()  # one read each
    ours, replies = await _compare(client)
    assert _echoed(replies) == MESSAGES
    assert ours.parser_calls == 0  # every frame was read by the protocol itself


async def test_frames_split_or_joined_anyhow_read_the_same() -> None:
    rng = random.Random(7)
    client = _client()
    for message in MESSAGES[:4] + MESSAGES[5:]:
        _send(client, message)
    data = b"".join(client.protocol.data_to_send())
    cuts = sorted(rng.sample(range(1, len(data)), 60))
    client.chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    client.chunks.append(frame_header(0x2, 0)[:1])  # half a header, then the connection ends
    ours, replies = await _compare(client)
    assert _echoed(replies) == MESSAGES[:4] + MESSAGES[5:]
    assert ours.parser_calls == 0


async def test_a_large_frame_in_many_reads_is_read_once_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads: list[int] = []
    read_frames = GruServeWebSocketProtocol._read_frames

    def counted(self: GruServeWebSocketProtocol, data: bytes) -> None:
        reads.append(len(data))
        read_frames(self, data)

    monkeypatch.setattr(GruServeWebSocketProtocol, "_read_frames", counted)
    client = _client()
    _send(client, MESSAGES[4])
    data = b"".join(client.protocol.data_to_send())
    client.chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    _, replies = await _compare(client)
    assert _echoed(replies) == [MESSAGES[4]]
    assert reads == [1000, len(data)]  # the header, then the whole frame once it is in


async def test_fragments_and_control_frames_go_to_websockets_in_order() -> None:
    client = _client()
    protocol = client.protocol
    protocol.send_binary(b"first")
    protocol.send_binary(b"frag", fin=False)
    protocol.send_ping(b"are you there")
    protocol.send_continuation(b"mented", fin=True)
    protocol.send_text(b"after")
    protocol.send_text("t\xc3".encode("latin-1"), fin=False)  # a character split over frames
    protocol.send_continuation("\xa9xt".encode("latin-1"), fin=True)
    protocol.send_pong(b"unasked")
    protocol.send_binary(b"last")
    ours, replies = await _compare(client)
    assert _echoed(replies) == [b"first", b"fragmented", "after", "téxt", b"last"]
    pongs = [f for f in replies if f.opcode is Opcode.PONG]
    assert [bytes(f.data) for f in pongs] == [b"are you there"]
    assert ours.parser_calls == 6  # 2 + 2 fragments, the ping and the pong


async def test_the_client_closing_is_answered_and_what_follows_ignored() -> None:
    client = _client()
    client.protocol.send_binary(b"before")
    client.protocol.send_close(1000, "bye")
    client.raw(b"\x82\x85" + bytes(4) + b"after")  # sent after its close: dropped
    ours, replies = await _compare(client)
    assert ours.closed
    closes = [f for f in replies if f.opcode is Opcode.CLOSE]
    assert len(closes) == 1 and closes[0].data == b"\x03\xe8bye"
    # the echo of "before" meets a closing connection (ClientDisconnected ends the app)
    assert ours.events == [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "bytes": b"before"},
    ]
    assert _echoed(replies) == []


async def test_messages_after_the_app_closes_are_dropped() -> None:
    client = _client()
    client.protocol.send_text(b"close")
    client.flush()
    client.protocol.send_binary(b"in flight")  # sent before the client saw the close
    client.flush()
    client.protocol.send_close(1000)
    ours, replies = await _compare(client)
    assert ours.closed and _echoed(replies) == []
    kinds = [e["type"] for e in ours.events]
    assert kinds == ["websocket.connect", "websocket.receive", "websocket.disconnect"]


async def test_bytes_after_the_handshake_request_leave_reading_to_websockets() -> None:
    """uvicorn passes the request alone; were a frame to start in the same read, websockets
    would be inside it, so the protocol never starts reading frames itself."""
    client = _client()
    client.protocol.send_binary(b"early")
    client.protocol.send_binary(b"later")
    frames = b"".join(client.protocol.data_to_send())
    client.request += frames[:3]
    client.chunks = [frames[3:]]
    ours, replies = await _compare(client)
    assert _echoed(replies) == [b"early", b"later"]
    assert ours.parser_calls == 1


def _mask(payload: bytes, key: bytes = b"\x11\x22\x33\x44") -> bytes:
    """A client frame's masking key and masked payload."""
    return key + apply_mask(payload, key)


@pytest.mark.parametrize(
    ("name", "frame", "code"),
    [
        ("text that is not UTF-8", b"\x81\x82" + _mask(b"\xff\xfe"), 1007),
        ("an unmasked frame", b"\x82\x03abc", 1002),
        ("a reserved opcode", b"\x83\x81" + _mask(b"x"), 1002),
        ("an extension bit never negotiated", b"\xc2\x81" + _mask(b"x"), 1002),
        ("a ping longer than 125 bytes", b"\x89\xfe\x00\x80" + _mask(bytes(128)), 1002),
        ("a continuation with no message", b"\x80\x81" + _mask(b"x"), 1002),
        (
            "a whole message inside a fragmented one",
            b"\x02\x81" + _mask(b"x") + b"\x82\x81" + _mask(b"y"),
            1002,
        ),
        ("a ping claiming a huge length", b"\x89\xff" + (2**40).to_bytes(8, "big"), 1009),
        ("a message over ws_max_size", b"\x82\xff" + (MAX_SIZE + 1).to_bytes(8, "big"), 1009),
    ],
)
async def test_a_bad_frame_fails_the_connection_as_websockets_does(
    name: str, frame: bytes, code: int
) -> None:
    client = _client()
    client.protocol.send_binary(b"ok")
    client.raw(frame)
    client.raw(b"\x82\x82" + _mask(b"no"))  # nothing after the bad frame is read
    ours, replies = await _compare(client)
    assert ours.closed, name
    assert _echoed(replies) == [b"ok"]
    assert replies[-1].opcode is Opcode.CLOSE
    assert int.from_bytes(replies[-1].data[:2], "big") == code


async def test_a_compressed_connection_is_left_to_websockets() -> None:
    client = _client(deflate=True)
    messages: list[bytes | str] = [b"abc" * 500, "compressed text", b""]
    for message in messages:
        _send(client, message)
    ours, replies = await _compare(client)
    assert _echoed(replies) == messages
    first_reply = ours.written.partition(b"\r\n\r\n")[2]
    assert first_reply[0] & 0x40  # compressed (RSV1), as websockets frames it
    assert ours.parser_calls == len(messages)


async def test_random_traffic_reads_the_same() -> None:
    rng = random.Random(11)
    client = _client()
    protocol = client.protocol
    sent: list[bytes | str] = []
    for _ in range(200):
        kind = rng.random()
        if kind < 0.45:
            data = rng.randbytes(rng.choice([0, 3, 125, 126, 300, 70_000]))
            protocol.send_binary(data)
            sent.append(data)
        elif kind < 0.75:
            text = "".join(rng.choice("aé€😀") for _ in range(rng.randint(0, 40)))
            protocol.send_text(text.encode())
            sent.append(text)
        elif kind < 0.9:
            data = rng.randbytes(rng.randint(1, 300))
            protocol.send_binary(data[:1], fin=False)
            protocol.send_continuation(data[1:], fin=True)
            sent.append(data)
        else:
            protocol.send_ping(rng.randbytes(rng.randint(0, 125)))
        if rng.random() < 0.3:
            client.flush()
    client.flush()
    data = b"".join(client.chunks)
    cuts = sorted(rng.sample(range(1, len(data)), 300))
    client.chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    _, replies = await _compare(client)
    assert _echoed(replies) == sent


async def test_reading_stops_only_once_events_pile_up() -> None:
    """uvicorn pauses the socket after every message; here only at PAUSE_AT, until drained."""
    client = _client()
    for i in range(PAUSE_AT + 4):
        client.protocol.send_binary(b"%d" % i)
    client.flush()
    ours = await _serve(GruServeWebSocketProtocol, client, read=False)
    assert (ours.transport.pauses, ours.transport.resumes) == (1, 1)
    expected = [b"%d" % i for i in range(PAUSE_AT + 4)]
    assert _echoed(_replies(client, bytes(ours.transport.written))) == expected

    few = _client()
    for i in range(PAUSE_AT - 1):
        few.protocol.send_binary(b"%d" % i)
    few.flush()
    ours = await _serve(GruServeWebSocketProtocol, few, read=False)
    assert (ours.transport.pauses, ours.transport.resumes) == (0, 0)


async def test_replies_wait_while_the_transport_is_full() -> None:
    client = _client()
    for message in MESSAGES[:3]:
        _send(client, message)
    client.flush()
    ours = await _serve(GruServeWebSocketProtocol, client, hold_writes=True)
    assert ours.written.endswith(b"\r\n\r\n")  # the handshake response, and no reply yet
    assert _echoed(_replies(client, bytes(ours.transport.written))) == MESSAGES[:3]


async def test_compression_can_be_declined(models_dir: Path, tiny_models: dict[str, Any]) -> None:
    """``GRUSERVE_WS_COMPRESSION=false``: a client offering permessage-deflate gets plain frames."""
    x = np.arange(6, dtype="<f4").reshape(2, 3)
    replies: dict[bool, bytes] = {}
    for compression in (True, False):
        async for served in serve(models_dir, ws_compression=compression):
            sid = (await served.client.post("/v1/models/simple/sessions", json={})).json()
            async for address in live_server(served.app):
                url = f"ws://{address}/v1/sessions/{sid['session_id']}/ws"
                async with connect(url, compression="deflate") as ws:
                    assert bool(ws.protocol.extensions) == compression
                    await ws.send(x.tobytes())
                    reply = await ws.recv()
                    assert isinstance(reply, bytes)
                    replies[compression] = reply
    assert replies[True] == replies[False]
    expected = tiny_models["simple"].reference(x[None])[0][0][0]
    np.testing.assert_allclose(np.frombuffer(replies[False], "<f4"), expected.ravel(), atol=1e-5)


def test_frame_header_lengths() -> None:
    assert frame_header(0x2, 5) == b"\x82\x05"
    assert frame_header(0x1, 126) == b"\x81\x7e\x00\x7e"
    assert frame_header(0x2, 65536) == b"\x82\x7f" + (65536).to_bytes(8, "big")


def test_serve_uses_it() -> None:
    protocol = uvicorn_options(Settings(_env_file=None, ws_max_frames=9))["ws"]
    assert issubclass(protocol, GruServeWebSocketProtocol)
    assert protocol.limits == WsLimits(9) and GruServeWebSocketProtocol.limits == WsLimits()


@pytest.mark.parametrize(
    ("frames", "payload", "code"),
    [
        (WsLimits().max_frames + 1, b"", 1008),  # empty continuations: never reach the size
        (WsLimits().max_frames + 1, b"x", 1008),
        (900, bytes(110), 1009),  # 900 x (110 + 6 header bytes) > MAX_SIZE; payload alone not
    ],
)
async def test_fragment_floods_are_cut_off(frames: int, payload: bytes, code: int) -> None:
    """A message in too many frames closes with 1008, one whose frames' headers and payload
    exceed the size limit with 1009; the frames before the limit, and a message in just
    ``max_frames`` frames, are read as usual."""
    assert len(payload) * frames <= MAX_SIZE
    client = _client()
    client.protocol.send_binary(b"ok")
    client.flush()
    client.protocol.send_binary(b"a", fin=False)
    for _ in range(WsLimits().max_frames - 2):
        client.protocol.send_continuation(b"", fin=False)
    client.protocol.send_continuation(b"b", fin=True)  # max_frames frames: fine
    client.flush()
    client.protocol.send_binary(payload, fin=False)
    for _ in range(frames - 1):
        client.protocol.send_continuation(payload, fin=False)
    client.flush()
    client.raw(b"\x82\x82" + _mask(b"no"))  # nothing after the cut is read
    run = await _serve(GruServeWebSocketProtocol, client)
    replies = _replies(client, run.written)
    assert run.closed and _echoed(replies) == [b"ok", b"ab"]
    assert replies[-1].opcode is Opcode.CLOSE
    assert int.from_bytes(replies[-1].data[:2], "big") == code
    assert b"GRUSERVE_" in replies[-1].data
    assert run.events[-1]["type"] == "websocket.disconnect"


async def test_a_uvicorn_without_a_piece_it_reads_serves_as_uvicorn_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A uvicorn release that renamed a piece: every frame goes through uvicorn's own
    methods, with uvicorn's replies and events, and the first connection logs the piece."""
    pieces = (*_websocket._UVICORN_PIECES, "renamed_piece")
    monkeypatch.setattr(_websocket, "_UVICORN_PIECES", pieces)
    monkeypatch.setattr(_uvicorn_fit, "_reported", set())
    client = _client()
    for message in MESSAGES:
        _send(client, message)
        client.flush()
    ours, replies = await _compare(client)  # the same bytes and events as uvicorn's
    theirs = await _serve(WebSocketsSansIOProtocol, client)
    assert _echoed(replies) == MESSAGES
    assert ours.parser_calls == theirs.parser_calls > 0  # nothing framed by the protocol
    await _serve(GruServeWebSocketProtocol, client)  # a second connection logs nothing more
    warnings = [r.getMessage() for r in caplog.records if r.name == _uvicorn_fit.__name__]
    assert len(warnings) == 1
    assert "renamed_piece" in warnings[0] and "websockets-sansio" in warnings[0]


async def test_the_uvicorn_pieces_it_relies_on_are_there() -> None:
    """Fails if uvicorn or websockets change what the protocol reads of them."""
    config = uvicorn.Config(lambda *a: None, lifespan="off")
    config.load()
    protocol = GruServeWebSocketProtocol(config=config, server_state=ServerState(), app_state={})
    for name in _websocket._UVICORN_PIECES:
        assert hasattr(protocol, name), name
    for name in ("handle_events", "handle_parser_exception"):
        assert callable(getattr(protocol, name)), name
    for name in ("reader", "current_size", *_websocket._CONN_PIECES):
        assert hasattr(protocol.conn, name), name
    assert protocol._fits
    assert isinstance(protocol.conn.reader.buffer, bytearray)
    assert isinstance(protocol.queue, _websocket._Inbox)
