"""Exactly-once steps on every transport: REST (fast path and FastAPI route), NDJSON,
WebSocket (JSON and the ``gruserve-step`` binary framing) and v2 sequences.

Each transport: a numbered step applies once; resending its number answers the same
reply without applying it again; resending it with other inputs or another mask answers
409 ``StepMismatch`` (never the kept reply); any other number answers 409
``StepOutOfOrder`` with the session's ``current_step``; numbers that are not integers
>= 0 answer 422.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import httpx
import numpy as np
import pytest
from test_v2 import outputs_of, v2_body
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from conftest import Served, live_server

ATOL = 1e-5
BAD_NUMBERS = ["1", -1, 1.5, True, 2**63, [0], {"n": 0}]


async def _create(client: httpx.AsyncClient, model: str = "stacked") -> str:
    r = await client.post(f"/v1/models/{model}/sessions", json={})
    return str(r.json()["session_id"])


async def _step_count(client: httpx.AsyncClient, sid: str) -> int:
    return int((await client.get(f"/v1/sessions/{sid}")).json()["step"])


def _mismatch(body: dict[str, Any], sent: int, current: int) -> None:
    error = body["error"]
    assert error["type"] == "StepMismatch" and error["field"] == "step", body
    assert error["current_step"] == current
    assert f"already applied step={sent} with other inputs" in error["message"]


def _out_of_order(body: dict[str, Any], current: int) -> None:
    error = body["error"]
    assert error["type"] == "StepOutOfOrder" and error["field"] == "step"
    assert error["current_step"] == current
    assert f"has applied {current} steps" in error["message"]


@pytest.mark.parametrize("root_path", ["", "/api"], ids=["fast path", "fastapi route"])
async def test_rest(
    served: Served, tiny_models: dict[str, Any], rng: np.random.Generator, root_path: str
) -> None:
    transport = httpx.ASGITransport(served.app, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://gruserve") as client:
        sid = await _create(client)
        url = f"{root_path}/v1/sessions/{sid}/step"
        x = rng.normal(size=(3, 2, 3)).astype(np.float32)
        replies = []
        for n in range(3):
            r = await client.post(url, json={"inputs": x[n].tolist(), "step": n})
            assert r.status_code == 200, r.text
            assert r.json()["step"] == n + 1
            replies.append(r)
            again = await client.post(url, json={"inputs": x[n].tolist(), "step": n})
            assert again.status_code == 200 and again.content == r.content  # byte for byte
        for sent in (0, 1, 4):
            r = await client.post(url, json={"inputs": x[0].tolist(), "step": sent})
            assert r.status_code == 409
            _out_of_order(r.json(), 3)
        other = x[2].copy()
        other[1, 2] += 1e-3  # one value off
        for changed in (
            {"inputs": other.tolist()},
            {"inputs": x[2].tolist(), "mask": [True, False]},
            {"inputs": x[2][:1].tolist()},
        ):
            r = await client.post(url, json={**changed, "step": 2})
            assert r.status_code == 409, r.text
            _mismatch(r.json(), 2, 3)
        same = {"inputs": x[2].tolist(), "mask": [True, True], "step": 2}  # all true: no mask
        r = await client.post(url, json=same)
        assert r.status_code == 200 and r.content == replies[2].content
        for bad in BAD_NUMBERS:
            r = await client.post(url, json={"inputs": x[0].tolist(), "step": bad})
            assert r.status_code == 422 and r.json()["error"]["field"] == "step", (bad, r.text)
        r = await client.post(url, content=b'{"inputs": [1, 2, 3], "step": NaN}')
        assert r.status_code == 422 and "NaN" in r.json()["error"]["message"]
        assert await _step_count(client, sid) == 3
        expected, _ = tiny_models["stacked"].reference(x.reshape(1, 6, 3))
        got = np.concatenate([np.asarray(r.json()["outputs"]) for r in replies])
        np.testing.assert_allclose(got, expected[0][0], atol=ATOL)
    if root_path == "":
        text = (await served.client.get("/metrics")).text
        assert "gruserve_step_replays_total 4.0" in text
        assert 'gruserve_errors_total{type="StepOutOfOrder"} 3.0' in text
        assert 'gruserve_errors_total{type="StepMismatch"} 3.0' in text


async def test_ndjson(client: httpx.AsyncClient, rng: np.random.Generator) -> None:
    sid = await _create(client)
    x = rng.normal(size=(3, 3)).astype(np.float32)
    lines = [
        {"inputs": x[0].tolist(), "step": 0},
        {"inputs": x[1].tolist(), "step": 1},
        {"inputs": x[1].tolist(), "step": 1},  # a resend: the same reply, not applied again
        {"inputs": x[2].tolist()},  # no number: at-least-once, applied
        {"inputs": x[2].tolist(), "step": 7},  # out of order: an error line ends the stream
        {"inputs": x[2].tolist(), "step": 3},
    ]
    body = "".join(json.dumps(line) + "\n" for line in lines).encode()
    r = await client.post(f"/v1/sessions/{sid}/stream", content=body)
    replies = [json.loads(line) for line in r.text.splitlines()]
    assert [reply.get("step") for reply in replies[:4]] == [1, 2, 2, 3]
    assert replies[1] == replies[2]
    assert len(replies) == 5 and replies[4]["line"] == 5 and replies[4]["error"]["status"] == 409
    _out_of_order(replies[4], 3)
    assert await _step_count(client, sid) == 3


@pytest.fixture
async def ws_url(served: Served) -> Any:
    async for address in live_server(served.app):
        yield f"ws://{address}"


async def test_websocket_json(served: Served, ws_url: str, rng: np.random.Generator) -> None:
    sid = await _create(served.client)
    x = rng.normal(size=(2, 3)).astype(np.float32)
    async with connect(f"{ws_url}/v1/sessions/{sid}/ws") as ws:
        assert ws.subprotocol is None
        await ws.send(json.dumps({"inputs": x[0].tolist(), "step": 0}))
        first = await ws.recv()
        await ws.send(json.dumps({"inputs": x[0].tolist(), "step": 0}))
        assert await ws.recv() == first  # the resend gets the same reply
        await ws.send(json.dumps({"inputs": x[1].tolist(), "step": 0}))
        error = json.loads(await ws.recv())  # the same number with other inputs does not
        assert error["error"]["status"] == 409
        _mismatch(error, 0, 1)
        await ws.send(json.dumps({"inputs": x[1].tolist(), "step": 2}))
        error = json.loads(await ws.recv())
        assert error["error"]["status"] == 409
        _out_of_order(error, 1)
        await ws.send(json.dumps({"inputs": x[1].tolist(), "step": -1}))
        assert json.loads(await ws.recv())["error"]["field"] == "step"
    assert json.loads(first)["step"] == 1 and await _step_count(served.client, sid) == 1


async def test_websocket_binary_framing(
    served: Served, ws_url: str, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    """``gruserve-step``: an 8-byte little-endian step number before the values, both ways."""
    sid = await _create(served.client)
    x = rng.normal(size=(4, 3)).astype("<f4")
    frame = struct.Struct("<Q")
    async with connect(
        f"{ws_url}/v1/sessions/{sid}/ws", subprotocols=[Subprotocol("gruserve-step")]
    ) as ws:
        assert ws.subprotocol == "gruserve-step"
        outputs = []
        for n in range(3):
            await ws.send(frame.pack(n) + x[n].tobytes())
            reply = await ws.recv()
            assert isinstance(reply, bytes) and frame.unpack_from(reply)[0] == n + 1
            outputs.append(np.frombuffer(reply[8:], "<f4"))
            await ws.send(frame.pack(n) + x[n].tobytes())
            assert await ws.recv() == reply
            await ws.send(frame.pack(n) + (x[n] + 1).tobytes())  # same number, other values
            _mismatch(json.loads(await ws.recv()), n, n + 1)
        await ws.send(frame.pack(2**64 - 1) + x[3].tobytes())  # no number: at-least-once
        reply = await ws.recv()
        assert isinstance(reply, bytes) and frame.unpack_from(reply)[0] == 4
        outputs.append(np.frombuffer(reply[8:], "<f4"))
        await ws.send(frame.pack(1) + x[3].tobytes())
        _out_of_order(json.loads(await ws.recv()), 4)
        await ws.send(b"\x01\x02")  # shorter than the step number
        error = json.loads(await ws.recv())["error"]
        assert error["status"] == 422 and "8-byte step number" in error["message"]
        await ws.send(frame.pack(2**63) + x[0].tobytes())
        assert json.loads(await ws.recv())["error"]["field"] == "step"
        await ws.send(json.dumps({"inputs": x[0].tolist(), "step": 4}))  # text: unchanged
        assert json.loads(await ws.recv())["step"] == 5
    expected, _ = tiny_models["stacked"].reference(x[None])
    np.testing.assert_allclose(np.stack(outputs), expected[0][0], atol=ATOL)


async def test_v2_sequence_step(served: Served, rng: np.random.Generator) -> None:
    client = served.client
    x = rng.normal(size=(3, 1, 1, 3)).astype(np.float32)

    async def infer(i: int, **parameters: Any) -> httpx.Response:
        body, headers = v2_body([("inputs", "FP32", x[i])], {"sequence_id": 5, **parameters})
        return await client.post("/v2/models/stacked/infer", content=body, headers=headers)

    first = await infer(0, sequence_start=True, sequence_step=0)
    assert first.json()["parameters"]["step"] == 1
    second = await infer(1, sequence_step=1)
    again = await infer(1, sequence_step=1)  # a resend: the kept reply comes back
    assert again.content == second.content
    np.testing.assert_allclose(outputs_of(again)["outputs"], outputs_of(second)["outputs"], atol=0)
    other = await infer(2, sequence_step=1)  # other inputs under the same number: refused
    assert other.status_code == 409
    assert "already applied step=1 with other inputs" in other.json()["error"]
    late = await infer(2, sequence_step=0)
    assert late.status_code == 409
    message = late.json()["error"]
    assert isinstance(message, str) and "has applied 2 steps" in message
    for parameters in ({"sequence_step": -1}, {"sequence_step": "2"}, {"sequence_step": True}):
        r = await infer(2, **parameters)
        assert r.status_code == 422 and "sequence_step" in r.json()["error"], r.text
    r = await infer(2, sequence_start=True, sequence_step=2)
    assert r.status_code == 422 and "step 0" in r.json()["error"]
    body, headers = v2_body([("inputs", "FP32", x[0])], {"sequence_step": 0})  # no sequence
    r = await client.post("/v2/models/stacked/infer", content=body, headers=headers)
    assert r.status_code == 422 and "sequence_id" in r.json()["error"]
    assert await _step_count(client, "v2:stacked:5") == 2
