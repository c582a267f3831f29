"""Tenants: named API keys own their sessions, each tenant in its own namespace of ids.

Keys ``acme:…`` and ``beta:…`` are two tenants, ``ops:…:admin`` an admin, and a bare key the
unnamed tenant. The same id in two tenants is two sessions; every v1 route (over real HTTP,
so the direct step path too, and a WebSocket) and v2 sequence on another tenant's session
answers exactly as for a session never created; listings show a tenant its own, with plain
ids; the admin sees all and manages each by its qualified id ``tenant~id``; sessions a
tenant stored before namespaces stay its own. On both stores.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from test_v2 import v2_body
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conftest import Served, live_server, serve
from gruserve.api._auth import ApiKeys, parse_key
from gruserve.errors import ConfigError
from gruserve.sessions.owner import Caller
from gruserve.sessions.store import SessionRecord

ACME, BETA, OPS, BARE = "k-acme-3f9a", "k-beta-77c1", "k-ops-0d2e", "k-bare-91aa"
KEYS = f"acme:{ACME},beta:{BETA},ops:{OPS}:admin,{BARE}"


def _as(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
async def tenants(
    models_dir: Path, tiny_models: dict[str, Any], store_url: str
) -> AsyncIterator[Served]:
    async for s in serve(models_dir, store_url, api_keys=KEYS):
        yield s


@pytest.fixture
async def http(tenants: Served) -> AsyncIterator[httpx.AsyncClient]:
    """A real HTTP client of ``tenants`` served by uvicorn as ``gruserve serve`` serves it."""
    async for address in live_server(tenants.app):
        async with httpx.AsyncClient(base_url=f"http://{address}", timeout=60) as client:
            yield client


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


STEP = {"inputs": [[0.1, 0.2, 0.3]]}


async def _create(
    client: httpx.AsyncClient, key: str, session_id: str, state: float = 0.0
) -> dict[str, Any]:
    r = await client.post(
        "/v1/models/simple/sessions",
        json={"session_id": session_id, "initial_state": [[state] * 4]},
        headers=_as(key),
    )
    assert r.status_code == 201, r.text
    info: dict[str, Any] = r.json()
    return info


async def _ws_step(base: str, key: str, sid: str) -> str:
    """What a WebSocket answers to one step: its reply, or the error and close code it
    ends the connection with."""
    url = base.replace("http://", "ws://") + f"/v1/sessions/{sid}/ws"
    got = []
    async with connect(url, additional_headers=_as(key)) as ws:
        with contextlib.suppress(ConnectionClosed):  # it may have closed already
            await ws.send(json.dumps(STEP))
        try:
            while True:  # buffered messages come before the close
                got.append(str(await ws.recv()))
                if '"error"' not in got[-1]:
                    break
        except ConnectionClosed as closed:
            got.append(f"closed {closed.rcvd.code if closed.rcvd else None}")
    return " ".join(got)


async def _every_route(client: httpx.AsyncClient, key: str, sid: str) -> list[str]:
    """Status and body of every v1 route on ``sid`` (the WebSocket and bulk replies too);
    the last one deletes it."""
    headers = _as(key)
    replies = [
        await client.get(f"/v1/sessions/{sid}", headers=headers),
        await client.get(f"/v1/sessions/{sid}?include_state=true", headers=headers),
        await client.post(f"/v1/sessions/{sid}/step", json=STEP, headers=headers),
        await client.post(
            f"/v1/sessions/{sid}/stream", content=json.dumps(STEP).encode(), headers=headers
        ),
        await client.post(
            "/v1/models/simple/steps",
            json={"steps": [{"session_id": sid, **STEP}]},
            headers=headers,
        ),
        await client.post(
            "/v1/models/simple/steps",  # a bulk step that may create: not another's id
            json={"steps": [{"session_id": sid, **STEP, "step": 1, "create": {}}]},
            headers=headers,
        ),
        await client.post(f"/v1/sessions/{sid}/reset", json={}, headers=headers),
    ]
    shown = [f"{r.status_code} {r.text}" for r in replies]
    shown.append(await _ws_step(str(client.base_url), key, sid))
    r = await client.delete(f"/v1/sessions/{sid}", headers=headers)
    return [*shown, f"{r.status_code} {r.text}"]


async def test_same_id_in_two_tenants_is_two_sessions(http: httpx.AsyncClient) -> None:
    made = [await _create(http, key, "station-7", state) for key, state in
            ((ACME, 0.5), (BETA, -0.5), (BARE, 0.0), (OPS, 0.25))]  # fmt: skip
    assert [m["session_id"] for m in made] == ["station-7"] * 4  # never 409
    assert [m["tenant"] for m in made] == ["acme", "beta", "", "ops"]
    outputs = []
    for key in (ACME, BETA, BARE, OPS):
        r = await http.post("/v1/sessions/station-7/step", json=STEP, headers=_as(key))
        assert r.status_code == 200 and r.json()["step"] == 1, r.text
        outputs.append(r.json()["outputs"])
    assert len({json.dumps(o) for o in outputs}) == 4  # four states, four answers
    r = await http.post("/v1/sessions/station-7/step", json=STEP, headers=_as(ACME))
    assert r.json()["step"] == 2
    for key, step in ((BETA, 1), (BARE, 1), (OPS, 1)):  # acme's step moved no other
        r = await http.get("/v1/sessions/station-7", headers=_as(key))
        assert (r.json()["session_id"], r.json()["step"]) == ("station-7", step)
    # exactly-once numbers are per session too: beta's step 1 is not acme's
    r = await http.post("/v1/sessions/station-7/step", json={**STEP, "step": 1}, headers=_as(BETA))
    assert r.status_code == 200 and r.json()["step"] == 2
    r = await http.post("/v1/sessions/station-7/step", json={**STEP, "step": 1}, headers=_as(ACME))
    assert r.status_code == 409 and r.json()["error"]["current_step"] == 2, r.text
    assert "'station-7'" in r.text and "~" not in r.text  # its own id, never the store key


async def test_other_tenants_sessions_do_not_exist(http: httpx.AsyncClient) -> None:
    await _create(http, ACME, "station-7")
    for key in (BETA, BARE, OPS):  # the admin's plain id is its own namespace's
        theirs = await _every_route(http, key, "station-7")
        never = await _every_route(http, key, "station-8")  # a session never created
        for got, unknown in zip(theirs, never, strict=True):
            assert got == unknown.replace("station-8", "station-7"), key
        assert theirs[0].startswith("404 ") and theirs[-1].startswith("404 ")
        assert '"status":404' in theirs[4].replace(" ", "") and "closed 4404" in theirs[7]
        assert theirs[5].startswith("200 ")  # the creating bulk step made its own session
        assert "acme" not in "".join(theirs) and "~" not in "".join(theirs)
    # nothing the others tried touched it: acme's session is as created
    r = await http.get("/v1/sessions/station-7", headers=_as(ACME))
    assert r.status_code == 200 and r.json()["step"] == 0
    # its owner uses every route; the admin too, by its qualified id
    for key, sid in ((ACME, "station-7"), (OPS, "acme~station-7")):
        replies = await _every_route(http, key, sid)
        assert [r[:3] for r in replies] == ["200"] * 7 + ['{"o', "204"], (key, replies)
        await _create(http, ACME, "station-7")  # deleted by the last route: again
    r = await http.get("/v1/sessions/acme~station-7", headers=_as(BETA))  # not an admin
    assert r.status_code == 404 and "'acme~station-7'" in r.text
    r = await http.post("/v1/models/simple/sessions", json={"session_id": "x~y"}, headers=_as(OPS))
    assert r.status_code == 422 and "session_id" in r.text  # creates are in one's own


async def test_listings_show_own_sessions_and_admins_all(http: httpx.AsyncClient) -> None:
    for key, sid in ((ACME, "a-1"), (ACME, "a-2"), (BETA, "b-1"), (BARE, "n-1"),
                     (OPS, "o-1"), (BETA, "a-1")):  # fmt: skip
        await _create(http, key, sid)

    async def listed(key: str) -> list[tuple[str, str]]:
        found, cursor = [], None
        while True:
            params: dict[str, Any] = {"limit": 2}
            if cursor is not None:
                params["cursor"] = cursor
            r = await http.get("/v1/sessions", params=params, headers=_as(key))
            assert r.status_code == 200, r.text
            found += [(s["session_id"], s["tenant"]) for s in r.json()["sessions"]]
            cursor = r.json()["next_cursor"]
            if cursor is None:
                return found

    assert await listed(ACME) == [("a-1", "acme"), ("a-2", "acme")]
    assert await listed(BETA) == [("a-1", "beta"), ("b-1", "beta")]
    assert await listed(BARE) == [("n-1", "")]
    admin = await listed(OPS)
    assert admin == [("~n-1", ""), ("acme~a-1", "acme"), ("acme~a-2", "acme"),
                     ("beta~a-1", "beta"), ("beta~b-1", "beta"), ("o-1", "ops")]  # fmt: skip
    for sid, tenant in admin:  # each listed id is one the admin can act on
        r = await http.post(f"/v1/sessions/{sid}/step", json=STEP, headers=_as(OPS))
        assert r.status_code == 200 and r.json()["step"] == 1, (sid, r.text)
        r = await http.get(f"/v1/sessions/{sid}", headers=_as(OPS))
        assert (r.json()["session_id"], r.json()["tenant"]) == (sid, tenant)
    r = await http.get("/v1/sessions/b-1", headers=_as(BETA))
    assert r.json()["step"] == 1  # the admin stepped beta's own
    r = await http.get("/v1/sessions", params={"cursor": "acme~a-1"}, headers=_as(BETA))
    assert r.status_code == 422 and "cursor" in r.text


async def test_sequence_ids_are_per_tenant(
    tenants: Served, http: httpx.AsyncClient, rng: np.random.Generator
) -> None:
    x = rng.normal(size=(2, 3, 3)).astype(np.float32)  # acme's and beta's inputs

    async def infer(key: str, values: np.ndarray, **parameters: Any) -> httpx.Response:
        body, headers = v2_body(
            [("inputs", "FP32", values[None])], {"sequence_id": 42, **parameters}
        )
        return await http.post(
            "/v2/models/simple/infer", content=body, headers={**headers, **_as(key)}
        )

    def outputs(r: httpx.Response) -> np.ndarray:
        assert r.status_code == 200, r.text
        return np.asarray(r.json()["outputs"][0]["data"], np.float32)

    first_acme = await infer(ACME, x[0][:1], sequence_start=True)
    assert first_acme.json()["parameters"]["session_id"] == "v2:simple:42"
    r = await infer(BETA, x[1][:1])  # beta has not started its 42: acme's is not it
    assert r.status_code == 404 and "not active" in r.json()["error"]
    first_beta = await infer(BETA, x[1][:1], sequence_start=True)
    assert first_beta.json()["parameters"]["session_id"] == "v2:simple:42"
    rest_acme = await infer(ACME, x[0][1:])
    r = await http.get("/v1/sessions/v2:simple:42", headers=_as(ACME))  # v1 sees its own
    assert r.status_code == 200 and r.json()["step"] == 2
    rest_beta = await infer(BETA, x[1][1:], sequence_end=True)
    # each tenant's sequence 42 is its own: it equals that tenant's inputs in one predict
    for first, rest, values in ((first_acme, rest_acme, x[0]), (first_beta, rest_beta, x[1])):
        whole = await http.post(
            "/v1/models/simple/predict", json={"inputs": [values.tolist()]}, headers=_as(OPS)
        )
        expected = np.asarray(whole.json()["outputs"][0], np.float32).ravel()
        got = np.concatenate([outputs(first), outputs(rest)])
        np.testing.assert_allclose(got, expected, atol=1e-5)
    r = await http.get("/v1/sessions/v2:simple:42", headers=_as(BETA))  # ended: gone
    assert r.status_code == 404
    r = await http.get("/v1/sessions/acme~v2:simple:42", headers=_as(OPS))
    assert r.status_code == 200 and r.json()["step"] == 2
    assert await tenants.services.sessions.store.count() == 1


async def test_sessions_stored_before_namespaces_stay_their_owners(
    tenants: Served, http: httpx.AsyncClient
) -> None:
    """Records a named tenant wrote before namespaces (unscoped key, ``owner`` set)."""
    store = tenants.services.sessions.store
    state = np.zeros(4, np.float32)
    for sid in ("old-1", "v2:simple:t.acme:5"):
        now = time.time()  # a record's idle deadline counts from its last use
        await store.create(
            SessionRecord(
                sid, "simple", 1, state, 3, created_at=now, last_used_at=now, owner="acme"
            )
        )
    r = await http.get("/v1/sessions/old-1", headers=_as(ACME))
    assert r.status_code == 200 and r.json()["step"] == 3
    r = await http.post("/v1/sessions/old-1/step", json={**STEP, "step": 3}, headers=_as(ACME))
    assert r.status_code == 200 and r.json()["step"] == 4
    r = await http.post(
        "/v1/models/simple/steps", json={"steps": [{"session_id": "old-1", **STEP}]},
        headers=_as(ACME),
    )  # fmt: skip
    assert r.json()["results"][0]["step"] == 5
    r = await http.post(
        "/v1/models/simple/sessions", json={"session_id": "old-1"}, headers=_as(ACME)
    )
    assert r.status_code == 409  # it is acme's: no second one beside it
    for key in (BETA, BARE):  # to the others it does not exist
        r = await http.get("/v1/sessions/old-1", headers=_as(key))
        assert r.status_code == 404
    r = await http.get("/v1/sessions/acme~old-1", headers=_as(OPS))
    assert r.status_code == 200 and r.json()["step"] == 5
    body, headers = v2_body(
        [("inputs", "FP32", np.zeros((1, 1, 3), np.float32))],
        {"sequence_id": 5, "sequence_step": 3},
    )
    r = await http.post("/v2/models/simple/infer", content=body, headers={**headers, **_as(ACME)})
    assert r.status_code == 200 and r.json()["parameters"]["step"] == 4, r.text
    r = await http.delete("/v1/sessions/old-1", headers=_as(ACME))
    assert r.status_code == 204
    assert (await http.get("/v1/sessions/old-1", headers=_as(ACME))).status_code == 404
    assert await store.count() == 1
