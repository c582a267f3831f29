"""A bare ``ModelStreamInfer`` served by an asyncio HTTP/2 protocol, not by grpcio.

    python -m bench.grpc_h2echo --port 8333 --form h2

The same echo as :mod:`bench.grpc_echo` (every request of a stream parsed and answered
with one reply message of a ``demo`` step's size), served by a plain ``asyncio.Protocol``
on uvloop (the loop ``gruserve serve`` runs), to measure what a gRPC stream message would
cost gruserve with its own HTTP/2 data path instead of grpcio's asyncio server:

- ``h2``: every frame through the ``h2`` library (python-hyper): its state machine,
  HPACK, flow control and events; the message framing (5-byte gRPC prefix) by hand;
- ``h2-lean``: ``h2`` for the connection preface, SETTINGS, HEADERS (HPACK), PING,
  RST_STREAM and GOAWAY, but the DATA frames of an open stream (gRPC messages) and
  WINDOW_UPDATE read by hand, and each reply written as one hand-made DATA frame (the
  response HEADERS once per stream and the trailers still through ``h2``). Flow control
  of the hand path is kept here: inbound windows are topped up once half is used,
  outbound windows are counted. A prototype: a reply fails (it does not wait) when the
  client's window is spent, and a later SETTINGS_INITIAL_WINDOW_SIZE change is not applied
  to open streams' windows; neither happens with the benchmark's client.
- ``h2-lean-gruserve``: ``h2-lean``, each request answered by gruserve's own per-message
  answer (``InferenceService._stream_answer``: decode, sequence step through the batcher
  and onnxruntime, reply; the production app built in this process, its telemetry on) in
  a task per message: a projection of what a native front-end's gRPC step would cost.
  Needs ``--models-dir`` (the benchmark's ``demo`` model).

Every form parses each request (``ModelInferRequest.FromString``) and serialises each
reply, as grpcio's handler does, so the echoes differ from grpcio's in the transport only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import struct
import sys
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import uvloop
from tritonclient.grpc import service_pb2 as pb

from bench.grpc_echo import _reply

FORMS = ("h2", "h2-lean", "h2-lean-gruserve")
PATH = b"/inference.GRPCInferenceService/ModelStreamInfer"
RESPONSE_HEADERS = [(":status", "200"), ("content-type", "application/grpc")]
TRAILERS = [("grpc-status", "0")]
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, WINDOW_UPDATE = 0x0, 0x1, 0x8
END_STREAM = 0x1
PADDED = 0x8
FRAME = struct.Struct(">HBBBL")  # length (24 bits: high 16 + low 8), type, flags, stream
WINDOW = 1 << 24  # the inbound window the server offers, per stream and connection


def _config() -> h2.config.H2Configuration:
    return h2.config.H2Configuration(client_side=False, header_encoding=None)


def _open(conn: h2.connection.H2Connection, transport: Any) -> None:
    """The server's preface, with windows large enough that the echo never waits on them."""
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW})
    conn.increment_flow_control_window(WINDOW)
    transport.write(conn.data_to_send())


class H2Echo(asyncio.Protocol):
    """Every frame through ``h2``."""

    def __init__(self) -> None:
        self.conn = h2.connection.H2Connection(config=_config())
        self.buffers: dict[int, bytearray] = {}
        self.reply = _reply()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        _open(self.conn, transport)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                self._data(event.stream_id, event.data)
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.RequestReceived):
                self.buffers[event.stream_id] = bytearray()
                conn.send_headers(event.stream_id, RESPONSE_HEADERS)
            elif isinstance(event, h2.events.StreamEnded):
                self.buffers.pop(event.stream_id, None)
                _end(conn, event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.buffers.pop(event.stream_id, None)
        out = conn.data_to_send()
        if out:
            self.transport.write(out)

    def _data(self, stream_id: int, data: bytes) -> None:
        buffer = self.buffers[stream_id]
        buffer += data
        while len(buffer) >= 5:
            size = int.from_bytes(buffer[1:5], "big")
            if len(buffer) < 5 + size:
                break
            pb.ModelInferRequest.FromString(bytes(buffer[5 : 5 + size]))
            del buffer[: 5 + size]
            message = self.reply.SerializeToString()
            self.conn.send_data(stream_id, b"\0" + len(message).to_bytes(4, "big") + message)


class LeanEcho(asyncio.Protocol):
    """``h2`` for everything but an open stream's DATA frames and WINDOW_UPDATE."""

    def __init__(self) -> None:
        self.conn = h2.connection.H2Connection(config=_config())
        self.buffer = b""
        self.preface = False
        self.streams: dict[int, bytearray] = {}  # open streams: their unread message bytes
        self.send_window: dict[int, int] = {}
        self.conn_send_window = 65535
        self.unacked: dict[int, int] = {}
        self.conn_unacked = 0
        self.reply = _reply()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        _open(self.conn, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        if not self.preface:
            if len(buffer) < len(PREFACE):
                self.buffer = buffer
                return
            self._h2(buffer[: len(PREFACE)])
            buffer = buffer[len(PREFACE) :]
            self.preface = True
        view, at, end, passed = memoryview(buffer), 0, len(buffer), 0
        out: list[bytes] = []
        while end - at >= 9:
            high, low, kind, flags, stream_id = FRAME.unpack_from(buffer, at)
            size = (high << 8) | low
            if end - at < 9 + size:
                break
            stream_id &= 0x7FFFFFFF
            body = at + 9
            if kind == DATA and not flags & (END_STREAM | PADDED) and stream_id in self.streams:
                self._h2(buffer[passed:at])
                self._data(stream_id, view[body : body + size], size, out)
                passed = body + size
            elif kind == WINDOW_UPDATE and size == 4:
                self._h2(buffer[passed:at])
                step = int.from_bytes(buffer[body : body + 4], "big") & 0x7FFFFFFF
                if stream_id == 0:
                    self.conn_send_window += step
                elif stream_id in self.send_window:
                    self.send_window[stream_id] += step
                passed = body + size
            at = body + size
        self._h2(buffer[passed:at])
        self.buffer = buffer[at:]
        if out:
            pending = self.conn.data_to_send()
            self.transport.write(pending + b"".join(out) if pending else b"".join(out))

    def _h2(self, chunk: bytes) -> None:
        if not chunk:
            return
        conn = self.conn
        for event in conn.receive_data(chunk):
            if isinstance(event, h2.events.RequestReceived):
                stream_id = event.stream_id
                self.streams[stream_id] = bytearray()
                self.send_window[stream_id] = conn.remote_settings.initial_window_size
                self.unacked[stream_id] = 0
                conn.send_headers(stream_id, RESPONSE_HEADERS)
            elif isinstance(event, h2.events.DataReceived):
                # END_STREAM or padded, or read with HEADERS
                out: list[bytes] = []
                if event.stream_id in self.streams:
                    self._data(event.stream_id, memoryview(event.data), 0, out)
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self.transport.write(conn.data_to_send() + b"".join(out))
            elif isinstance(event, h2.events.StreamEnded):
                self._forget(event.stream_id)
                _end(conn, event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self._forget(event.stream_id)
        pending = conn.data_to_send()
        if pending:
            self.transport.write(pending)

    def _forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        self.send_window.pop(stream_id, None)
        self.unacked.pop(stream_id, None)

    def _data(self, stream_id: int, payload: memoryview, size: int, out: list[bytes]) -> None:
        if size:  # our own inbound flow control for the hand-read frames
            self.unacked[stream_id] += size
            self.conn_unacked += size
            if self.conn_unacked >= WINDOW // 2:
                out.append(_window_update(0, self.conn_unacked))
                self.conn_unacked = 0
            if self.unacked[stream_id] >= WINDOW // 2:
                out.append(_window_update(stream_id, self.unacked[stream_id]))
                self.unacked[stream_id] = 0
        buffer = self.streams[stream_id]
        if not buffer and len(payload) >= 5 and int.from_bytes(payload[1:5]) == len(payload) - 5:
            messages = [payload[5:]]  # the common case: one whole message in one frame
        else:
            buffer += payload
            messages = []
            while len(buffer) >= 5:
                length = int.from_bytes(buffer[1:5], "big")
                if len(buffer) < 5 + length:
                    break
                messages.append(memoryview(bytes(buffer[5 : 5 + length])))
                del buffer[: 5 + length]
        for message in messages:
            self.answer(stream_id, pb.ModelInferRequest.FromString(message), out)

    def answer(self, stream_id: int, request: Any, out: list[bytes]) -> None:
        """Answer ``request`` (here: at once, with the echo's reply)."""
        out.append(self.framed(stream_id, self.reply))

    def framed(self, stream_id: int, reply: Any) -> bytes:
        """``reply`` as one DATA frame on ``stream_id``, counted against the windows."""
        answer = reply.SerializeToString()
        framed = 5 + len(answer)
        if self.send_window[stream_id] < framed or self.conn_send_window < framed:
            raise RuntimeError("the client's window is spent (the prototype does not wait)")
        self.send_window[stream_id] -= framed
        self.conn_send_window -= framed
        return (
            FRAME.pack(framed >> 8, framed & 0xFF, DATA, 0, stream_id)
            + b"\0"
            + len(answer).to_bytes(4, "big")
            + answer
        )


class GruserveLean(LeanEcho):
    """``h2-lean``, each request answered by ``InferenceService._stream_answer`` in a task
    (one at a time per stream, in order)."""

    service: Any = None  # set by serve()

    def __init__(self) -> None:
        super().__init__()
        self.queues: dict[int, list[Any]] = {}

    def answer(self, stream_id: int, request: Any, out: list[bytes]) -> None:
        queue = self.queues.get(stream_id)
        if queue is not None:
            queue.append(request)
            return
        self.queues[stream_id] = []
        asyncio.get_running_loop().create_task(self.run(stream_id, request))

    async def run(self, stream_id: int, request: Any) -> None:
        from gruserve.sessions.owner import ANYONE

        service = self.service
        queue = self.queues[stream_id]
        while True:
            with service.telemetry.call("ModelStreamInfer", None) as call:
                reply = await service._stream_answer(request, ANYONE, call)
            if stream_id not in self.streams:
                break
            pending = self.conn.data_to_send()
            frame = self.framed(stream_id, reply)
            self.transport.write(pending + frame if pending else frame)
            if not queue:
                break
            request = queue.pop(0)
        del self.queues[stream_id]


def _end(conn: h2.connection.H2Connection, stream_id: int) -> None:
    """Send the trailers, unless the client reset the stream first."""
    with contextlib.suppress(h2.exceptions.StreamClosedError):
        conn.send_headers(stream_id, TRAILERS, end_stream=True)


def _window_update(stream_id: int, step: int) -> bytes:
    return FRAME.pack(0, 4, WINDOW_UPDATE, 0, stream_id) + step.to_bytes(4, "big")


async def serve(port: int, form: str, models_dir: Path | None) -> None:
    loop = asyncio.get_running_loop()
    protocol = {"h2": H2Echo, "h2-lean": LeanEcho, "h2-lean-gruserve": GruserveLean}[form]
    if form != "h2-lean-gruserve":
        server = await loop.create_server(protocol, "127.0.0.1", port)
        async with server:
            await server.serve_forever()
        return
    from gruserve.api.app import create_app
    from gruserve.api.v2.grpc_service import InferenceService
    from gruserve.server import SWITCH_INTERVAL_S, build_services
    from gruserve.settings import Settings

    sys.setswitchinterval(SWITCH_INTERVAL_S)
    settings = Settings(_env_file=None, models_dir=models_dir, provider="cpu", grpc_port=0)
    services = build_services(settings)
    app = create_app(settings, services)
    async with app.router.lifespan_context(app):
        GruserveLean.service = InferenceService(services, None)
        server = await loop.create_server(protocol, "127.0.0.1", port)
        async with server:
            await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8333)
    parser.add_argument("--form", choices=FORMS, default="h2")
    parser.add_argument("--models-dir", type=Path, default=None)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.form, args.models_dir))


if __name__ == "__main__":
    main()
