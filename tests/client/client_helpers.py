"""Proxies that break the network between a client and real ``gruserve serve`` processes.

- :class:`ReplyDropper`: an HTTP/1.1 proxy that passes every request to the server and
  loses every n-th reply (the server applied the request; the client never hears back);
- :class:`Failover`: a TCP proxy that connects each client connection to the first of
  several servers that accepts, as a load balancer skips a dead replica.

Both count what they did, so a test can show the fault happened.

:func:`array` and :func:`with_states` narrow what the client returns for the one-output
demo model.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import BinaryIO

import numpy as np

from gruserve.client import Outputs


def array(answer: Outputs | tuple[Outputs, dict[str, np.ndarray]]) -> np.ndarray:
    """A step's, stream step's or predict's outputs for a model with one output: its array
    (the client's return type also covers a dict of several outputs and the
    ``(outputs, states)`` of ``return_state`` or an ending step)."""
    assert isinstance(answer, np.ndarray), type(answer)
    return answer


def with_states(
    answer: Outputs | tuple[Outputs, dict[str, np.ndarray]],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The ``(outputs, states)`` of ``predict(..., return_state=True)`` or of a step with
    ``end={"return_state": True}``, for a model with one output."""
    assert isinstance(answer, tuple), type(answer)
    outputs, states = answer
    return array(outputs), states


def _read_message(reader: BinaryIO) -> bytes | None:
    """One HTTP/1.1 message (head and a Content-Length body) from ``reader``; None at EOF."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = reader.readline()
        if not line:
            return None
        head += line
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        if name.strip().lower() == b"transfer-encoding":
            raise RuntimeError("the proxy reads Content-Length bodies only")
    body = reader.read(length) if length else b""
    return head + body


def _pump(source: BinaryIO, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.read1(65536):  # type: ignore[attr-defined]
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_RDWR)


class ReplyDropper:
    """An HTTP/1.1 proxy in front of ``upstream_port`` that loses every ``every``-th reply.

    The request is passed on whole and the server's whole reply read; then, for every
    ``every``-th reply (all routes counted), the client's connection is closed without
    it (``hold=False``: a dropped connection) or left open and silent until the client
    gives up (``hold=True``: a timeout). A WebSocket handshake's reply counts too; once
    one is through, the connection's frames pass unchanged both ways.
    """

    def __init__(self, upstream_port: int, every: int, hold: bool = False) -> None:
        self.upstream_port, self.every, self.hold = upstream_port, every, hold
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.replies = self.dropped = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        with self._lock:
            self._sockets += [client, upstream]
        with (
            contextlib.suppress(OSError),
            client,
            upstream,
            client.makefile("rb") as from_client,
            upstream.makefile("rb") as from_upstream,
        ):
            while (request := _read_message(from_client)) is not None:
                upstream.sendall(request)
                reply = _read_message(from_upstream)
                if reply is None:
                    return
                with self._lock:
                    self.replies += 1
                    drop = self.replies % self.every == 0
                    self.dropped += drop
                if drop:
                    if self.hold:
                        client.recv(1)  # until the client times out and closes
                    return
                client.sendall(reply)
                if reply.startswith(b"HTTP/1.1 101"):  # a WebSocket: its frames pass as they are
                    back = threading.Thread(target=_pump, args=(from_upstream, client))
                    back.start()
                    _pump(from_client, upstream)
                    back.join()
                    return

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()


class Failover:
    """A TCP proxy: each connection goes to the first of ``upstream_ports`` that accepts.

    Attributes:
        connections: per upstream port, the connections made to it.
    """

    def __init__(self, upstream_ports: list[int]) -> None:
        self.upstream_ports = upstream_ports
        self.connections = dict.fromkeys(upstream_ports, 0)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            upstream = self._connect()
            if upstream is None:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _connect(self) -> socket.socket | None:
        for port in self.upstream_ports:
            try:
                upstream = socket.create_connection(("127.0.0.1", port), timeout=5)
            except OSError:
                continue
            upstream.settimeout(None)
            with self._lock:
                self.connections[port] += 1
            return upstream
        return None

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (sink, source):  # either side gone: the connection is over
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
