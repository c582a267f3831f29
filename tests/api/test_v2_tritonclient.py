"""The stock ``tritonclient[http]`` against a real ``gruserve serve`` process.

tritonclient's HTTP client is gevent-based and synchronous, so it talks to a
server subprocess (one per module, on a free port). Every number is checked
against the v1 API of the same server: a v1 session stepped alike and a
single full-sequence v1 predict, to 1e-5.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from v1_helpers import v1_predict, v1_session_outputs

tritonhttp = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from conftest import free_port  # noqa: E402
from test_server import BIN, _env, _start, _stop  # noqa: E402

ATOL = 1e-5
STEPS = 20


@pytest.fixture(scope="module")
def server(models_dir: Path, tiny_models: dict[str, Any], tmp_path_factory: Any) -> Iterator[str]:
    """``host:port`` of a ``gruserve serve`` process on the test models (memory store)."""
    port = free_port()
    proc = _start(
        [str(BIN / "gruserve"), "serve", "--port", str(port)],
        _env(models_dir),
        port,
        tmp_path_factory.mktemp("v2-server"),
    )
    yield f"127.0.0.1:{port}"
    _stop(proc)


@pytest.fixture
def triton(server: str) -> Iterator[Any]:
    client = tritonhttp.InferenceServerClient(server, concurrency=4)
    yield client
    client.close()


def one_step(name: str, x: np.ndarray, datatype: str = "FP32", binary: bool = True) -> list[Any]:
    tensor = tritonhttp.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    return [tensor]


def test_server_and_model_metadata(triton: Any) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "gruserve"
    assert {"binary_tensor_data", "sequence", "sequence(string_id)"} <= set(meta["extensions"])

    model = triton.get_model_metadata("stacked")
    assert model == triton.get_model_metadata("stacked", "1")
    assert model["versions"] == ["1"] and model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [
        {"name": "inputs", "datatype": "FP32", "shape": [-1, -1, 3]},
        {"name": "mask", "datatype": "BOOL", "shape": [-1, -1]},
    ]
    assert model["outputs"] == [{"name": "outputs", "datatype": "FP32", "shape": [-1, -1, 2]}]
    assert triton.is_model_ready("stacked") and triton.is_model_ready("stacked", "1")
    assert not triton.is_model_ready("stacked", "2") and not triton.is_model_ready("nope")

    config = triton.get_model_config("stacked")
    assert config["max_batch_size"] == 64
    assert config["input"][0]["dims"] == [-1, 3] and config["input"][1]["optional"]
    sequence = config["sequence_batching"]
    assert sequence["max_sequence_idle_microseconds"] == 1800 * 10**6
    assert [(s["input_name"], s["output_name"], s["dims"]) for s in sequence["state"]] == [
        ("initial_state/gru_a", "final_state/gru_a", [6]),
        ("initial_state/gru_b", "final_state/gru_b", [5]),
    ]
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("nope")
    assert info.value.status() == "404" and "'nope' is not served" in info.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_stateless_infer(
    triton: Any, server: str, tiny_models: dict[str, Any], rng: np.random.Generator, binary: bool
) -> None:
    x = rng.normal(size=(3, 7, 3)).astype(np.float32)
    outputs = [
        tritonhttp.InferRequestedOutput("outputs", binary_data=binary),
        tritonhttp.InferRequestedOutput("final_state/gru", binary_data=binary),
    ]
    result = triton.infer("simple", one_step("inputs", x, binary=binary), outputs=outputs)
    expected = v1_predict(server, "simple", x, return_state=True)
    np.testing.assert_allclose(result.as_numpy("outputs"), expected["outputs"], atol=ATOL)
    np.testing.assert_allclose(
        result.as_numpy("final_state/gru"), expected["states"]["gru"], atol=ATOL
    )
    reference, _ = tiny_models["simple"].reference(x)
    np.testing.assert_allclose(result.as_numpy("outputs"), reference[0], atol=ATOL)
    described = {o["name"]: o for o in result.get_response()["outputs"]}
    assert ("parameters" in described["outputs"]) is binary  # binary_data_size, or data
    # no outputs named: every model output, binary (what the client asks for by default);
    # and a gzip-compressed request body
    plain = triton.infer("simple", one_step("inputs", x), request_compression_algorithm="gzip")
    assert [o["name"] for o in plain.get_response()["outputs"]] == ["outputs"]
    np.testing.assert_array_equal(plain.as_numpy("outputs"), result.as_numpy("outputs"))


def test_sequence_one_step_per_request_equals_v1(
    triton: Any, server: str, rng: np.random.Generator
) -> None:
    x = rng.normal(size=(1, STEPS, 3)).astype(np.float32)
    steps = []
    for t in range(STEPS):
        outputs = [tritonhttp.InferRequestedOutput("outputs")]
        if t == STEPS - 1:
            outputs += [
                tritonhttp.InferRequestedOutput(f"final_state/{k}") for k in ("gru_a", "gru_b")
            ]
        result = triton.infer(
            "stacked",
            one_step("inputs", x[:, t : t + 1]),
            outputs=outputs,
            sequence_id=1001,
            sequence_start=t == 0,
            sequence_end=t == STEPS - 1,
        )
        assert result.get_response()["parameters"]["session_id"] == "v2:stacked:1001"
        steps.append(result.as_numpy("outputs"))
        if t == 1:  # the sequence is a v1 session meanwhile
            seen = httpx.get(f"http://{server}/v1/sessions/v2:stacked:1001").json()
            assert (seen["model"], seen["step"], seen["timesteps"]) == ("stacked", 2, 2)
    streamed = np.concatenate(steps, axis=1)
    assert streamed.shape == (1, STEPS, 2)
    np.testing.assert_allclose(streamed[0], v1_session_outputs(server, "stacked", x[0]), atol=ATOL)
    whole = v1_predict(server, "stacked", x, return_state=True)
    np.testing.assert_allclose(streamed, whole["outputs"], atol=ATOL)
    for key in ("gru_a", "gru_b"):
        np.testing.assert_allclose(
            result.as_numpy(f"final_state/{key}"), whole["states"][key], atol=ATOL
        )
    # the end deleted it; continuing without a start is refused, clearly
    assert httpx.get(f"http://{server}/v1/sessions/v2:stacked:1001").status_code == 404
    with pytest.raises(InferenceServerException) as info:
        triton.infer("stacked", one_step("inputs", x[:, :1]), sequence_id=1001)
    assert info.value.status() == "404" and "sequence_start=true" in info.value.message()


def test_async_infer_interleaves_sequences(
    triton: Any, server: str, rng: np.random.Generator
) -> None:
    ids = [11, 12, 13, 14]
    x = rng.normal(size=(len(ids), 10, 3)).astype(np.float32)
    got: dict[int, list[np.ndarray]] = {i: [] for i in ids}
    for t in range(x.shape[1]):  # every round: one step of each sequence in flight at once
        pending = [
            triton.async_infer(
                "simple",
                one_step("inputs", x[n : n + 1, t : t + 1]),
                sequence_id=sid,
                sequence_start=t == 0,
                sequence_end=t == x.shape[1] - 1,
            )
            for n, sid in enumerate(ids)
        ]
        for sid, request in zip(ids, pending, strict=True):
            got[sid].append(request.get_result().as_numpy("outputs"))
    whole = np.asarray(v1_predict(server, "simple", x)["outputs"])
    for n, sid in enumerate(ids):
        np.testing.assert_allclose(np.concatenate(got[sid], axis=1)[0], whole[n], atol=ATOL)


def test_string_sequence_ids(triton: Any, server: str, rng: np.random.Generator) -> None:
    """A string id on a token-id model; ``"7"`` and ``7`` are two sequences."""
    ids = rng.integers(1, 10, size=(1, 6)).astype(np.int64)
    whole = np.asarray(v1_predict(server, "tokens", ids)["outputs"])
    for sequence_id in ("user-7", "7", 7):
        first = triton.infer(
            "tokens",
            one_step("inputs", ids[:, :3], "INT64"),
            sequence_id=sequence_id,
            sequence_start=True,
        )
        np.testing.assert_allclose(first.as_numpy("outputs"), whole[:, :3], atol=ATOL)
    sessions = ["v2:tokens:s:user-7", "v2:tokens:s:7", "v2:tokens:7"]
    for sid in sessions:
        assert httpx.get(f"http://{server}/v1/sessions/{sid}").json()["timesteps"] == 3
    for sequence_id in ("user-7", "7", 7):
        rest = triton.infer(
            "tokens",
            one_step("inputs", ids[:, 3:], "INT64"),
            sequence_id=sequence_id,
            sequence_end=True,
        )
        np.testing.assert_allclose(rest.as_numpy("outputs"), whole[:, 3:], atol=ATOL)
    for sid in sessions:
        assert httpx.get(f"http://{server}/v1/sessions/{sid}").status_code == 404
