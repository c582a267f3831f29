"""Model listing, description and stateless predict over REST; input errors name their field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import serve
from gruserve.api.v1.schemas import ModelDescription, ModelList, PredictResponse

ATOL = 1e-5


async def test_list_and_describe(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    listed = ModelList.model_validate(r.json())
    names = {m.name for m in listed.models}
    assert {"simple", "stacked", "loop", "backwards", "tokens", "bidi", "scaled"} <= names
    assert all(m.ready and m.provider == "cpu" and m.error is None for m in listed.models)

    r = await client.get("/v1/models/stacked")
    info = ModelDescription.model_validate(r.json())
    assert (info.features, info.provider, info.version) == (3, "cpu", 1)
    assert [(s["key"], s["units"]) for s in info.states] == [("gru_a", 6), ("gru_b", 5)]
    assert [la["class_name"] for la in info.layers] == ["GRU", "GRU", "Dense"]
    assert (
        info.layers[0]["config"]["return_sequences"] is True
        and info.layers[0]["export"]["strategy"]
    )
    loop = (await client.get("/v1/models/loop")).json()
    assert (
        loop["layers"][0]["config"]["reset_after"] is False
        and loop["layers"][0]["export"]["strategy"] == "loop"
    )
    tokens = (await client.get("/v1/models/tokens")).json()
    assert tokens["features"] is None and tokens["vocabulary"] == 10
    r = await client.get("/v1/models/missing")
    assert r.status_code == 404 and "simple" in r.json()["error"]["message"]


async def test_predict_matches_torch(
    client: httpx.AsyncClient, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    x = rng.normal(size=(3, 6, 3)).astype(np.float32)
    mask = np.ones((3, 6), bool)
    mask[1, 4:] = False
    mask[2, 0] = False
    init = {
        "gru_a": rng.normal(size=(3, 6)).astype(np.float32),
        "gru_b": rng.normal(size=(3, 5)).astype(np.float32),
    }
    body = {
        "inputs": x.tolist(),
        "mask": mask.tolist(),
        "return_state": True,
        "initial_state": {k: v.tolist() for k, v in init.items()},
    }
    r = await client.post("/v1/models/stacked/predict", json=body)
    assert r.status_code == 200, r.text
    reply = PredictResponse.model_validate(r.json())
    outs, states = tiny_models["stacked"].reference(x, init, mask)
    np.testing.assert_allclose(np.asarray(reply.outputs), outs[0], atol=ATOL)
    assert reply.states is not None
    for key, value in reply.states.items():
        np.testing.assert_allclose(np.asarray(value), states[key], atol=ATOL)

    r = await client.post("/v1/models/simple/predict", json={"inputs": x.tolist()})
    assert "states" not in r.json()
    np.testing.assert_allclose(
        r.json()["outputs"], tiny_models["simple"].reference(x)[0][0], atol=ATOL
    )

    r = await client.post("/v1/models/bidi/predict", json={"inputs": x.tolist()})
    outs, _ = tiny_models["bidi"].reference(x)
    np.testing.assert_allclose(r.json()["outputs"]["outputs/backward"], outs[1], atol=ATOL)


def _raw(value: Any) -> bytes:
    return json.dumps(value).encode()


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b'{"inputs": [[[1, 2]]]}', 422, "inputs"),
        (b'{"inputs": [[[1, 2, NaN]]]}', 422, "inputs[0][0][2]"),
        (b'{"inputs": [[[1, 2, Infinity]]]}', 422, "inputs[0][0][2]"),
        (b'{"inputs": [[[1, 2, 1e999]]]}', 422, "inputs[0][0][2]"),
        (b'{"inputs": [[[1, 2, 1e39]]]}', 422, "inputs[0][0][2]"),
        (b'{"inputs": [[[1, 2, "3"]]]}', 422, "inputs[0][0][2]"),
        (b'{"inputs": [[[1, 2, true]]]}', 422, "inputs[0][0][2]"),
        (b'{"inputs": [[[1, 2, 3], [1, 2]]]}', 422, "inputs[0][1]"),
        (b'{"inputs": [[[1, 2, 3]]], "mask": [[1]]}', 422, "mask[0][0]"),
        (b'{"inputs": [[[1, 2, 3]]], "mask": [[true, false]]}', 422, "mask"),
        (
            b'{"inputs": [[[1, 2, 3]]], "initial_state": {"gru": [[0, 0]]}}',
            422,
            "initial_state.gru",
        ),
        (b'{"inputs": [[[1, 2, 3]]], "extra": 1}', 422, "extra"),
        (b'{"mask": [[true]]}', 422, "inputs"),
        (b'{"inputs": [[[1, 2, 3]]', 422, "body"),
        (b"[1, 2]", 422, "body"),
        (_raw({"inputs": [[[0.0, 0.0, 0.0]] * 9]}), 413, None),
    ],
)
async def test_predict_rejects_bad_input(
    models_dir: Path, tiny_models: dict[str, Any], body: bytes, status: int, field: str | None
) -> None:
    async for s in serve(models_dir, max_timesteps=8):
        r = await s.client.post("/v1/models/simple/predict", content=body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["field"] == field and error["message"]
        if status == 413:
            assert "GRUSERVE_MAX_TIMESTEPS" in error["message"]


async def test_request_byte_limit(models_dir: Path, tiny_models: dict[str, Any]) -> None:
    async for s in serve(models_dir, max_request_bytes=1000):
        big = _raw({"inputs": [[[0.123456789] * 3] * 100]})
        r = await s.client.post("/v1/models/simple/predict", content=big)
        assert r.status_code == 413 and "GRUSERVE_MAX_REQUEST_BYTES" in r.json()["error"]["message"]

        async def chunked(data: bytes) -> Any:  # no Content-Length: the limit applies while reading
            for i in range(0, len(data), 100):
                yield data[i : i + 100]

        r = await s.client.post("/v1/models/simple/predict", content=chunked(big))
        assert r.status_code == 413 and r.json()["error"]["type"] == "PayloadTooLarge"
        r = await s.client.post(
            "/v1/models/simple/predict", content=_raw({"inputs": [[[0.1] * 3]]})
        )
        assert r.status_code == 200
