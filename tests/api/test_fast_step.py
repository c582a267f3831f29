"""The plain-ASGI step route: taken instead of FastAPI's, and indistinguishable from it.

Every session test in test_v1_sessions.py already steps through this path; these
tests check that it is the one taken, that what it does not recognise reaches
FastAPI, and that limits, errors, metrics and disconnects behave as on any route.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import Served, StuckStep, serve
from gruserve.api.v1 import routes as v1
from gruserve.api.v1.fast_step import StepEndpoint

ATOL = 1e-5
STEP_ROUTE = 'route="/v1/sessions/{session_id}/step"'


def fast_path(served: Served) -> StepEndpoint:
    """The app's step endpoint on the hot path."""
    endpoint: Any = served.app.hot_paths.step
    assert isinstance(endpoint, StepEndpoint)
    return endpoint


@pytest.fixture
def handler_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths whose request reached a FastAPI handler of v1 that awaits the model."""
    calls: list[str] = []
    original = v1.unless_disconnected

    async def recorded(request: Any, work: Awaitable[Any]) -> Any:
        calls.append(request.scope["path"])
        return await original(request, work)

    monkeypatch.setattr(v1, "unless_disconnected", recorded)
    return calls


async def _session(client: httpx.AsyncClient, model: str = "simple") -> str:
    r = await client.post(f"/v1/models/{model}/sessions", json={})
    return str(r.json()["session_id"])


async def test_steps_take_the_fast_path_not_the_fastapi_route(
    served: Served, tiny_models: dict[str, Any], handler_calls: list[str]
) -> None:
    sid = await _session(served.client)
    x = np.array([[0.5, -0.5, 1.0], [0.1, 0.2, 0.3]], np.float32)
    r = await served.client.post(f"/v1/sessions/{sid}/step", json={"inputs": x.tolist()})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json()["step"] == 1
    np.testing.assert_allclose(
        r.json()["outputs"], tiny_models["simple"].reference(x[None])[0][0][0], atol=ATOL
    )
    assert fast_path(served).taken == 1 and handler_calls == []
    # the recorder does see the FastAPI handlers: predict goes through one
    r = await served.client.post("/v1/models/simple/predict", json={"inputs": x[None].tolist()})
    assert r.status_code == 200 and handler_calls == ["/v1/models/simple/predict"]


async def test_what_it_does_not_recognise_reaches_fastapi(
    served: Served, handler_calls: list[str]
) -> None:
    sid = await _session(served.client)
    r = await served.client.get(f"/v1/sessions/{sid}/step")
    assert r.status_code == 405 and r.json()["error"]["type"] == "MethodNotAllowed"
    # a path below a root_path is routed by FastAPI, to the declared route
    transport = httpx.ASGITransport(served.app, root_path="/api")
    async with httpx.AsyncClient(transport=transport, base_url="http://gruserve") as prefixed:
        r = await prefixed.post(f"/api/v1/sessions/{sid}/step", json={"inputs": [1, 2, 3]})
    assert r.status_code == 200 and r.json()["step"] == 1
    assert handler_calls == [f"/api/v1/sessions/{sid}/step"]
    assert fast_path(served).taken == 0
    r = await served.client.post(f"/v1/sessions/{sid}/step", json={"inputs": [1, 2, 3]})
    assert r.json()["step"] == 2 and fast_path(served).taken == 1
    paths = (await served.client.get("/openapi.json")).json()["paths"]
    assert "post" in paths["/v1/sessions/{session_id}/step"]


async def test_errors_have_the_one_shape_and_are_counted(served: Served) -> None:
    client = served.client
    sid = await _session(client)
    cases = [
        (f"/v1/sessions/{sid}/step", b'{"inputs": [1, 2', 422, "InvalidInput", "body"),
        (f"/v1/sessions/{sid}/step", b'{"inputs": [1, 2]}', 422, "InvalidInput", "inputs"),
        (f"/v1/sessions/{sid}/step", b'{"inputs": [1, NaN, 2]}', 422, "InvalidInput", "inputs[1]"),
        (f"/v1/sessions/{sid}/step", b'{"input": [1, 2, 3]}', 422, "InvalidInput", "input"),
        ("/v1/sessions/nobody/step", b'{"inputs": [1, 2, 3]}', 404, "SessionNotFound", None),
    ]
    for path, body, status, kind, field in cases:
        r = await client.post(path, content=body)
        assert r.status_code == status, r.text
        assert r.json() == {
            "error": {"type": kind, "message": r.json()["error"]["message"], "field": field}
        }
        assert r.json()["error"]["message"]
    assert (await client.get(f"/v1/sessions/{sid}")).json()["step"] == 0
    text = (await client.get("/metrics")).text
    assert 'gruserve_errors_total{type="InvalidInput"} 4.0' in text
    assert 'gruserve_errors_total{type="SessionNotFound"} 1.0' in text
    assert f'gruserve_http_requests_total{{method="POST",{STEP_ROUTE},status="422"}} 4.0' in text


async def test_a_bug_answers_500_without_leaking_it(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sid = await _session(served.client)

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("secret internals")

    monkeypatch.setattr(served.services.sessions, "step", broken)
    r = await served.client.post(f"/v1/sessions/{sid}/step", json={"inputs": [1, 2, 3]})
    assert r.status_code == 500 and r.json()["error"]["type"] == "InternalError"
    assert "secret" not in r.text and "secret internals" in caplog.text


async def test_byte_limit(models_dir: Path, tiny_models: dict[str, Any]) -> None:
    async for s in serve(models_dir, max_request_bytes=100):
        sid = await _session(s.client)
        big = json.dumps({"inputs": [[0.123456789] * 3] * 10}).encode()
        r = await s.client.post(f"/v1/sessions/{sid}/step", content=big)
        assert r.status_code == 413 and "GRUSERVE_MAX_REQUEST_BYTES" in r.json()["error"]["message"]

        async def chunked(data: bytes) -> Any:  # no Content-Length: the limit applies while reading
            for i in range(0, len(data), 30):
                yield data[i : i + 30]

        r = await s.client.post(f"/v1/sessions/{sid}/step", content=chunked(big))
        assert r.status_code == 413 and r.json()["error"]["type"] == "PayloadTooLarge"
        r = await s.client.post(
            f"/v1/sessions/{sid}/step", content=chunked(b'{"inputs": [1, 2, 3]}')
        )
        assert r.status_code == 200 and r.json()["step"] == 1
        assert (await s.client.get(f"/v1/sessions/{sid}")).json()["step"] == 1
        text = (await s.client.get("/metrics")).text
        # the step path is matched before the edge runs, so both refusals (an oversized
        # Content-Length, refused before reading, and the chunked body) count under its route
        assert 'route="unmatched",status="413"' not in text
        assert f'method="POST",{STEP_ROUTE},status="413"}} 2.0' in text
        assert f'method="POST",{STEP_ROUTE},status="200"}} 1.0' in text


async def _call(served: Served, path: str, body: bytes, leave_after: float | None) -> list[Any]:
    """One raw ASGI request; the client disconnects ``leave_after`` s after sending its body."""
    sent: list[Any] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        if leave_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(leave_after or 0)
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("gruserve", 80),
    }
    await served.app(scope, receive, send)
    return sent


async def test_a_client_that_leaves_cancels_its_step(
    served: Served, stuck_step: StuckStep, watchers: list[Any]
) -> None:
    sid = await _session(served.client)
    path, body = f"/v1/sessions/{sid}/step", b'{"inputs": [1, 2, 3]}'
    sent = await asyncio.wait_for(_call(served, path, body, leave_after=0.05), 5)
    assert stuck_step.cancelled.is_set() and len(watchers) == 1
    assert sent[0]["status"] == 499  # nobody reads it; the metrics count it
    assert fast_path(served).disconnects.watching == 0
    text = (await served.client.get("/metrics")).text
    assert 'gruserve_errors_total{type="ClientDisconnected"} 1.0' in text
    assert f'{STEP_ROUTE},status="499"}} 1.0' in text


async def test_a_quick_step_needs_no_watcher(served: Served, watchers: list[Any]) -> None:
    """A request gets no watcher task of its own unless it outlives the grace period. The
    grace is raised far above any step here, so that a slow machine (a step over the 10 ms
    default) cannot make the request "slow": what is checked is that nothing starts a
    watcher eagerly."""
    sid = await _session(served.client)
    fast_path(served).disconnects.grace_s = 3600.0
    sent = await _call(served, f"/v1/sessions/{sid}/step", b'{"inputs": [1, 2, 3]}', None)
    assert sent[0]["status"] == 200 and json.loads(sent[1]["body"])["step"] == 1
    *headers, (name, request_id) = sent[0]["headers"]
    assert headers == [
        (b"content-length", str(len(sent[1]["body"])).encode()),
        (b"content-type", b"application/json"),
    ]
    assert name == b"x-request-id" and re.fullmatch(rb"[0-9a-f]{32}", request_id)  # the edge's
    assert watchers == [] and fast_path(served).disconnects.watching == 0
