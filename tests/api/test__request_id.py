"""X-Request-ID: echoed on every response (made up when absent), named in error logs."""

from __future__ import annotations

import re
from typing import Any

import httpx
import numpy as np
import pytest
from test_v2 import v2_body
from websockets.asyncio.client import connect

from conftest import Served, live_server, serve
from gruserve.api import _request_id

HEX32 = re.compile(r"[0-9a-f]{32}")


async def _every_kind(client: httpx.AsyncClient, headers: dict[str, Any]) -> list[httpx.Response]:
    sid = (await client.post("/v1/models/simple/sessions", json={})).json()["session_id"]
    body, v2_headers = v2_body([("inputs", "FP32", np.zeros((1, 1, 3), np.float32))])
    return [
        await client.get("/healthz", headers=headers),
        await client.post(f"/v1/sessions/{sid}/step", json={"inputs": [1, 2, 3]}, headers=headers),
        await client.post(f"/v1/sessions/{sid}/step", json={"inputs": [1]}, headers=headers),
        await client.post(
            f"/v1/sessions/{sid}/stream", content=b'{"inputs": [1, 2, 3]}\n', headers=headers
        ),
        await client.post(
            "/v2/models/simple/infer", content=body, headers={**v2_headers, **headers}
        ),
        await client.get("/no/such/route", headers=headers),
        await client.get("/metrics", headers=headers),
    ]


async def test_a_given_id_comes_back_on_every_response(served: Served) -> None:
    replies = await _every_kind(served.client, {"x-request-id": "trace-42/a:b"})
    assert [r.status_code for r in replies] == [200, 200, 422, 200, 200, 404, 200]
    assert all(r.headers.get_list("x-request-id") == ["trace-42/a:b"] for r in replies)


@pytest.mark.parametrize(
    "given",
    [None, "has space", "x" * 201, "caf\u00e9".encode(), ""],
    ids=["none", "space", "long", "utf8", "empty"],
)
async def test_a_missing_or_unusable_id_is_replaced(
    served: Served, given: str | bytes | None
) -> None:
    headers = {} if given is None else {"x-request-id": given}
    replies = await _every_kind(served.client, headers)
    ids = [r.headers["x-request-id"] for r in replies]
    assert all(HEX32.fullmatch(i) for i in ids) and len(set(ids)) == len(ids)


async def test_early_answers_carry_it_too(models_dir: Any, tiny_models: dict[str, Any]) -> None:
    async for s in serve(models_dir, max_request_bytes=100):
        r = await s.client.post(
            "/v1/models/simple/predict", content=b"x" * 200, headers={"x-request-id": "big-1"}
        )
        assert r.status_code == 413 and r.headers["x-request-id"] == "big-1"


async def test_a_bug_is_logged_with_the_request_id(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> Any:
        raise TypeError("secret internals")

    monkeypatch.setattr(served.services.registry, "statuses", broken)
    r = await served.client.get("/v1/models", headers={"x-request-id": "bug-7"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "bug-7"
    assert r.json()["error"]["type"] == "InternalError" and "bug-7" in r.json()["error"]["message"]
    assert "secret" not in r.text
    assert "unexpected error (request bug-7)" in caplog.text and "secret internals" in caplog.text
    monkeypatch.undo()  # /metrics reads the statuses too (the per-version gauges)
    text = (await served.client.get("/metrics")).text
    assert 'gruserve_http_requests_total{method="GET",route="/v1/models",status="500"} 1.0' in text

    # the fast path names it too
    async def broken_step(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("more internals")

    monkeypatch.setattr(served.services.sessions, "step", broken_step)
    sid = (await served.client.post("/v1/models/simple/sessions", json={})).json()["session_id"]
    r = await served.client.post(
        f"/v1/sessions/{sid}/step", json={"inputs": [1, 2, 3]}, headers={"x-request-id": "bug-8"}
    )
    assert r.status_code == 500 and "unexpected error (request bug-8)" in caplog.text


async def test_websocket_handshakes_carry_it(served: Served) -> None:
    sid = (await served.client.post("/v1/models/simple/sessions", json={})).json()["session_id"]
    async for address in live_server(served.app):
        url = f"ws://{address}/v1/sessions/{sid}/ws"
        async with connect(url, additional_headers={"x-request-id": "socket-3"}) as ws:
            assert ws.response is not None
            assert ws.response.headers["x-request-id"] == "socket-3"
        async with connect(url) as ws:
            assert ws.response is not None
            assert HEX32.fullmatch(ws.response.headers["x-request-id"])


def test_ids_are_chosen_as_documented() -> None:
    assert _request_id.chosen(b"abc-1") == b"abc-1"
    assert _request_id.chosen(b"x" * 200) == b"x" * 200
    for bad in (None, b"", b"a b", b"x" * 201, b"\xc3\xa9", b"a\tb"):
        assert HEX32.fullmatch(_request_id.chosen(bad).decode())
