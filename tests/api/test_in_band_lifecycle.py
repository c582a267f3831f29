"""Sessions created and ended by their own steps on every transport, both stores.

Each transport runs one session as in-band steps (a numbered create-step, its resend,
a plain step, an end-step asking for the final state) and must answer what an explicit
create + steps + delete answers; the resend gets the same reply and makes one session;
ending again is 404; a create-step naming another model for a taken id is 409; a bad
``create`` or ``end`` is 422 naming the field. (v2 sequence start/end: tests/api/test_v2.py.)
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect

from conftest import Served, live_server

Reply = dict[str, Any]
Send = Callable[[str, list[Reply]], Awaitable[list[Reply]]]
TRANSPORTS = ["rest", "fastapi", "direct", "ndjson", "websocket", "bulk"]


def _normal(status: int, body: Reply) -> Reply:
    """A reply as ``{"outputs", "step", "states"?}`` or ``{"status", "type", "field"?}``."""
    error = body.get("error")
    if error is None:
        return body
    return {
        "status": error.get("status", status),
        "type": error["type"],
        "field": error.get("field"),
    }


def _sender(kind: str, client: httpx.AsyncClient, address: str) -> Send:
    async def rest(sid: str, bodies: list[Reply]) -> list[Reply]:
        prefix = "/api" if kind == "fastapi" else ""
        replies = []
        for body in bodies:
            r = await client.post(f"{prefix}/v1/sessions/{sid}/step", json=body)
            replies.append(_normal(r.status_code, r.json()))
        return replies

    async def direct(sid: str, bodies: list[Reply]) -> list[Reply]:
        replies = []
        async with httpx.AsyncClient(base_url=f"http://{address}") as real:
            for body in bodies:
                r = await real.post(f"/v1/sessions/{sid}/step", json=body)
                replies.append(_normal(r.status_code, r.json()))
        return replies

    async def ndjson(sid: str, bodies: list[Reply]) -> list[Reply]:
        replies = []
        for body in bodies:  # one stream per step: an error line ends a stream
            r = await client.post(
                f"/v1/sessions/{sid}/stream?model=stacked", content=json.dumps(body) + "\n"
            )
            replies.append(_normal(200, json.loads(r.text.splitlines()[0])))
        return replies

    async def websocket(sid: str, bodies: list[Reply]) -> list[Reply]:
        replies = []
        async with connect(f"ws://{address}/v1/sessions/{sid}/ws?model=stacked") as ws:
            for body in bodies:
                await ws.send(json.dumps(body))
                replies.append(_normal(200, json.loads(await ws.recv())))
        return replies

    async def bulk(sid: str, bodies: list[Reply]) -> list[Reply]:
        replies = []
        for body in bodies:
            r = await client.post(
                "/v1/models/stacked/steps", json={"steps": [{"session_id": sid, **body}]}
            )
            result = r.json()["results"][0]
            result.pop("session_id")
            replies.append(_normal(200, result))
        return replies

    return {"direct": direct, "ndjson": ndjson, "websocket": websocket, "bulk": bulk}.get(
        kind, rest
    )


@pytest.fixture
async def address(served: Served) -> Any:
    async for found in live_server(served.app):
        yield found


async def _explicit(client: httpx.AsyncClient, x: np.ndarray) -> tuple[list[Reply], Reply]:
    """Replies of an explicit create + steps + delete, and the state before the delete."""
    sid = (await client.post("/v1/models/stacked/sessions", json={})).json()["session_id"]
    replies = [
        (await client.post(f"/v1/sessions/{sid}/step", json={"inputs": xi.tolist()})).json()
        for xi in x
    ]
    states = (await client.get(f"/v1/sessions/{sid}?include_state=true")).json()["states"]
    assert (await client.delete(f"/v1/sessions/{sid}")).status_code == 204
    return replies, states


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_in_band_lifecycle(
    served: Served, address: str, rng: np.random.Generator, kind: str
) -> None:
    transport = httpx.ASGITransport(served.app, root_path="/api" if kind == "fastapi" else "")
    async with httpx.AsyncClient(transport=transport, base_url="http://gruserve") as client:
        send = _sender(kind, client, address)
        x = rng.normal(size=(3, 2, 3)).astype(np.float32)
        expected, final_states = await _explicit(served.client, x)
        create = {"model": "stacked"}
        replies = await send(
            f"{kind}-1",
            [
                {"inputs": x[0].tolist(), "step": 0, "create": create},
                {"inputs": x[0].tolist(), "step": 0, "create": create},  # a resend
                {"inputs": x[1].tolist(), "step": 1, "create": create},  # exists: a step
                {"inputs": x[2].tolist(), "step": 2, "end": {"return_state": True}},
            ],
        )
        assert replies[0] == replies[1]
        assert [r["step"] for r in replies] == [1, 1, 2, 3]
        for got, want in zip([replies[0], *replies[2:]], expected, strict=True):
            np.testing.assert_array_equal(got["outputs"], want["outputs"])
        assert replies[3]["states"].keys() == final_states.keys()
        for key, value in final_states.items():
            np.testing.assert_array_equal(replies[3]["states"][key], value)
        assert "states" not in replies[2]
        listed = (await served.client.get("/v1/sessions")).json()["sessions"]
        assert listed == []  # ended: nothing left behind, and the resend made nothing more

        # ending twice: the second finds nothing
        ended = await send(f"{kind}-1", [{"inputs": x[0].tolist(), "end": True}])
        assert ended == [{"status": 404, "type": "SessionNotFound", "field": None}]


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_taken_ids_and_bad_fields(
    served: Served, address: str, rng: np.random.Generator, kind: str
) -> None:
    transport = httpx.ASGITransport(served.app, root_path="/api" if kind == "fastapi" else "")
    async with httpx.AsyncClient(transport=transport, base_url="http://gruserve") as client:
        send = _sender(kind, client, address)
        x = rng.normal(size=3).astype(np.float32).tolist()
        r = await served.client.post("/v1/models/simple/sessions", json={"session_id": "taken"})
        assert r.status_code == 201
        replies = await send(
            "taken",
            [
                {"inputs": x, "create": {"model": "stacked"}},  # the id is on another model
                {"inputs": x, "create": {"model": "stacked", "colour": 1}},
                {"inputs": x, "create": "stacked"},
                {"inputs": x, "end": "yes"},
                {"inputs": x, "end": {"return_state": 1}},
            ],
        )
        assert replies[0] == {"status": 409, "type": "SessionExists", "field": None}
        fields = [r["field"].removeprefix("steps[0].") for r in replies[1:]]
        assert fields == ["create.colour", "create", "end", "end.return_state"]
        assert {(r["status"], r["type"]) for r in replies[1:]} == {(422, "InvalidInput")}
        taken = (await served.client.get("/v1/sessions/taken")).json()
        assert (taken["model"], taken["step"]) == ("simple", 0)


async def test_one_request_sessions_over_rest(served: Served, rng: np.random.Generator) -> None:
    """A whole session in one request, over and over on one id: same numbers every time."""
    x = rng.normal(size=(2, 3)).astype(np.float32).tolist()
    body = {"inputs": x, "create": {"model": "stacked"}, "end": True}
    first = await served.client.post("/v1/sessions/round/step", json=body)
    for _ in range(3):
        again = await served.client.post("/v1/sessions/round/step", json=body)
        assert again.status_code == 200 and again.json() == first.json()
    assert (await served.client.get("/v1/sessions/round")).status_code == 404
