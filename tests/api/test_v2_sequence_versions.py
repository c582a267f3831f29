"""A v2 sequence continues on its own version after a rollout, over HTTP and gRPC.

Version 2 of the model takes other inputs (5 features, not 3) and has another state size,
so a later request of a sequence started on version 1 must be checked against version 1's
signature, not the new default's. One real server answers both transports
(api/v2/infer.py is shared); every number is compared with the torch model of the
sequence's version (Keras-exact: tests/parity).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import InferResult  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from conftest import free_port  # noqa: E402
from fixtures import TinyModel, _randomize, export_versions  # noqa: E402
from gruserve.nn import GRU, Dense, InputLayer, Sequential  # noqa: E402
from test_server import BIN, _env, _start, _stop  # noqa: E402

ATOL = 1e-5
NAME = "shift"
SHAPES = {1: (3, 4, 2), 2: (5, 6, 3)}  # version -> (features, GRU units, outputs)


def _build(version: int) -> Sequential:
    features, units, outputs = SHAPES[version]
    model = Sequential(
        [InputLayer((None, features)), GRU(units, return_sequences=True), Dense(outputs)],
        name=NAME,
    )
    _randomize(model, 40 + version)
    return model


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_versions(tmp_path_factory.mktemp("staged"), NAME, _build, list(SHAPES))


class Server:
    def __init__(self, http: str, grpc: str, repo: Path) -> None:
        self.http, self.grpc, self.repo = http, grpc, repo


@pytest.fixture
def server(staged: Path, tmp_path: Path) -> Iterator[Server]:
    repo = tmp_path / "models"
    (repo / NAME).mkdir(parents=True)
    shutil.copytree(staged / NAME / "1", repo / NAME / "1")
    port, grpc_port = free_port(), free_port()
    proc = _start(
        [str(BIN / "gruserve"), "serve", "--port", str(port), "--grpc-port", str(grpc_port)],
        _env(repo),
        port,
        tmp_path,
    )
    try:
        yield Server(f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", repo)
    finally:
        _stop(proc)


def _roll_out(server: Server, staged: Path) -> None:
    """Version 2 copied in (staged, then renamed) and loaded: it becomes the default."""
    tmp = server.repo / NAME / ".incoming-2"
    shutil.copytree(staged / NAME / "2", tmp)
    tmp.rename(server.repo / NAME / "2")
    reply = httpx.post(f"{server.http}/v2/repository/models/{NAME}/load", timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["default_version"] == 2


def _expected(version: int, x: np.ndarray) -> np.ndarray:
    """Outputs (T, outputs) of the version's torch model over ``x`` (T, features)."""
    ref = TinyModel(NAME, _build(version), SHAPES[version][0])
    return ref.reference(x[None])[0][0][0]


def _http_step(server: Server, x: np.ndarray, **sequence: object) -> httpx.Response:
    body = {
        "inputs": [
            {
                "name": "inputs",
                "datatype": "FP32",
                "shape": [1, *x.shape],
                "data": x.ravel().tolist(),
            }
        ],
        "parameters": {"sequence_id": "h", **sequence},
    }
    return httpx.post(f"{server.http}/v2/models/{NAME}/infer", json=body, timeout=30)


def test_http_sequence_keeps_its_version_inputs(server: Server, staged: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 3)).astype(np.float32)
    first = _http_step(server, x[:2], sequence_start=True)
    assert first.status_code == 200, first.text
    _roll_out(server, staged)
    later = _http_step(server, x[2:])  # 3 features: version 1's inputs, not the default's
    assert later.status_code == 200, later.text
    assert later.json()["model_version"] == "1"
    got = [np.asarray(r.json()["outputs"][0]["data"]).reshape(-1, 2) for r in (first, later)]
    np.testing.assert_allclose(np.concatenate(got), _expected(1, x), atol=ATOL)
    # version 2's inputs are refused for it, naming the tensor; the sequence is unchanged
    wrong = _http_step(server, np.ones((1, 5), np.float32))
    assert wrong.status_code == 422, wrong.text
    assert wrong.json()["error"].startswith("inputs[0].shape: ")
    assert "[-1, -1, 3]" in wrong.json()["error"]
    # a new sequence starts on the default, version 2, with its inputs
    y = rng.normal(size=(3, 5)).astype(np.float32)
    new = _http_step(server, y, sequence_start=True, sequence_end=True)
    assert new.status_code == 200 and new.json()["model_version"] == "2"
    got_new = np.asarray(new.json()["outputs"][0]["data"]).reshape(-1, 3)
    np.testing.assert_allclose(got_new, _expected(2, y), atol=ATOL)


def test_grpc_sequence_keeps_its_version_inputs(server: Server, staged: Path) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 5, 3)).astype(np.float32)

    def step(chunk: np.ndarray, **flags: object) -> InferResult:
        given = grpcclient.InferInput("inputs", list(chunk.shape), "FP32")
        given.set_data_from_numpy(chunk)
        return triton.infer(NAME, [given], sequence_id="g", **flags)

    triton = grpcclient.InferenceServerClient(server.grpc)
    try:
        first = step(x[:, :3], sequence_start=True)
        _roll_out(server, staged)
        later = step(x[:, 3:], sequence_end=True)
        assert later.get_response().model_version == "1"
        got = np.concatenate([first.as_numpy("outputs"), later.as_numpy("outputs")], axis=1)
        np.testing.assert_allclose(got[0], _expected(1, x[0]), atol=ATOL)
        step(x[:, :1], sequence_start=True, model_version="1")  # a start on version 1
        with pytest.raises(InferenceServerException) as refused:
            step(np.ones((1, 1, 5), np.float32))  # version 2's width for a version 1 sequence
        assert str(refused.value.status()) == "StatusCode.INVALID_ARGUMENT"
        assert "inputs" in str(refused.value)
    finally:
        triton.close()
