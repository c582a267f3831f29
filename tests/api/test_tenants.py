"""Tenants: named API keys own their sessions; other tenants' sessions do not exist for them.

Keys ``acme:…`` and ``beta:…`` are two tenants, ``ops:…:admin`` an admin, and a bare key the
unnamed tenant. Every v1 route on another tenant's session answers 404 exactly as for a
session that was never created; listings show a tenant its own; v2 sequence ids are per
tenant; the admin sees and manages all.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from test_v2 import v2_body

from conftest import Served, serve
from gruserve.api._auth import ApiKeys, parse_key
from gruserve.errors import ConfigError
from gruserve.sessions.owner import Caller

ACME, BETA, OPS, BARE = "k-acme-3f9a", "k-beta-77c1", "k-ops-0d2e", "k-bare-91aa"
KEYS = f"acme:{ACME},beta:{BETA},ops:{OPS}:admin,{BARE}"


def _as(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
async def tenants(models_dir: Path, tiny_models: dict[str, Any]) -> AsyncIterator[Served]:
    async for s in serve(models_dir, api_keys=KEYS):
        yield s


def test_keys_carry_names_and_roles() -> None:
    assert parse_key("plain", 1) == ("plain", Caller(""))
    assert parse_key("acme:k1", 1) == ("k1", Caller("acme"))
    assert parse_key("ops:k2:admin", 1) == ("k2", Caller("ops", admin=True))
    for bad in ("acme:", ":k1", "a b:k1", "acme:k1:root", "acme:k1:admin:x"):
        with pytest.raises(ConfigError, match="key 3") as refused:
            parse_key(bad, 3)
        assert "k1" not in str(refused.value).replace("key 3", "")  # the key is never shown
    keys = ApiKeys(KEYS.split(","))
    assert keys.caller(BETA.encode()) == Caller("beta")
    assert keys.caller(b"acme:" + ACME.encode()) is None  # the name is no part of the key
    assert keys.identify([(b"x-api-key", OPS.encode())]) == Caller("ops", admin=True)


async def _create(client: httpx.AsyncClient, key: str, session_id: str) -> None:
    r = await client.post(
        "/v1/models/simple/sessions", json={"session_id": session_id}, headers=_as(key)
    )
    assert r.status_code == 201, r.text


async def _every_route(client: httpx.AsyncClient, key: str, sid: str) -> list[httpx.Response]:
    headers = _as(key)
    step = {"inputs": [[0.1, 0.2, 0.3]]}
    return [
        await client.get(f"/v1/sessions/{sid}", headers=headers),
        await client.get(f"/v1/sessions/{sid}?include_state=true", headers=headers),
        await client.post(f"/v1/sessions/{sid}/step", json=step, headers=headers),
        await client.post(
            f"/v1/sessions/{sid}/stream", content=json.dumps(step).encode(), headers=headers
        ),
        await client.post(f"/v1/sessions/{sid}/reset", json={}, headers=headers),
        await client.delete(f"/v1/sessions/{sid}", headers=headers),
    ]


async def test_other_tenants_sessions_do_not_exist(tenants: Served) -> None:
    client = tenants.client
    await _create(client, ACME, "station-7")
    await _create(client, BETA, "beta-1")
    for key in (BETA, BARE):
        theirs = await _every_route(client, key, "station-7")
        never = await _every_route(client, key, "station-8")  # a session never created
        for got, unknown in zip(theirs, never, strict=True):
            assert got.status_code == unknown.status_code == 404, (got.request.url, got.text)
            assert got.text == unknown.text.replace("station-8", "station-7")
    # nothing the others tried touched it: acme's session is as created
    r = await client.get("/v1/sessions/station-7", headers=_as(ACME))
    assert r.status_code == 200 and r.json()["step"] == 0
    # its owner, and an admin, use every route
    for key in (ACME, OPS):
        replies = await _every_route(client, key, "station-7")
        assert [r.status_code for r in replies] == [200, 200, 200, 200, 200, 204], key
        await _create(client, ACME, "station-7")  # deleted by the last route: again


async def test_listings_show_own_sessions_and_admins_all(tenants: Served) -> None:
    client = tenants.client
    for key, sid in ((ACME, "a-1"), (ACME, "a-2"), (BETA, "b-1"), (BARE, "n-1")):
        await _create(client, key, sid)

    async def listed(key: str) -> list[str]:
        r = await client.get("/v1/sessions", params={"limit": 2}, headers=_as(key))
        ids, body = [], r.json()
        ids += [s["session_id"] for s in body["sessions"]]
        while body["next_cursor"] is not None:
            r = await client.get(
                "/v1/sessions",
                params={"limit": 2, "cursor": body["next_cursor"]},
                headers=_as(key),
            )
            body = r.json()
            ids += [s["session_id"] for s in body["sessions"]]
        return ids

    assert await listed(ACME) == ["a-1", "a-2"]
    assert await listed(BETA) == ["b-1"]
    assert await listed(BARE) == ["n-1"]
    assert await listed(OPS) == ["a-1", "a-2", "b-1", "n-1"]


async def test_sequence_ids_are_per_tenant(tenants: Served, rng: np.random.Generator) -> None:
    client = tenants.client
    x = rng.normal(size=(2, 3, 3)).astype(np.float32)  # acme's and beta's inputs

    async def infer(key: str, values: np.ndarray, **parameters: Any) -> httpx.Response:
        body, headers = v2_body(
            [("inputs", "FP32", values[None])], {"sequence_id": 42, **parameters}
        )
        return await client.post(
            "/v2/models/simple/infer", content=body, headers={**headers, **_as(key)}
        )

    def outputs(r: httpx.Response) -> np.ndarray:
        assert r.status_code == 200, r.text
        return np.asarray(r.json()["outputs"][0]["data"], np.float32)

    first_acme = await infer(ACME, x[0][:1], sequence_start=True)
    assert first_acme.json()["parameters"]["session_id"] == "v2:simple:t.acme:42"
    r = await infer(BETA, x[1][:1])  # beta has not started its 42: acme's is not it
    assert r.status_code == 404 and "not active" in r.json()["error"]
    first_beta = await infer(BETA, x[1][:1], sequence_start=True)
    assert first_beta.json()["parameters"]["session_id"] == "v2:simple:t.beta:42"
    rest_acme = await infer(ACME, x[0][1:])
    rest_beta = await infer(BETA, x[1][1:], sequence_end=True)
    # each tenant's sequence 42 is its own: it equals that tenant's inputs in one predict
    for first, rest, values in ((first_acme, rest_acme, x[0]), (first_beta, rest_beta, x[1])):
        whole = await client.post(
            "/v1/models/simple/predict", json={"inputs": [values.tolist()]}, headers=_as(OPS)
        )
        expected = np.asarray(whole.json()["outputs"][0], np.float32).ravel()
        got = np.concatenate([outputs(first), outputs(rest)])
        np.testing.assert_allclose(got, expected, atol=1e-5)
    # v1 routes on another tenant's sequence session: not there
    r = await client.get("/v1/sessions/v2:simple:t.acme:42", headers=_as(BETA))
    assert r.status_code == 404
    r = await client.get("/v1/sessions/v2:simple:t.acme:42", headers=_as(OPS))
    assert r.status_code == 200 and r.json()["step"] == 2
