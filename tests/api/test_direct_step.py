"""The step route answered by the HTTP protocol itself (fast_step.DirectStep, protocols/_http11.py).

Under ``gruserve serve``'s options a step request that the edge and the key check would
let through is answered without ASGI. These tests run a real uvicorn configured that way
and speak raw HTTP/1.1 to it: the answers must be those of the ASGI route (numbers,
errors, headers, metrics), whatever the framing (keep-alive, pipelining, a body in
pieces, ``Connection: close``), and everything the direct path does not take must still
be answered by the ASGI layers.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import Served, StuckStep, free_port, http_exchange, live_server, serve
from gruserve.api.v1.fast_step import DirectStep, StepEndpoint

ATOL = 1e-5
STEP_ROUTE = 'route="/v1/sessions/{session_id}/step"'
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def direct(served: Served) -> DirectStep:
    routes: Any = served.app.direct_routes
    assert isinstance(routes, DirectStep)
    return routes


def asgi_step(served: Served) -> StepEndpoint:
    endpoint: Any = served.app.hot_paths.step
    assert isinstance(endpoint, StepEndpoint)
    return endpoint


def step_request(sid: str, body: bytes, headers: bytes = b"") -> bytes:
    return b"POST /v1/sessions/%s/step HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n%s\r\n%s" % (
        sid.encode(),
        len(body),
        headers,
        body,
    )


def parse(reply: bytes) -> tuple[int, dict[bytes, bytes], Any]:
    """``(status, headers by lower-case name, JSON body)`` of one whole response."""
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    fields = dict(line.split(b": ", 1) for line in lines)
    return int(status_line.split()[1]), {k.lower(): v for k, v in fields.items()}, json.loads(body)


async def session(served: Served, model: str = "simple") -> str:
    r = await served.client.post(f"/v1/models/{model}/sessions", json={})
    return str(r.json()["session_id"])


@pytest.fixture
async def connection(served: Served) -> AsyncIterator[Connection]:
    """A raw keep-alive connection to a real server running ``served``'s app."""
    async for address in live_server(served.app):
        host, port = address.split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            yield reader, writer
        finally:
            writer.close()


async def test_steps_are_answered_directly_and_match_the_model(
    served: Served, tiny_models: dict[str, Any], connection: Connection
) -> None:
    sid = await session(served)
    x = np.random.default_rng(3).normal(size=(6, 3)).astype(np.float32)
    outputs = []
    for n, chunk in enumerate((x[:1], x[1:4], x[4:])):  # state carries over, chunk by chunk
        body = json.dumps({"inputs": chunk.tolist(), "step": n}).encode()
        status, headers, reply = parse(await http_exchange(*connection, step_request(sid, body)))
        assert status == 200 and reply["step"] == n + 1
        assert headers[b"content-type"] == b"application/json"
        assert re.fullmatch(rb"[0-9a-f]{32}", headers[b"x-request-id"])  # made, as the edge does
        assert b"date" in headers and b"server" not in headers and b"connection" not in headers
        outputs += reply["outputs"]
    expected = tiny_models["simple"].reference(x[None])[0][0][0]
    np.testing.assert_allclose(outputs, expected, atol=ATOL)
    assert direct(served).taken == 3 and asgi_step(served).taken == 0
    text = (await served.client.get("/metrics")).text
    assert f'gruserve_http_requests_total{{method="POST",{STEP_ROUTE},status="200"}} 3.0' in text
    assert 'gruserve_http_request_seconds_count{route="/v1/sessions/{session_id}/step"} 3.0' in text


async def test_errors_request_ids_and_metrics_are_the_asgi_routes(
    served: Served, connection: Connection
) -> None:
    sid = await session(served)
    cases = [
        (sid, b'{"inputs": [1, 2', 422, "InvalidInput", "body"),
        (sid, b'{"inputs": [1, NaN, 2]}', 422, "InvalidInput", "inputs[1]"),
        (sid, b'{"inputs": [1, 2, 3], "step": 5}', 409, "StepOutOfOrder", "step"),
        ("nobody", b'{"inputs": [1, 2, 3]}', 404, "SessionNotFound", None),
    ]
    direct_replies = []
    for target, body, status, kind, field in cases:
        raw = step_request(target, body, b"x-request-id: trace-%d\r\n" % status)
        code, headers, reply = parse(await http_exchange(*connection, raw))
        assert (code, reply["error"]["type"], reply["error"]["field"]) == (status, kind, field)
        assert headers[b"x-request-id"] == b"trace-%d" % status  # the client's id, echoed
        direct_replies.append(reply)
    assert direct(served).taken == len(cases)
    # the same requests through the ASGI route answer the same bodies
    for (target, body, *_), reply in zip(cases, direct_replies, strict=True):
        r = await served.client.post(f"/v1/sessions/{target}/step", content=body)
        assert r.json() == reply
    text = (await served.client.get("/metrics")).text
    assert 'gruserve_errors_total{type="InvalidInput"} 4.0' in text
    assert f'{STEP_ROUTE},status="422"}} 4.0' in text and f'{STEP_ROUTE},status="404"}} 2.0' in text
    assert (await served.client.get(f"/v1/sessions/{sid}")).json()["step"] == 0


async def test_a_bug_is_a_500_that_hides_it(
    served: Served,
    connection: Connection,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sid = await session(served)

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("secret internals")

    monkeypatch.setattr(served.services.sessions, "step", broken)
    raw = step_request(sid, b'{"inputs": [1, 2, 3]}')
    status, _, reply = parse(await http_exchange(*connection, raw))
    assert status == 500 and reply["error"]["type"] == "InternalError"
    assert "secret" not in json.dumps(reply) and "secret internals" in caplog.text
    # a failure of the direct path itself: uvicorn's plain 500, and the connection is closed
    monkeypatch.setattr(direct(served), "answer", broken)
    reader, writer = connection
    reply_bytes = await http_exchange(reader, writer, raw)
    assert reply_bytes.startswith(b"HTTP/1.1 500 ") and reply_bytes.endswith(
        b"Internal Server Error"
    )
    assert b"connection: close" in reply_bytes
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server


async def test_pipelined_framing_and_a_body_in_pieces(
    served: Served, connection: Connection
) -> None:
    sid = await session(served)
    reader, writer = connection
    bodies = [json.dumps({"inputs": [0.1 * n, 0.2, 0.3], "step": n}).encode() for n in range(3)]
    # a direct step, an ASGI request, a step with a body in three writes, then one that closes
    writer.write(step_request(sid, bodies[0]) + b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    last = step_request(sid, bodies[1])
    for piece in (last[:-9], last[-9:-4], last[-4:]):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.02)
    writer.write(step_request(sid, bodies[2], b"connection: close\r\n"))
    replies = [parse(await http_exchange(reader, writer, b"")) for _ in range(4)]
    assert [status for status, _, _ in replies] == [200] * 4
    assert replies[1][2] == {"status": "ok"}
    assert [replies[i][2]["step"] for i in (0, 2, 3)] == [1, 2, 3]
    assert replies[3][1][b"connection"] == b"close"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert direct(served).taken == 3


async def test_what_the_edge_or_key_check_must_answer_goes_the_asgi_way(
    models_dir: Path, tiny_models: dict[str, Any]
) -> None:
    async for s in serve(models_dir, max_request_bytes=100, api_keys="k1"):
        r = await s.client.post("/v1/models/simple/sessions", json={}, headers={"x-api-key": "k1"})
        sid = r.json()["session_id"]
        async for address in live_server(s.app):
            host, port = address.split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                body = b'{"inputs": [1, 2, 3]}'
                ok = b"authorization: Bearer k1\r\n"
                exchanges = [  # (request, status): only the first one is direct
                    (step_request(sid, body, ok), 200),
                    (step_request(sid, body), 401),
                    (step_request(sid, body, b"x-api-key: k2\r\n"), 403),
                    (
                        step_request(sid, b'{"inputs": [[1, 2, 3]], "x": "%s"}' % (b"a" * 99), ok),
                        413,
                    ),
                    (
                        b"POST /v1/sessions/%s/step HTTP/1.1\r\nhost: x\r\n%s"
                        b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                        % (sid.encode(), ok, len(body), body),
                        200,
                    ),
                    (step_request(f"%{ord(sid[0]):02X}{sid[1:]}", body, ok), 200),  # escaped id
                ]
                for raw, expected in exchanges:
                    status, headers, reply = parse(await http_exchange(reader, writer, raw))
                    assert status == expected, reply
                    assert b"x-request-id" in headers
                    if status == 413:
                        break  # the edge closes the connection after refusing a body
                writer.close()
                reader, writer = await asyncio.open_connection(host, int(port))
                steps = []
                for raw, _ in exchanges[4:]:
                    status, _, reply = parse(await http_exchange(reader, writer, raw))
                    steps.append((status, reply["step"]))
                assert steps == [(200, 2), (200, 3)]
            finally:
                writer.close()
        # the key check and the edge refused three before the route: the ASGI route took two
        assert direct(s).taken == 1 and asgi_step(s).taken == 2
        text = (await s.client.get("/metrics", headers={"x-api-key": "k1"})).text
        for status, count in ((200, 3), (401, 1), (403, 1), (413, 1)):
            assert f'{STEP_ROUTE},status="{status}"}} {count}.0' in text


async def test_a_lost_connection_cancels_the_step_at_once(
    served: Served, connection: Connection, stuck_step: StuckStep
) -> None:
    sid = await session(served)
    writer = connection[1]
    writer.write(step_request(sid, b'{"inputs": [1, 2, 3]}'))
    await writer.drain()
    await asyncio.wait_for(stuck_step.started.wait(), 5)
    writer.close()
    # no watcher grace period: the protocol hears of the lost connection itself
    await asyncio.wait_for(stuck_step.cancelled.wait(), 1)
    text = ""
    for _ in range(50):  # the answer (499, never sent) is counted once the task has unwound
        text = (await served.client.get("/metrics")).text
        if f'{STEP_ROUTE},status="499"}} 1.0' in text:
            break
        await asyncio.sleep(0.01)
    assert f'{STEP_ROUTE},status="499"}} 1.0' in text
    assert 'gruserve_errors_total{type="ClientDisconnected"} 1.0' in text


async def test_with_the_access_log_on_every_request_goes_through_asgi(
    models_dir: Path, tiny_models: dict[str, Any]
) -> None:
    async for s in serve(models_dir, log_level="debug"):  # uvicorn's access log is on at debug
        sid = await session(s)
        async for address in live_server(s.app):
            host, port = address.split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                raw = step_request(sid, b'{"inputs": [1, 2, 3]}')
                status, _, reply = parse(await http_exchange(reader, writer, raw))
            finally:
                writer.close()
        assert status == 200 and reply["step"] == 1
        assert direct(s).taken == 0 and asgi_step(s).taken == 1


async def test_a_uvicorn_without_a_piece_it_reads_answers_through_asgi_and_says_so(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A uvicorn release that renamed a piece: the step is answered as uvicorn would answer
    it, and the first connection logs the piece (once, not per connection)."""
    from gruserve.api.protocols import _http11, _uvicorn_fit

    monkeypatch.setattr(_http11, "_UVICORN_PIECES", (*_http11._UVICORN_PIECES, "renamed_piece"))
    monkeypatch.setattr(_uvicorn_fit, "_reported", set())
    sid = await session(served)
    replies = []
    async for address in live_server(served.app):
        host, port = address.split(":")
        for n in range(2):  # two connections, one warning
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                body = json.dumps({"inputs": [1, 2, 3], "step": n}).encode()
                replies.append(parse(await http_exchange(reader, writer, step_request(sid, body))))
            finally:
                writer.close()
    assert [(status, reply["step"]) for status, _, reply in replies] == [(200, 1), (200, 2)]
    assert direct(served).taken == 0 and asgi_step(served).taken == 2
    warnings = [r.getMessage() for r in caplog.records if r.name == _uvicorn_fit.__name__]
    assert len(warnings) == 1 and "renamed_piece" in warnings[0] and "httptools" in warnings[0]


async def test_shutdown_waits_for_a_step_in_flight(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    from gruserve.server import uvicorn_options

    sid = await session(served)
    original, started = served.services.sessions.step, asyncio.Event()

    async def slow_step(*args: Any, **kwargs: Any) -> Any:
        started.set()
        await asyncio.sleep(0.3)
        return await original(*args, **kwargs)

    monkeypatch.setattr(served.services.sessions, "step", slow_step)
    port = free_port()
    options = {**uvicorn_options(served.app.state.settings), "log_level": "warning"}
    server = uvicorn.Server(uvicorn.Config(served.app, port=port, lifespan="off", **options))
    serving = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(step_request(sid, b'{"inputs": [1, 2, 3]}'))
        await asyncio.wait_for(started.wait(), 5)
        server.should_exit = True  # as on SIGTERM: stop accepting, finish what is in flight
        status, headers, reply = parse(await http_exchange(reader, writer, b""))
    finally:
        writer.close()
    await asyncio.wait_for(serving, 10)
    assert status == 200 and reply["step"] == 1 and headers[b"connection"] == b"close"
    assert direct(served).taken == 1
