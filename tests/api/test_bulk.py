"""Bulk steps (``POST /v1/models/{model}/steps`` and ``/v1/models/{model}/ws``), both stores.

Every numeric expectation is the torch model run over the whole sequence
(tests/fixtures.py) or the same steps sent one by one.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import Served, live_server, serve
from gruserve.api.v1.schemas import BulkStepsResponse
from gruserve.runtime.batcher import Batcher

ATOL = 1e-5
MEDIA = "application/x-gruserve-steps"
U32 = struct.Struct("<I")


async def _create(client: httpx.AsyncClient, model: str = "stacked") -> str:
    r = await client.post(f"/v1/models/{model}/sessions", json={})
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


async def _bulk(
    client: httpx.AsyncClient, steps: list[dict[str, Any]], model: str = "stacked"
) -> list[dict[str, Any]]:
    r = await client.post(f"/v1/models/{model}/steps", json={"steps": steps})
    assert r.status_code == 200, r.text
    BulkStepsResponse.model_validate(r.json())
    results: list[dict[str, Any]] = r.json()["results"]
    assert len(results) == len(steps)
    return results


async def _count(client: httpx.AsyncClient, sid: str) -> int:
    return int((await client.get(f"/v1/sessions/{sid}")).json()["step"])


def _binary_body(header: dict[str, Any], values: list[np.ndarray]) -> bytes:
    head = json.dumps(header).encode()
    return U32.pack(len(head)) + head + b"".join(v.astype("<f4").tobytes() for v in values)


def _binary_reply(data: bytes) -> tuple[list[dict[str, Any]], list[np.ndarray | None]]:
    """The reply's results and each one's float32 values (None for an error)."""
    (size,) = U32.unpack_from(data)
    results = json.loads(data[4 : 4 + size])["results"]
    values: list[np.ndarray | None] = []
    offset = 4 + size
    for result in results:
        if "error" in result:
            values.append(None)
            continue
        n = result["values"]
        values.append(np.frombuffer(data, "<f4", n, offset))
        offset += 4 * n
    assert offset == len(data)
    return results, values


def _ok(values: np.ndarray | None) -> np.ndarray:
    """The values of a result the test knows succeeded (an error's are None)."""
    assert values is not None
    return values


async def test_bulk_equals_single_steps_and_the_whole_sequence(
    client: httpx.AsyncClient, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    """6 sessions stepped in bulk (chunks of 1-3 timesteps, one without a time axis) equal
    6 sessions stepped one request at a time, and the model run over the whole sequence."""
    x = rng.normal(size=(6, 7, 3)).astype(np.float32)
    bulk_ids = [await _create(client) for _ in range(6)]
    single_ids = [await _create(client) for _ in range(6)]
    parts = [slice(0, 1), slice(1, 3), slice(3, 6), slice(6, 7)]
    bulk_out: list[list[np.ndarray]] = [[] for _ in range(6)]
    for n, part in enumerate(parts):
        squeeze = part.stop - part.start == 1 and n == 0  # [features]: no time axis
        steps = [
            {"session_id": sid, "inputs": (x[i, part][0] if squeeze else x[i, part]).tolist()}
            for i, sid in enumerate(bulk_ids)
        ]
        results = await _bulk(client, steps)
        for i, result in enumerate(results):
            assert result["session_id"] == bulk_ids[i] and result["step"] == n + 1
            single = await client.post(
                f"/v1/sessions/{single_ids[i]}/step", json={"inputs": steps[i]["inputs"]}
            )
            assert single.status_code == 200
            np.testing.assert_allclose(result["outputs"], single.json()["outputs"], atol=ATOL)
            bulk_out[i].append(np.asarray(result["outputs"], np.float32).reshape(-1, 2))
    outs, expected_states = tiny_models["stacked"].reference(x)
    np.testing.assert_allclose(np.stack([np.concatenate(o) for o in bulk_out]), outs[0], atol=ATOL)
    for i, sid in enumerate(bulk_ids):
        got = (await client.get(f"/v1/sessions/{sid}", params={"include_state": "true"})).json()
        for key, value in got["states"].items():
            np.testing.assert_allclose(value, expected_states[key][i], atol=ATOL)


async def test_bad_steps_fail_alone(
    client: httpx.AsyncClient, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    x = rng.normal(size=(2, 2, 3)).astype(np.float32)
    a, b, other = await _create(client), await _create(client), await _create(client, "simple")
    steps: list[Any] = [
        {"session_id": a, "inputs": x[0].tolist()},
        {"session_id": b, "inputs": [[1.0, 2.0]]},  # 2 features, the model takes 3
        {"inputs": x[1].tolist()},
        {"session_id": "nobody", "inputs": x[1].tolist()},
        {"session_id": other, "inputs": x[1].tolist()},
        {"session_id": b, "inputs": x[1].tolist(), "step": "1"},
        {"session_id": b, "inputs": x[1].tolist(), "colour": 1},
        "not a step",
        {"session_id": b, "inputs": [[0.0, 0.0, True]]},
        {"session_id": b, "inputs": np.zeros((5000, 3)).tolist()},  # over max_timesteps
        {"session_id": b, "inputs": x[1].tolist()},
    ]
    results = await _bulk(client, steps)
    expected = [
        (a, None, None, None),
        (b, "InvalidInput", 422, "steps[1].inputs"),
        (None, "InvalidInput", 422, "steps[2].session_id"),
        ("nobody", "SessionNotFound", 404, None),
        (other, "SessionNotOnModel", 404, None),
        (b, "InvalidInput", 422, "steps[5].step"),
        (b, "InvalidInput", 422, "steps[6].colour"),
        (None, "InvalidInput", 422, "steps[7]"),
        (b, "InvalidInput", 422, "steps[8].inputs[0][2]"),
        (b, "PayloadTooLarge", 413, None),
        (b, None, None, None),
    ]
    for result, (sid, kind, status, field) in zip(results, expected, strict=True):
        assert result["session_id"] == sid
        if kind is None:
            assert "error" not in result and result["step"] == 1, result
        else:
            error = result["error"]
            assert (error["type"], error["status"], error["field"]) == (kind, status, field)
            assert field is None or error["message"].startswith(f"{field}: "), error
    assert "belongs to model 'simple', not 'stacked'" in results[4]["error"]["message"]
    for i, sid in enumerate([a, b]):
        outs, _ = tiny_models["stacked"].reference(x[i : i + 1])
        index = 0 if i == 0 else 10
        np.testing.assert_allclose(results[index]["outputs"], outs[0][0], atol=ATOL)
        assert await _count(client, sid) == 1
    assert await _count(client, other) == 0


async def test_one_session_twice_applies_in_order(
    client: httpx.AsyncClient, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    """A session named 5 times among others' steps advances 5 steps, in request order."""
    x = rng.normal(size=(2, 5, 3)).astype(np.float32)
    a, b = await _create(client), await _create(client)
    steps = []
    for t in range(5):
        steps.append({"session_id": a, "inputs": x[0, t : t + 1].tolist()})
        if t % 2 == 0:
            steps.append({"session_id": b, "inputs": x[1, t // 2 : t // 2 + 1].tolist()})
    results = await _bulk(client, steps)
    mine = [r for r in results if r["session_id"] == a]
    assert [r["step"] for r in mine] == [1, 2, 3, 4, 5]
    outs, _ = tiny_models["stacked"].reference(x[:1])
    np.testing.assert_allclose(np.concatenate([r["outputs"] for r in mine]), outs[0][0], atol=ATOL)
    assert [r["step"] for r in results if r["session_id"] == b] == [1, 2, 3]
    outs, _ = tiny_models["stacked"].reference(x[1:, :3])
    got = np.concatenate([r["outputs"] for r in results if r["session_id"] == b])
    np.testing.assert_allclose(got, outs[0][0], atol=ATOL)


async def test_numbered_resends_apply_once(
    client: httpx.AsyncClient, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    x = rng.normal(size=(3, 2, 3)).astype(np.float32)
    ids = [await _create(client) for _ in range(3)]
    first = [{"session_id": s, "inputs": x[i, :1].tolist(), "step": 0} for i, s in enumerate(ids)]
    replies = await _bulk(client, first)
    again = await _bulk(client, first)  # the reply was lost: the same request again
    assert again == replies and all(r["step"] == 1 for r in again)
    second = [{"session_id": s, "inputs": x[i, 1:].tolist(), "step": 1} for i, s in enumerate(ids)]
    second[2]["step"] = 3  # ahead of the session
    results = await _bulk(client, [*second, first[0]])  # and a resend of an older step
    for i in range(2):
        assert results[i]["step"] == 2
        outs, _ = tiny_models["stacked"].reference(x[i : i + 1])
        np.testing.assert_allclose(
            np.concatenate([replies[i]["outputs"], results[i]["outputs"]]), outs[0][0], atol=ATOL
        )
    for index, current in [(2, 1), (3, 2)]:
        error = results[index]["error"]
        assert (error["type"], error["status"], error["field"]) == (
            "StepOutOfOrder",
            409,
            f"steps[{index}].step",
        )
        assert error["current_step"] == current
    assert [await _count(client, s) for s in ids] == [2, 2, 1]


async def test_whole_request_errors(client: httpx.AsyncClient) -> None:
    sid = await _create(client)
    cases: list[tuple[bytes | str, int, str | None]] = [
        (b"[1]", 422, "body"),
        (b"{}", 422, "steps"),
        (b'{"steps": {}}', 422, "steps"),
        (b'{"steps": [], "extra": 1}', 422, "extra"),
        (json.dumps({"steps": [{"session_id": sid, "inputs": [0, 0, 0]}] * 1025}), 413, None),
    ]
    for body, status, field in cases:
        r = await client.post("/v1/models/stacked/steps", content=body)
        assert r.status_code == status, r.text
        assert r.json()["error"]["field"] == field
    r = await client.post("/v1/models/nothing/steps", json={"steps": []})
    assert r.status_code == 404 and r.json()["error"]["type"] == "ModelNotFound"
    assert await _count(client, sid) == 0
    assert await _bulk(client, []) == []


async def test_binary_form(
    client: httpx.AsyncClient, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    """Binary requests get binary replies equal to JSON's; per-step errors as in JSON."""
    x = rng.normal(size=(4, 3, 3)).astype(np.float32)
    ids = [await _create(client) for _ in range(4)]
    twins = [await _create(client) for _ in range(4)]
    counts = [1, 2, 3, 1]
    header = {
        "steps": [
            {"session_id": s, "timesteps": n, "step": 0} for s, n in zip(ids, counts, strict=True)
        ]
    }
    values = [x[i, :n] for i, n in enumerate(counts)]
    r = await client.post(
        "/v1/models/stacked/steps",
        content=_binary_body(header, values),
        headers={"content-type": MEDIA},
    )
    assert r.status_code == 200 and r.headers["content-type"] == MEDIA, r.text
    results, got = _binary_reply(r.content)
    twin_steps = [
        {"session_id": s, "inputs": v.tolist()} for s, v in zip(twins, values, strict=True)
    ]
    as_json = await _bulk(client, twin_steps)
    for i, (result, out) in enumerate(zip(results, got, strict=True)):
        assert result == {"session_id": ids[i], "step": 1, "values": counts[i] * 2}
        assert out is not None
        np.testing.assert_allclose(out.reshape(-1, 2), as_json[i]["outputs"], atol=ATOL)
        expected, _ = tiny_models["stacked"].reference(x[i : i + 1, : counts[i]])
        np.testing.assert_allclose(out.reshape(-1, 2), expected[0][0], atol=ATOL)
    # a resend is answered byte for byte; a bad step number or an unknown session fails alone
    again = await client.post(
        "/v1/models/stacked/steps",
        content=_binary_body(header, values),
        headers={"content-type": MEDIA},
    )
    assert again.content == r.content
    header["steps"][1]["step"] = -1
    header["steps"][2]["session_id"] = "nobody"
    header["steps"][3]["step"] = 1
    r = await client.post(
        "/v1/models/stacked/steps",
        content=_binary_body(header, values),
        headers={"content-type": MEDIA},
    )
    results, got = _binary_reply(r.content)
    assert results[0]["step"] == 1 and got[0] is not None  # a resend again
    assert results[1]["error"]["field"] == "steps[1].step"
    assert results[2]["error"]["type"] == "SessionNotFound"
    assert results[3]["step"] == 2 and got[3] is not None
    # framing faults fail the request
    body = _binary_body(header, values)
    for bad in [body[:3], body[:-4], body + b"\0\0\0\0", U32.pack(1 << 20) + body[4:]]:
        r = await client.post(
            "/v1/models/stacked/steps", content=bad, headers={"content-type": MEDIA}
        )
        assert r.status_code == 422 and r.json()["error"]["field"] == "body", r.text
    header["steps"][0]["timesteps"] = 0
    r = await client.post(
        "/v1/models/stacked/steps",
        content=_binary_body(header, values),
        headers={"content-type": MEDIA},
    )
    assert r.status_code == 422 and r.json()["error"]["field"] == "steps[0].timesteps"


async def test_binary_token_ids(client: httpx.AsyncClient, tiny_models: dict[str, Any]) -> None:
    ids = np.array([[3, 1, 4], [9, 2, 6]])
    sids = [await _create(client, "tokens") for _ in range(2)]
    header = json.dumps({"steps": [{"session_id": s, "timesteps": 3} for s in sids]}).encode()
    body = U32.pack(len(header)) + header + ids.astype("<i8").tobytes()
    r = await client.post("/v1/models/tokens/steps", content=body, headers={"content-type": MEDIA})
    results, got = _binary_reply(r.content)
    assert [r["step"] for r in results] == [1, 1]
    outs, _ = tiny_models["tokens"].reference(ids)
    for i in range(2):
        np.testing.assert_allclose(_ok(got[i]).reshape(outs[0][i].shape), outs[0][i], atol=ATOL)


@pytest.fixture
async def ws_url(served: Served) -> Any:
    async for address in live_server(served.app):
        yield f"ws://{address}"


async def test_websocket(
    served: Served, ws_url: str, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    x = rng.normal(size=(3, 2, 3)).astype(np.float32)
    ids = [await _create(served.client) for _ in range(3)]
    async with connect(f"{ws_url}/v1/models/stacked/ws") as ws:
        steps = [{"session_id": s, "inputs": x[i, :1].tolist()} for i, s in enumerate(ids)]
        steps.append({"session_id": ids[0], "inputs": [1, 2]})
        await ws.send(json.dumps({"steps": steps}))
        first = json.loads(await ws.recv())["results"]
        assert [r.get("step") for r in first] == [1, 1, 1, None]
        assert first[3]["error"]["field"] == "steps[3].inputs"
        await ws.send("not json")
        assert json.loads(await ws.recv())["error"]["field"] == "body"
        header = {"steps": [{"session_id": s, "timesteps": 1, "step": 1} for s in ids]}
        await ws.send(_binary_body(header, [x[i, 1:] for i in range(3)]))
        reply = await ws.recv()
        assert isinstance(reply, bytes)
        results, got = _binary_reply(reply)
        assert [r["step"] for r in results] == [2, 2, 2]
    outs, _ = tiny_models["stacked"].reference(x)
    for i in range(3):
        streamed = np.concatenate(
            [np.reshape(first[i]["outputs"], (-1, 2)), _ok(got[i]).reshape(-1, 2)]
        )
        np.testing.assert_allclose(streamed, outs[0][i], atol=ATOL)
    async with connect(f"{ws_url}/v1/models/nothing/ws") as ws:
        assert json.loads(await ws.recv())["error"]["type"] == "ModelNotFound"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404


async def test_step_and_byte_limits(models_dir: Any, tiny_models: dict[str, Any]) -> None:
    async for s in serve(models_dir, max_bulk_steps=2):
        sid = await _create(s.client)
        steps = [{"session_id": sid, "inputs": [0.0, 0.0, 0.0]}] * 3
        r = await s.client.post("/v1/models/stacked/steps", json={"steps": steps})
        assert r.status_code == 413 and "GRUSERVE_MAX_BULK_STEPS" in r.json()["error"]["message"]
        assert len(await _bulk(s.client, steps[:2])) == 2
    async for s in serve(models_dir, max_request_bytes=256):
        sid = await _create(s.client)
        steps = [{"session_id": sid, "inputs": [0.0, 0.0, 0.0]}] * 8
        r = await s.client.post("/v1/models/stacked/steps", json={"steps": steps})
        assert r.status_code == 413 and "GRUSERVE_MAX_REQUEST_BYTES" in r.json()["error"]["message"]
        assert await _count(s.client, sid) == 0


async def test_openapi_documents_both_forms(client: httpx.AsyncClient) -> None:
    route = (await client.get("/openapi.json")).json()["paths"]["/v1/models/{model}/steps"]["post"]
    assert set(route["requestBody"]["content"]) == {"application/json", MEDIA}
    assert set(route["responses"]["200"]["content"]) == {"application/json", MEDIA}


async def test_masks_and_several_outputs(
    client: httpx.AsyncClient, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    """A masked entry equals the masked sequence; a two-output model's binary values are
    every output in order."""
    x = rng.normal(size=(1, 4, 3)).astype(np.float32)
    mask = np.array([[True, False, True, True]])
    sid = await _create(client)
    (result,) = await _bulk(
        client, [{"session_id": sid, "inputs": x[0].tolist(), "mask": mask[0].tolist()}]
    )
    outs, _ = tiny_models["stacked"].reference(x, mask=mask)
    np.testing.assert_allclose(result["outputs"], outs[0][0], atol=ATOL)

    sid = await _create(client, "bidi")
    header = {"steps": [{"session_id": sid, "timesteps": 4}]}
    r = await client.post(
        "/v1/models/bidi/steps",
        content=_binary_body(header, [x[0]]),
        headers={"content-type": MEDIA},
    )
    (result,), (got,) = _binary_reply(r.content)
    outs, _ = tiny_models["bidi"].reference(x)
    expected = np.concatenate([o[0].ravel() for o in outs])
    assert result["values"] == expected.size and got is not None
    np.testing.assert_allclose(got, expected, atol=ATOL)


async def test_api_keys_guard_both_routes(models_dir: Any, tiny_models: dict[str, Any]) -> None:
    key = {"authorization": "Bearer bulk-key"}
    async for s in serve(models_dir, api_keys="bulk-key"):
        r = await s.client.post("/v1/models/simple/sessions", json={}, headers=key)
        body = {"steps": [{"session_id": r.json()["session_id"], "inputs": [1.0, 2.0, 3.0]}]}
        refused = await s.client.post("/v1/models/simple/steps", json=body)
        assert refused.status_code == 401
        allowed = await s.client.post("/v1/models/simple/steps", json=body, headers=key)
        assert allowed.json()["results"][0]["step"] == 1
        async for address in live_server(s.app):
            with pytest.raises(InvalidStatus) as denied:
                async with connect(f"ws://{address}/v1/models/simple/ws"):
                    pass
            assert denied.value.response.status_code == 401
            async with connect(f"ws://{address}/v1/models/simple/ws", additional_headers=key) as ws:
                await ws.send(json.dumps(body))
                assert json.loads(await ws.recv())["results"][0]["step"] == 2


async def test_bulk_requests_skip_the_framework_layers(served: Served) -> None:
    """``POST /v1/models/{model}/steps`` is answered by the hot path (edge and key check
    only), with the route's replies and error shapes: 200, an unknown model's 404, a body
    that is not JSON's 422; every reply carries its request id."""
    endpoint = served.app.hot_paths.bulk
    before = endpoint.taken
    sid = await _create(served.client)
    ok = await served.client.post(
        "/v1/models/stacked/steps", json={"steps": [{"session_id": sid, "inputs": [1, 2, 3]}]}
    )
    missing = await served.client.post("/v1/models/nope/steps", json={"steps": []})
    bad = await served.client.post(
        "/v1/models/stacked/steps", content=b"{", headers={"content-type": "application/json"}
    )
    assert endpoint.taken == before + 3
    assert ok.status_code == 200 and ok.json()["results"][0]["step"] == 1
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "ModelNotFound"
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "body"
    assert all(len(r.headers["x-request-id"]) == 32 for r in (ok, missing, bad))


async def test_binary_mix_equals_single_steps_and_the_sequence(
    served: Served,
    tiny_models: dict[str, Any],
    rng: np.random.Generator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A binary request mixing plain steps (decoded as one array: most of them), a session
    named twice, a numbered step, a step of another length, an unknown session, one on
    another model and a bad entry: each answered step equals the same step sent alone and
    each session's outputs the model run over its whole sequence; errors fail alone. A NaN
    in a plain step sends the array back to the per-step checks, which name it."""
    client = served.client
    blocks: list[int] = []  # rows of each block run (the array path was taken)
    real = Batcher.submit_block

    async def submit_block(self: Batcher, inputs: np.ndarray, states: np.ndarray) -> Any:
        blocks.append(inputs.shape[0])
        return await real(self, inputs, states)

    monkeypatch.setattr(Batcher, "submit_block", submit_block)
    ids = [await _create(client) for _ in range(4)]
    twins = [await _create(client) for _ in range(4)]
    other = await _create(client, "simple")
    x = rng.normal(size=(4, 5, 3)).astype(np.float32)
    plan: list[tuple[dict[str, Any], np.ndarray]] = [
        ({"session_id": ids[0], "timesteps": 2}, x[0, 0:2]),
        ({"session_id": ids[1], "timesteps": 2}, x[1, 0:2]),
        ({"session_id": ids[2], "timesteps": 2, "step": 0}, x[2, 0:2]),
        ({"session_id": ids[0], "timesteps": 2}, x[0, 2:4]),  # twice: after its first
        ({"session_id": "nobody", "timesteps": 2}, x[3, 0:2]),
        ({"session_id": ids[3], "timesteps": 1}, x[3, 0:1]),  # another length
        ({"session_id": other, "timesteps": 2}, x[3, 0:2]),
        ({"session_id": ids[1], "timesteps": 2, "step": 1}, x[1, 2:4]),  # numbered, again
        ({"session_id": 7, "timesteps": 2}, x[3, 0:2]),
        ({"session_id": ids[0], "timesteps": 1}, x[0, 4:5]),  # a third time
    ]
    header = {"steps": [entry for entry, _ in plan]}
    r = await client.post(
        "/v1/models/stacked/steps",
        content=_binary_body(header, [v for _, v in plan]),
        headers={"content-type": MEDIA},
    )
    assert r.status_code == 200, r.text
    results, got = _binary_reply(r.content)
    errors = {
        i: (res["error"]["type"], res["error"]["field"])
        for i, res in enumerate(results)
        if "error" in res
    }
    assert errors == {
        4: ("SessionNotFound", None),
        6: ("SessionNotOnModel", None),
        8: ("InvalidInput", "steps[8].session_id"),
    }
    assert [res.get("step") for res in results] == [1, 1, 1, 2, None, 1, None, 2, None, 3]
    assert blocks == [2]  # the first steps of ids[0] and ids[1]
    twin = dict(zip(ids, twins, strict=True))
    for i, (entry, values) in enumerate(plan):
        if i in errors:
            continue
        body: dict[str, Any] = {"inputs": values.tolist()}
        if "step" in entry:
            body["step"] = entry["step"]
        single = await client.post(f"/v1/sessions/{twin[entry['session_id']]}/step", json=body)
        assert single.status_code == 200 and single.json()["step"] == results[i]["step"]
        np.testing.assert_allclose(
            _ok(got[i]).reshape(-1, 2),
            single.json()["outputs"],
            atol=ATOL,
        )
    sequences = {ids[0]: x[0, :5], ids[1]: x[1, :4], ids[2]: x[2, :2], ids[3]: x[3, :1]}
    for sid, sequence in sequences.items():
        mine = [g for (entry, _), g in zip(plan, got, strict=True) if entry["session_id"] == sid]
        outs, _ = tiny_models["stacked"].reference(sequence[None])
        streamed = np.concatenate([m.reshape(-1, 2) for m in mine if m is not None])
        np.testing.assert_allclose(streamed, outs[0][0], atol=ATOL)
    assert await _count(client, other) == 0

    nan = x[:3, :1].copy()
    nan[1, 0, 2] = np.nan
    header = {"steps": [{"session_id": s, "timesteps": 1} for s in ids[:3]]}
    r = await client.post(
        "/v1/models/stacked/steps",
        content=_binary_body(header, list(nan)),
        headers={"content-type": MEDIA},
    )
    results, got = _binary_reply(r.content)
    assert results[1]["error"]["field"] == "steps[1].inputs[0][2]"
    assert [res.get("step") for res in results] == [4, None, 2]
