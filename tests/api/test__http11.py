"""One write per response (_http11.py): the joiner's rules, and a real uvicorn using it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from conftest import Served, http_exchange, live_server
from gruserve.api.protocols import _http11 as http11
from gruserve.api.protocols._http11 import GruServeHttpProtocol, _HeadJoiner
from gruserve.api.protocols._http_limits import HttpLimits
from gruserve.server import uvicorn_options
from gruserve.settings import Settings


class _Socket:
    """What a transport was asked to do, in order."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def write(self, data: bytes) -> None:
        self.calls.append(bytes(data))

    def close(self) -> None:
        self.calls.append("close")

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


async def test_head_and_body_leave_in_one_write() -> None:
    socket = _Socket()
    joiner = _HeadJoiner(socket, asyncio.get_running_loop())  # type: ignore[arg-type]
    joiner.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert socket.calls == []  # held for the body
    joiner.write(b"body")
    joiner.write(b"more")  # after the first pair, writes pass straight through
    assert socket.calls == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"more"]
    await asyncio.sleep(0)  # the scheduled flush finds nothing held
    assert socket.calls == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"more"]
    assert joiner.get_extra_info("peername") == "info:peername" and not joiner.is_closing()


async def test_a_head_without_a_body_leaves_within_the_loop_iteration() -> None:
    socket = _Socket()
    joiner = _HeadJoiner(socket, asyncio.get_running_loop())  # type: ignore[arg-type]
    joiner.write(b"head")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert socket.calls == [b"head"]
    joiner.write(b"chunk")
    assert socket.calls == [b"head", b"chunk"]


async def test_close_sends_what_is_held_first() -> None:
    socket = _Socket()
    joiner = _HeadJoiner(socket, asyncio.get_running_loop())  # type: ignore[arg-type]
    joiner.write(b"head")
    joiner.close()
    assert socket.calls == [b"head", "close"]
    await asyncio.sleep(0)
    assert socket.calls == [b"head", "close"]  # the flush does not send it twice


def test_serve_uses_it_with_the_edge_limits() -> None:
    settings = Settings(
        _env_file=None, max_header_bytes=4096, header_timeout_s=3.5, max_connections=7
    )
    protocol = uvicorn_options(settings)["http"]
    assert issubclass(protocol, GruServeHttpProtocol)
    assert protocol.limits == HttpLimits(4096, 3.5, 7)
    assert GruServeHttpProtocol.limits == HttpLimits()  # the base class keeps the defaults


async def test_a_real_server_joins_its_writes(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fails if a uvicorn release stops giving the protocol a cycle whose transport it can swap."""
    joined: list[bytes] = []

    class Recording(_HeadJoiner):
        def write(self, data: bytes) -> None:
            if self._held is not None:
                joined.append(self._held + data)
            super().write(data)

    monkeypatch.setattr(http11, "_HeadJoiner", Recording)
    async for address in live_server(served.app):
        host, port = address.split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            reply = await http_exchange(reader, writer, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        finally:
            writer.close()
    assert joined == [reply]  # the whole response, head and body, in one write


async def test_keep_alive_requests_and_a_stream_on_a_real_server(served: Served) -> None:
    r = await served.client.post("/v1/models/simple/sessions", json={})
    sid = r.json()["session_id"]
    async for address in live_server(served.app):
        host, port = address.split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for n in range(1, 4):  # one connection, several responses, each whole and in order
                body = json.dumps({"inputs": [0.1 * n, 0.2, 0.3], "step": n - 1}).encode()
                reply = await http_exchange(
                    reader,
                    writer,
                    f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nhost: x\r\n"
                    f"content-length: {len(body)}\r\n\r\n".encode()
                    + body,
                )
                head, _, payload = reply.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 ") and b"server:" not in head.lower()
                assert json.loads(payload)["step"] == n
            # an NDJSON stream answers its head before any request line arrives: a client that
            # waits for the head before sending lines must get it, although no body follows yet
            writer.write(
                f"POST /v1/sessions/{sid}/stream HTTP/1.1\r\nhost: x\r\n"
                "transfer-encoding: chunked\r\n\r\n".encode()
            )
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ") and b"application/x-ndjson" in head
            line = b'{"inputs": [1, 2, 3]}\n'
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(line), line))
            await writer.drain()
            size = int(await asyncio.wait_for(reader.readuntil(b"\r\n"), 5), 16)
            assert json.loads(await reader.readexactly(size))["step"] == 4
        finally:
            writer.close()


async def test_pipelined_requests_are_answered_whole_and_in_order(served: Served) -> None:
    r = await served.client.post("/v1/models/simple/sessions", json={})
    sid = r.json()["session_id"]
    bodies = [json.dumps({"inputs": [0.1 * n, 0.2, 0.3], "step": n}).encode() for n in range(3)]
    requests = (
        b"".join(
            f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nhost: x\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode()
            + body
            for body in bodies
        )
        + b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
    )
    async for address in live_server(served.app):
        host, port = address.split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(requests)  # all four at once, before reading anything
            await writer.drain()
            steps = []
            for _ in bodies:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                steps.append(json.loads(await reader.readexactly(length))["step"])
            assert steps == [1, 2, 3]
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
        finally:
            writer.close()


@pytest.mark.parametrize("expect", [b"", b"expect: 100-continue\r\n"])
async def test_error_responses_and_100_continue(served: Served, expect: bytes) -> None:
    async for address in live_server(served.app):
        host, port = address.split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            body = b'{"inputs": [1, 2, 3]}'
            writer.write(
                b"POST /v1/sessions/nobody/step HTTP/1.1\r\nhost: x\r\n%scontent-length: %d\r\n\r\n"
                % (expect, len(body))
            )
            await writer.drain()
            if expect:
                interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert interim.startswith(b"HTTP/1.1 100 ")
            writer.write(body)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 404 ")
        finally:
            writer.close()
