"""API keys: every route but the health ones needs one when keys are set, on every transport.

401 (with ``WWW-Authenticate: Bearer``) without a usable key, 403 with a wrong one; keys
compared in constant time against every key, and never logged or echoed.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import SecretStr
from test_v2 import v2_body
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import Served, free_port, live_server, serve
from gruserve.api import _auth
from gruserve.api._auth import ApiKeys, load_keys
from gruserve.errors import ConfigError
from test_server import BIN, _env, _start, _stop

KEY, OTHER = "k-3f9a8c1e5b7d", "k-other-key-27"
SECRET_LOOKING = "s3cr3t-never-logged"
HEALTH = ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"]


# -- keys --------------------------------------------------------------------------------------
def test_keys_from_the_environment_and_a_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# rotated 2024-05\n\n  {OTHER}  \n{KEY}\n# old: revoked\n")
    assert load_keys(SecretStr(f" {KEY}, x-2 ,,"), None) == [KEY, "x-2"]
    assert load_keys(SecretStr(KEY), keys_file) == [KEY, OTHER]  # duplicates once
    assert load_keys(None, None) == [] and load_keys(SecretStr(""), None) == []


def test_a_keys_file_that_cannot_serve_refuses_to_start(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing here yet\n\n")
    with pytest.raises(ConfigError, match="holds no key"):
        load_keys(SecretStr(KEY), empty)  # a file was meant to hold keys: fail closed
    with pytest.raises(ConfigError, match="cannot read"):
        load_keys(None, tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.write_text(f"{SECRET_LOOKING} trailing-words\n")
    with pytest.raises(ConfigError, match="key 1") as refused:
        load_keys(None, bad)
    assert SECRET_LOOKING not in str(refused.value)
    with pytest.raises(ConfigError, match="printable ASCII"):
        load_keys(SecretStr("caf\u00e9"), None)


def test_every_key_is_compared_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def counted(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(_auth.hmac, "compare_digest", counted)
    keys = ApiKeys([KEY, OTHER, "third"])
    for presented, accepted in ((KEY, True), ("third", True), ("wrong", False), ("", False),
                                (KEY[:-1], False), (KEY + "x", False)):  # fmt: skip
        calls.clear()
        assert keys.accepts(presented.encode()) is accepted
        assert len(calls) == 3  # no early exit: the time says nothing about which key matched
        assert all(len(a) == len(b) == 32 for a, b in calls)  # digests: lengths leak nothing


# -- the middleware, in process ---------------------------------------------------------------
@pytest.fixture
async def guarded(models_dir: Path, tiny_models: dict[str, Any]) -> AsyncIterator[Served]:
    async for s in serve(models_dir, api_keys=f"{KEY},{OTHER}"):
        yield s


def _key(kind: str, key: str = KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if kind == "bearer" else {"x-api-key": key}


async def _requests(client: httpx.AsyncClient, headers: dict[str, str]) -> list[httpx.Response]:
    """One request of each kind: FastAPI route, fast path, NDJSON, v2, metrics."""
    created = await client.post("/v1/models/simple/sessions", json={}, headers=headers)
    sid = created.json().get("session_id", "none")
    body, v2_headers = v2_body([("inputs", "FP32", np.zeros((1, 1, 3), np.float32))])
    return [
        created,
        await client.post(f"/v1/sessions/{sid}/step", json={"inputs": [1, 2, 3]}, headers=headers),
        await client.post(
            f"/v1/sessions/{sid}/stream", content=b'{"inputs": [1, 2, 3]}\n', headers=headers
        ),
        await client.post(
            "/v2/models/simple/infer", content=body, headers={**v2_headers, **headers}
        ),
        await client.get("/v1/sessions", headers=headers),
        await client.get("/metrics", headers=headers),
    ]


@pytest.mark.parametrize("kind", ["bearer", "x-api-key"])
async def test_a_valid_key_opens_every_route(guarded: Served, kind: str) -> None:
    replies = await _requests(guarded.client, _key(kind))
    assert [r.status_code for r in replies] == [201, 200, 200, 200, 200, 200]
    assert b'"step":2' in replies[2].content  # the stream continues the step before it
    other = await guarded.client.get("/v1/models", headers=_key(kind, OTHER))
    assert other.status_code == 200  # every configured key works


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Basic a2V5OnZhbHVl"},
        {"authorization": "Bearer "},
        {"authorization": KEY},
        {"x-api-key": ""},
    ],
    ids=["none", "basic", "empty bearer", "no scheme", "empty x-api-key"],
)
async def test_no_usable_key_is_401(guarded: Served, headers: dict[str, str]) -> None:
    for r in await _requests(guarded.client, headers):
        assert r.status_code == 401, (r.request.url, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.headers["x-request-id"]
        error = r.json()["error"]
        if r.request.url.path.startswith("/v2"):
            assert "API key" in error  # the v2 protocol's {"error": "<message>"}
        else:
            assert error["type"] == "MissingApiKey" and "Bearer" in error["message"]


@pytest.mark.parametrize("kind", ["bearer", "x-api-key"])
async def test_a_wrong_key_is_403_and_never_echoed(
    guarded: Served, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for r in await _requests(guarded.client, _key(kind, SECRET_LOOKING)):
        assert r.status_code == 403, (r.request.url, r.text)
        assert "www-authenticate" not in r.headers
        assert SECRET_LOOKING not in r.text
    assert SECRET_LOOKING not in caplog.text and KEY not in caplog.text
    text = (await guarded.client.get("/metrics", headers=_key(kind))).text
    assert 'gruserve_errors_total{type="InvalidApiKey"} 6.0' in text


async def test_the_docs_need_no_key(guarded: Served) -> None:
    """A reader must see the docs to learn how to send a key (api/docs.py)."""
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/assets/swagger-ui-bundle.js"):
        assert (await guarded.client.get(path)).status_code == 200, path
    schema = (await guarded.client.get("/openapi.json")).json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    # the asset prefix opens nothing else
    assert (await guarded.client.get("/docs/assets/../../v1/models")).status_code == 401
    assert (await guarded.client.get("/docs/assets")).status_code == 401


async def test_a_wrong_key_beside_a_right_one_still_passes(guarded: Served) -> None:
    headers = {"authorization": "Bearer nope", "x-api-key": KEY}
    assert (await guarded.client.get("/v1/models", headers=headers)).status_code == 200


async def test_health_needs_no_key_and_metrics_can_be_public(
    guarded: Served, models_dir: Path
) -> None:
    for path in HEALTH:
        assert (await guarded.client.get(path)).status_code == 200, path
    # /readyz: without a valid key, ready or not and nothing else (no paths, no errors)
    for headers in ({}, _key("bearer", "wrong-key")):
        r = await guarded.client.get("/readyz", headers=headers)
        assert r.json() == {"status": "ready"}, r.text
    detailed = (await guarded.client.get("/readyz", headers=_key("x-api-key"))).json()
    assert detailed["status"] == "ready" and {m["name"] for m in detailed["models"]} >= {"simple"}
    assert detailed["store"]["kind"] == "memory"
    assert (await guarded.client.get("/metrics")).status_code == 401
    async for s in serve(models_dir, api_keys=KEY, metrics_public=True):
        assert (await s.client.get("/metrics")).status_code == 200
        assert (await s.client.get("/v1/models")).status_code == 401
    # below a root_path, the same routes are the public ones
    transport = httpx.ASGITransport(guarded.app, root_path="/api")
    async with httpx.AsyncClient(transport=transport, base_url="http://gruserve") as prefixed:
        assert (await prefixed.get("/api/healthz")).status_code == 200
        assert (await prefixed.get("/api/v1/models")).status_code == 401


async def test_without_keys_nothing_is_checked(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/models")).status_code == 200
    schema = (await client.get("/openapi.json")).json()
    assert "securitySchemes" not in schema.get("components", {})


# -- WebSocket handshakes on a real server -------------------------------------------------------
async def test_websocket_handshakes_are_checked_before_accepting(guarded: Served) -> None:
    async for address in live_server(guarded.app):
        base = f"ws://{address}/v1/sessions"
        created = await guarded.client.post("/v1/models/simple/sessions", json={},
                                            headers=_key("bearer"))  # fmt: skip
        sid = created.json()["session_id"]
        for headers, status in (({}, 401), (_key("x-api-key", "wrong"), 403)):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(f"{base}/{sid}/ws", additional_headers=headers):
                    pass
            response = refused.value.response
            assert response.status_code == status
            assert b"ApiKey" in response.body and response.headers["x-request-id"]
        async with connect(f"{base}/{sid}/ws", additional_headers=_key("bearer")) as ws:
            await ws.send('{"inputs": [1, 2, 3]}')
            assert json.loads(await ws.recv())["step"] == 1


# -- the stock Triton client against a real `gruserve serve` -------------------------------------
def test_tritonclient_sends_the_key_in_headers(
    models_dir: Path, tiny_models: dict[str, Any], tmp_path: Path
) -> None:
    tritonhttp = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    port = free_port()
    env = _env(models_dir, GRUSERVE_API_KEYS=KEY)
    proc = _start([str(BIN / "gruserve"), "serve", "--port", str(port)], env, port, tmp_path)
    try:
        client = tritonhttp.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = tritonhttp.InferInput("inputs", [1, 1, 3], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 1, 3), np.float32))
        with pytest.raises(InferenceServerException, match="API key"):
            client.infer("simple", [tensor])
        assert client.is_server_live()  # health needs no key
        result = client.infer("simple", [tensor], headers={"Authorization": f"Bearer {KEY}"})
        assert result.as_numpy("outputs").shape[:2] == (1, 1)
        result = client.infer(
            "simple",
            [tensor],
            sequence_id=3,
            sequence_start=True,
            headers={"X-API-Key": KEY},
            parameters={"sequence_step": 0},
        )
        assert result.get_response()["parameters"]["step"] == 1
        client.close()
    finally:
        _stop(proc)
