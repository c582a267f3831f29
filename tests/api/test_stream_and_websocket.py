"""NDJSON streams and WebSocket steps, on both stores; the WebSocket runs on a real uvicorn."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conftest import Served, live_server

ATOL = 1e-5


async def _create(client: httpx.AsyncClient, model: str) -> str:
    r = await client.post(f"/v1/models/{model}/sessions", json={})
    return str(r.json()["session_id"])


async def test_ndjson_lines_are_steps(
    client: httpx.AsyncClient, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    x = rng.normal(size=(1, 6, 3)).astype(np.float32)
    sid = await _create(client, "stacked")
    lines = [
        {"inputs": x[0, :1].tolist()},
        {"inputs": x[0, 1].tolist()},
        {"inputs": x[0, 2:].tolist()},
    ]
    body = "\n".join(json.dumps(line) for line in lines) + "\n\n"
    r = await client.post(f"/v1/sessions/{sid}/stream", content=body.encode())
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    replies = [json.loads(line) for line in r.text.splitlines()]
    assert [reply["step"] for reply in replies] == [1, 2, 3]
    streamed = np.concatenate([np.asarray(reply["outputs"]).reshape(-1, 2) for reply in replies])
    np.testing.assert_allclose(streamed, tiny_models["stacked"].reference(x)[0][0][0], atol=ATOL)


async def test_ndjson_stops_at_the_first_bad_line(client: httpx.AsyncClient) -> None:
    sid = await _create(client, "simple")
    body = b'{"inputs": [1, 2, 3]}\n{"inputs": [1, 2]}\n{"inputs": [1, 2, 3]}\n'
    r = await client.post(f"/v1/sessions/{sid}/stream", content=body)
    replies = [json.loads(line) for line in r.text.splitlines()]
    assert len(replies) == 2 and replies[0]["step"] == 1
    assert replies[1]["line"] == 2 and replies[1]["error"]["status"] == 422
    assert replies[1]["error"]["field"] == "inputs"
    assert (await client.get(f"/v1/sessions/{sid}")).json()["step"] == 1
    r = await client.post("/v1/sessions/nobody/stream", content=body)
    assert r.status_code == 404 and r.json()["error"]["type"] == "SessionNotFound"
    text = (await client.get("/metrics")).text  # the error line counts as a request's error
    assert 'gruserve_errors_total{type="InvalidInput"} 1.0' in text
    assert 'gruserve_errors_total{type="SessionNotFound"} 1.0' in text


@pytest.fixture
async def ws_url(served: Served) -> Any:
    async for address in live_server(served.app):
        yield f"ws://{address}"


@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_websocket_binary_and_text(
    served: Served,
    ws_url: str,
    tiny_models: dict[str, Any],
    rng: np.random.Generator,
    compression: str | None,
) -> None:
    """Uncompressed messages are framed by gruserve's protocol, compressed ones by websockets."""
    x = rng.normal(size=(1, 7, 3)).astype(np.float32)
    sid = await _create(served.client, "stacked")
    outputs = []
    async with connect(f"{ws_url}/v1/sessions/{sid}/ws", compression=compression) as ws:
        assert bool(ws.protocol.extensions) == (compression is not None)
        for t in range(3):  # binary: one timestep each
            await ws.send(x[0, t].astype("<f4").tobytes())
            reply = await ws.recv()
            assert isinstance(reply, bytes)
            outputs.append(np.frombuffer(reply, "<f4").reshape(-1, 2))
        await ws.send(x[0, 3:5].astype("<f4").tobytes())  # binary: two timesteps
        reply = await ws.recv()
        assert isinstance(reply, bytes)
        outputs.append(np.frombuffer(reply, "<f4").reshape(-1, 2))
        await ws.send(json.dumps({"inputs": x[0, 5:].tolist()}))  # text
        reply = json.loads(await ws.recv())
        assert reply["step"] == 5
        outputs.append(np.asarray(reply["outputs"]))

        await ws.send(b"\0\0\0")  # bad messages: an error, the connection stays open
        error = json.loads(await ws.recv())["error"]
        assert (
            error["type"] == "InvalidInput"
            and error["status"] == 422
            and error["field"] == "message"
        )
        await ws.send(np.array([1, np.nan, 2], "<f4").tobytes())
        assert (
            json.loads(await ws.recv())["error"]["field"] == "inputs[0][1]"
        )  # timestep 0, feature 1
        await ws.send('{"inputs": [1, 2]}')
        assert json.loads(await ws.recv())["error"]["field"] == "inputs"
    np.testing.assert_allclose(
        np.concatenate(outputs), tiny_models["stacked"].reference(x)[0][0][0], atol=ATOL
    )
    assert (await served.client.get(f"/v1/sessions/{sid}")).json()["step"] == 5
    text = (await served.client.get("/metrics")).text  # error messages count as errors
    assert 'gruserve_errors_total{type="InvalidInput"} 3.0' in text


async def test_websocket_unknown_or_deleted_session(served: Served, ws_url: str) -> None:
    async with connect(f"{ws_url}/v1/sessions/nobody/ws") as ws:
        assert json.loads(await ws.recv())["error"]["type"] == "SessionNotFound"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404
    sid = await _create(served.client, "simple")
    async with connect(f"{ws_url}/v1/sessions/{sid}/ws") as ws:
        await ws.send(np.zeros(3, "<f4").tobytes())
        await ws.recv()
        await served.client.delete(f"/v1/sessions/{sid}")
        await ws.send(np.zeros(3, "<f4").tobytes())
        assert json.loads(await ws.recv())["error"]["status"] == 404
        with pytest.raises(ConnectionClosed):
            await ws.recv()
