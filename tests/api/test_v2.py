"""The v2 routes through the production app, on both session stores: sequences are sessions.

Numbers are compared with the v1 API of the same app (stateless predict of the
whole sequence), to 1e-5. The stock client is exercised in test_v2_tritonclient.py;
malformed requests in test_v2_errors.py.
"""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import orjson

from gruserve.api.v2.schemas import InferResponse, ModelMetadata, ServerMetadata

ATOL = 1e-5
HEADER = "Inference-Header-Content-Length"
Tensor = tuple[str, str, Any]  # (name, datatype, numpy array or nested data)


def v2_body(
    inputs: list[Tensor],
    parameters: dict[str, Any] | None = None,
    outputs: list[Any] | None = None,
    binary: bool = False,
) -> tuple[bytes, dict[str, str]]:
    """A v2 request: JSON ``data``, or the binary extension (JSON header + raw bytes)."""
    described, raw = [], []
    for name, datatype, value in inputs:
        array = np.asarray(value)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw.append(array.tobytes())
            entry["parameters"] = {"binary_data_size": len(raw[-1])}
        else:
            entry["data"] = array.ravel().tolist()
        described.append(entry)
    head: dict[str, Any] = {"inputs": described}
    if parameters is not None:
        head["parameters"] = parameters
    if outputs is not None:
        head["outputs"] = [o if isinstance(o, dict) else {"name": o} for o in outputs]
    text = orjson.dumps(head)
    return (text + b"".join(raw), {HEADER: str(len(text))}) if binary else (text, {})


def head_of(response: httpx.Response) -> dict[str, Any]:
    """The JSON part of a v2 reply, validated against the documented schema."""
    assert response.status_code == 200, response.text
    length = response.headers.get(HEADER)
    head = orjson.loads(response.content[: int(length)] if length else response.content)
    InferResponse.model_validate(head)
    return dict(head)


def outputs_of(response: httpx.Response) -> dict[str, np.ndarray]:
    """Decode a v2 reply (JSON or JSON + binary) into named arrays."""
    head, body, length = head_of(response), response.content, response.headers.get(HEADER)
    offset, arrays = int(length or 0), {}
    for out in head["outputs"]:
        assert out["datatype"] == "FP32"
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            data = np.asarray(out["data"], np.float32)
        else:
            data = np.frombuffer(body[offset : offset + size], "<f4")
            offset += size
        arrays[out["name"]] = data.reshape(out["shape"])
    assert offset == (len(body) if length else 0)
    return arrays


async def infer(client: httpx.AsyncClient, model: str, *args: Any, **kwargs: Any) -> httpx.Response:
    content, headers = v2_body(*args, **kwargs)
    return await client.post(f"/v2/models/{model}/infer", content=content, headers=headers)


async def predict(client: httpx.AsyncClient, model: str, x: np.ndarray, **body: Any) -> Any:
    r = await client.post(f"/v1/models/{model}/predict", json={"inputs": x.tolist(), **body})
    assert r.status_code == 200, r.text
    return r.json()


async def test_metadata_routes(client: httpx.AsyncClient) -> None:
    ServerMetadata.model_validate((await client.get("/v2")).json())
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    assert (await client.get("/v2/health/ready")).json() == {"ready": True}
    tokens = (await client.get("/v2/models/tokens/versions/1")).json()
    ModelMetadata.model_validate(tokens)
    assert tokens["inputs"][0] == {"name": "inputs", "datatype": "INT64", "shape": [-1, -1]}
    config = (await client.get("/v2/models/tokens/versions/1/config")).json()
    assert config == (await client.get("/v2/models/tokens/config")).json()
    assert config["sequence_batching"]["state"][0]["input_name"] == "initial_state/gru"
    bidi = (await client.get("/v2/models/bidi")).json()
    assert [o["name"] for o in bidi["outputs"]] == ["outputs/forward", "outputs/backward"]
    r = await client.get("/v2/models/simple/versions/x/ready")
    assert r.status_code == 422 and r.json() == {
        "error": "version: expected a version number, got 'x'"
    }


async def test_sequence_lifecycle(client: httpx.AsyncClient, rng: np.random.Generator) -> None:
    """Start, continue, restart, end; the session is v1's, on either store."""
    x = rng.normal(size=(1, 5, 3)).astype(np.float32)
    whole = np.asarray((await predict(client, "stacked", x))["outputs"])
    seq = {"sequence_id": 5, "sequence_start": True}
    first = outputs_of(await infer(client, "stacked", [("inputs", "FP32", x[:, :2])], seq))
    np.testing.assert_allclose(first["outputs"], whole[:, :2], atol=ATOL)
    r = await infer(
        client, "stacked", [("inputs", "FP32", x[:, 2:])], {"sequence_id": 5}, binary=True
    )
    about = {"sequence_id": 5, "session_id": "v2:stacked:5", "step": 2}
    assert head_of(r)["parameters"] == about
    np.testing.assert_allclose(outputs_of(r)["outputs"], whole[:, 2:], atol=ATOL)
    info = (await client.get("/v1/sessions/v2:stacked:5")).json()
    assert (info["step"], info["timesteps"]) == (2, 5)

    # a start on a live sequence starts it over, from zero state
    again = outputs_of(await infer(client, "stacked", [("inputs", "FP32", x[:, :2])], seq))
    np.testing.assert_allclose(again["outputs"], whole[:, :2], atol=ATOL)
    assert (await client.get("/v1/sessions/v2:stacked:5")).json()["step"] == 1
    end = {"sequence_id": 5, "sequence_end": True}
    last = outputs_of(await infer(client, "stacked", [("inputs", "FP32", x[:, 2:])], end))
    np.testing.assert_allclose(last["outputs"], whole[:, 2:], atol=ATOL)
    assert (await client.get("/v1/sessions/v2:stacked:5")).status_code == 404

    # start and end at once: the answer comes back, no session stays behind
    both = {"sequence_id": "once", "sequence_start": True, "sequence_end": True}
    once = outputs_of(await infer(client, "stacked", [("inputs", "FP32", x)], both))
    np.testing.assert_allclose(once["outputs"], whole, atol=ATOL)
    assert (await client.get("/v1/sessions/v2:stacked:s:once")).status_code == 404


async def test_rejected_request_leaves_the_sequence_as_it_was(
    client: httpx.AsyncClient, rng: np.random.Generator
) -> None:
    x = rng.normal(size=(1, 3, 3)).astype(np.float32)
    whole = np.asarray((await predict(client, "simple", x))["outputs"])
    start = {"sequence_id": 8, "sequence_start": True}
    await infer(client, "simple", [("inputs", "FP32", x[:, :1])], start)
    bad = await infer(
        client, "simple", [("inputs", "FP32", np.zeros((1, 1, 4), np.float32))], start
    )
    assert bad.status_code == 422 and "[-1, -1, 3]" in bad.json()["error"]
    rest = await infer(client, "simple", [("inputs", "FP32", x[:, 1:])], {"sequence_id": 8})
    np.testing.assert_allclose(outputs_of(rest)["outputs"], whole[:, 1:], atol=ATOL)


async def test_explicit_states_mask_and_requested_outputs(
    client: httpx.AsyncClient, rng: np.random.Generator
) -> None:
    x = rng.normal(size=(2, 4, 3)).astype(np.float32)
    mask = np.array([[True, True, False, True], [True, False, True, True]])
    h0 = {"gru_a": rng.normal(size=(2, 6)), "gru_b": rng.normal(size=(2, 5))}
    states = [(f"initial_state/{k}", "FP32", v.astype(np.float32)) for k, v in h0.items()]
    want = ["final_state/gru_b", {"name": "outputs", "parameters": {"binary_data": True}}]
    expected = await predict(
        client,
        "stacked",
        x,
        mask=mask.tolist(),
        initial_state={k: v.astype(np.float32).tolist() for k, v in h0.items()},
        return_state=True,
    )
    got = outputs_of(
        await infer(
            client,
            "stacked",
            [("inputs", "FP32", x), ("mask", "BOOL", mask), *states],
            outputs=want,
        )
    )
    assert list(got) == ["final_state/gru_b", "outputs"]
    np.testing.assert_allclose(got["outputs"], expected["outputs"], atol=ATOL)
    np.testing.assert_allclose(got["final_state/gru_b"], expected["states"]["gru_b"], atol=ATOL)

    # a sequence may start from given states (binary tensors), and no later
    start = {"sequence_id": 3, "sequence_start": True}
    first = [("inputs", "FP32", x[:1]), *((n, d, v[:1]) for n, d, v in states)]
    seq = outputs_of(await infer(client, "stacked", first, start, binary=True))
    unmasked = await predict(
        client, "stacked", x[:1], initial_state={k: v[:1].tolist() for k, v in h0.items()}
    )
    np.testing.assert_allclose(seq["outputs"], unmasked["outputs"], atol=ATOL)
    r = await infer(client, "stacked", first, {"sequence_id": 3})
    assert r.status_code == 422 and "set only by its start" in r.json()["error"]


async def test_model_kinds(client: httpx.AsyncClient, rng: np.random.Generator) -> None:
    """Preprocessing, one output per sequence, two outputs: v2 equals v1 on each."""
    x = rng.normal(size=(1, 3, 3)).astype(np.float32) * 5
    for model in ("scaled", "last_only", "bidi", "backwards"):
        expected = (await predict(client, model, x))["outputs"]
        if not isinstance(expected, dict):
            expected = {"outputs": expected}
        start = {"sequence_id": 1, "sequence_start": True, "sequence_end": True}
        for parameters in (None, start):
            got = outputs_of(await infer(client, model, [("inputs", "FP32", x)], parameters))
            assert list(got) == list(expected)
            for name in got:
                np.testing.assert_allclose(got[name], expected[name], atol=ATOL)


async def test_errors_keep_each_protocol_shape(client: httpx.AsyncClient) -> None:
    v2 = await client.get("/v2/models/nope/config")
    assert v2.status_code == 404 and isinstance(v2.json()["error"], str)
    v1 = await client.get("/v1/models/nope")
    assert v1.status_code == 404 and v1.json()["error"]["type"] == "ModelNotFound"
    assert (await client.get("/v2/no/such/route")).json()["error"].startswith("no route")
    spec = (await client.get("/openapi.json")).json()
    body = spec["paths"]["/v2/models/{model}/infer"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "application/octet-stream"}
