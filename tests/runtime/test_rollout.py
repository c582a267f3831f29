"""Live rollout through the production app: several versions at once, load before switch.

Two versions of one tiny model with different (seeded) weights are exported by the
production exporter; every number a server returns is compared with the torch model of
the version the session is on (the models are Keras-exact: tests/parity).
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import Served, serve
from fixtures import FEATURES, TinyModel, _randomize, export_versions
from gruserve.nn import GRU, Dense, InputLayer, Sequential
from gruserve.runtime.policy import VersionPolicy

ATOL = 1e-5
NAME = "roll"


def _build(seed: int) -> Sequential:
    model = Sequential(
        [
            InputLayer((None, FEATURES)),
            GRU(4, return_sequences=True, name="gru"),
            Dense(2, name="head"),
        ],
        name=NAME,
    )
    _randomize(model, seed)
    return model


@pytest.fixture(scope="module")
def versions_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``staging/roll/{1,2}``: two versions of one model, different weights."""
    return export_versions(
        tmp_path_factory.mktemp("versions"), NAME, lambda v: _build(10 + v), (1, 2)
    )


@pytest.fixture(scope="module")
def references() -> dict[int, TinyModel]:
    return {v: TinyModel(NAME, _build(10 + v), FEATURES) for v in (1, 2)}


def _add(versions_dir: Path, repo: Path, version: int) -> None:
    """Copy a version in as a deployment would: staged under a hidden name, then renamed
    (a version folder appears whole or not at all)."""
    staging = repo / NAME / f".staging-{version}"
    shutil.copytree(versions_dir / NAME / str(version), staging)
    staging.rename(repo / NAME / str(version))


@pytest.fixture
def repo(tmp_path: Path, versions_dir: Path) -> Path:
    (tmp_path / NAME).mkdir()
    _add(versions_dir, tmp_path, 1)
    return tmp_path


@pytest.fixture
async def served(repo: Path) -> AsyncIterator[Served]:
    async for s in serve(repo, version_unload_grace_s=0.2):
        yield s


def _expected(ref: TinyModel, inputs: list[np.ndarray]) -> np.ndarray:
    x = np.concatenate(inputs)[None]
    return ref.reference(x)[0][0][0]


async def _index(client: httpx.AsyncClient) -> dict[int, dict[str, Any]]:
    r = await client.post("/v2/repository/index")
    assert r.status_code == 200, r.text
    return {int(e["version"]): e for e in r.json() if e["name"] == NAME}


class Stream:
    """A session stepped again and again, keeping what it sent and received."""

    def __init__(self, session_id: str, version: int) -> None:
        self.session_id, self.version = session_id, version
        self.inputs: list[np.ndarray] = []
        self.outputs: list[np.ndarray] = []
        self.failures: list[str] = []

    async def run(self, client: httpx.AsyncClient, stop: asyncio.Event, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            x = rng.normal(size=(2, FEATURES)).astype(np.float32)
            r = await client.post(
                f"/v1/sessions/{self.session_id}/step", json={"inputs": x.tolist()}
            )
            if r.status_code != 200:
                self.failures.append(r.text)
                return
            body = r.json()
            assert body["version"] == self.version
            self.inputs.append(x)
            self.outputs.append(np.asarray(body["outputs"], np.float32))


async def _create(client: httpx.AsyncClient, session_id: str, **extra: Any) -> dict[str, Any]:
    r = await client.post(f"/v1/models/{NAME}/sessions", json={"session_id": session_id, **extra})
    assert r.status_code == 201, r.text
    return dict(r.json())


async def test_new_version_loads_while_sessions_stream(
    served: Served, repo: Path, versions_dir: Path, references: dict[int, TinyModel]
) -> None:
    client = served.client
    old = [Stream(f"old-{i}", 1) for i in range(32)]
    for s in old:
        assert (await _create(client, s.session_id))["version"] == 1
    stop = asyncio.Event()
    running = [asyncio.create_task(s.run(client, stop, i)) for i, s in enumerate(old)]
    while min(len(s.outputs) for s in old) < 2:  # every stream under way
        await asyncio.sleep(0.01)

    _add(versions_dir, repo, 2)
    r = await client.post(f"/v2/repository/models/{NAME}/load")
    assert r.status_code == 200, r.text
    assert r.json()["default_version"] == 2
    new = [Stream(f"new-{i}", 2) for i in range(4)]
    for s in new:
        assert (await _create(client, s.session_id))["version"] == 2
    running += [asyncio.create_task(s.run(client, stop, 100 + i)) for i, s in enumerate(new)]
    while min(len(s.outputs) for s in new) < 3:
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.gather(*running)

    assert [f for s in old + new for f in s.failures] == []
    for s in old + new:
        got = np.concatenate(s.outputs)
        np.testing.assert_allclose(got, _expected(references[s.version], s.inputs), atol=ATOL)
    info = (await client.get("/v1/sessions/old-0")).json()
    assert (info["version"], info["step"]) == (1, len(old[0].outputs))
    index = await _index(client)
    assert (index[1]["state"], index[2]["state"]) == ("READY", "READY")
    assert (index[1]["default"], index[2]["default"]) == (False, True)
    metrics = (await client.get("/metrics")).text
    assert f'gruserve_model_version_sessions{{model="{NAME}",version="1"}} 32.0' in metrics
    assert f'gruserve_model_version_bytes{{model="{NAME}",version="2"}}' in metrics

    # once version 1 has no sessions stepping, it is unloaded after the grace period
    for s in old:
        assert (await client.delete(f"/v1/sessions/{s.session_id}")).status_code == 204
    for _ in range(400):
        if (await _index(client))[1]["state"] != "READY":
            break
        await asyncio.sleep(0.05)
    index = await _index(client)
    assert index[1]["state"] == "UNAVAILABLE" and "loads on first use" in index[1]["reason"]
    assert index[2]["state"] == "READY"
    # ... and still serves a session created on it, loading it again
    await _create(client, "late", version=1)
    x = np.ones((3, FEATURES), np.float32)
    r = await client.post("/v1/sessions/late/step", json={"inputs": x.tolist()})
    assert r.status_code == 200 and r.json()["version"] == 1
    np.testing.assert_allclose(r.json()["outputs"], _expected(references[1], [x]), atol=ATOL)


def _corrupt(repo: Path, versions_dir: Path, how: str) -> None:
    _add(versions_dir, repo, 2)
    folder = repo / NAME / "2"
    onnx = folder / "model.onnx"
    if how == "sha256":
        onnx.write_bytes(onnx.read_bytes()[:-1] + b"\x00")
        return
    junk = b"not an onnx graph"
    onnx.write_bytes(junk)
    manifest = folder / "model.json"
    text = manifest.read_text()
    old = text.split('"onnx_sha256": "')[1].split('"')[0]
    manifest.write_text(text.replace(old, hashlib.sha256(junk).hexdigest()))


@pytest.mark.parametrize(("how", "reason"), [("sha256", "sha256"), ("graph", "Fail")])
async def test_a_broken_version_never_takes_traffic(
    served: Served,
    repo: Path,
    versions_dir: Path,
    references: dict[int, TinyModel],
    how: str,
    reason: str,
) -> None:
    client = served.client
    await _create(client, "before")
    _corrupt(repo, versions_dir, how)
    r = await client.post(f"/v2/repository/models/{NAME}/load")
    assert r.status_code == 200 and r.json()["default_version"] == 1
    index = await _index(client)
    assert index[1]["state"] == "READY" and index[1]["default"]
    assert index[2]["state"] == "UNAVAILABLE" and reason in index[2]["reason"]
    assert (await _create(client, "after"))["version"] == 1
    x = np.ones((2, FEATURES), np.float32)
    for sid in ("before", "after"):
        r = await client.post(f"/v1/sessions/{sid}/step", json={"inputs": x.tolist()})
        assert r.status_code == 200
        np.testing.assert_allclose(r.json()["outputs"], _expected(references[1], [x]), atol=ATOL)
    r = await client.post(f"/v1/models/{NAME}/sessions", json={"version": 2})
    assert r.status_code == 503 and "version 2" in r.json()["error"]["message"]
    metrics = (await client.get("/metrics")).text
    assert f'gruserve_model_version_load_failures_total{{model="{NAME}"}} 1.0' in metrics


async def test_polling_finds_new_versions(
    repo: Path, versions_dir: Path, references: dict[int, TinyModel]
) -> None:
    async for s in serve(repo, repository_poll_s=0.05):
        await _create(s.client, "first")
        _add(versions_dir, repo, 2)
        for _ in range(400):
            if s.services.registry.default_version(NAME) == 2:
                break
            await asyncio.sleep(0.05)
        assert (await _create(s.client, "second"))["version"] == 2
        assert (await s.client.get("/v1/sessions/first")).json()["version"] == 1


async def test_versions_on_the_v2_paths(
    served: Served, repo: Path, versions_dir: Path, references: dict[int, TinyModel]
) -> None:
    client = served.client
    _add(versions_dir, repo, 2)
    assert (await client.post(f"/v2/repository/models/{NAME}/load")).status_code == 200
    x = np.ones((1, 3, FEATURES), np.float32)
    tensor = {"name": "inputs", "datatype": "FP32", "shape": [1, 3, FEATURES]}
    body = {"inputs": [{**tensor, "data": x.ravel().tolist()}]}
    for version, path in ((1, f"/v2/models/{NAME}/versions/1"), (2, f"/v2/models/{NAME}")):
        seq = {"sequence_id": f"s{version}", "sequence_start": True}
        r = await client.post(f"{path}/infer", json={**body, "parameters": seq})
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == str(version)
        got = np.asarray(r.json()["outputs"][0]["data"]).reshape(3, 2)
        np.testing.assert_allclose(got, _expected(references[version], [x[0]]), atol=ATOL)
        # the sequence continues on its version through the unversioned path
        r = await client.post(
            f"/v2/models/{NAME}/infer", json={**body, "parameters": {"sequence_id": f"s{version}"}}
        )
        assert r.json()["model_version"] == str(version)
        # stateless inference on that version too
        r = await client.post(f"{path}/infer", json=body)
        got = np.asarray(r.json()["outputs"][0]["data"]).reshape(3, 2)
        np.testing.assert_allclose(got, _expected(references[version], [x[0]]), atol=ATOL)
    assert (await client.get(f"/v2/models/{NAME}/versions/7/ready")).status_code == 404


async def test_removed_version_answers_410(served: Served, repo: Path, versions_dir: Path) -> None:
    client = served.client
    await _create(client, "orphan")
    _add(versions_dir, repo, 2)
    shutil.rmtree(repo / NAME / "1")
    assert (await client.post(f"/v2/repository/models/{NAME}/load")).status_code == 200
    r = await client.post("/v1/sessions/orphan/step", json={"inputs": [[0.0] * FEATURES]})
    assert r.status_code == 410
    assert r.json()["error"]["type"] == "ModelVersionGone"
    message = r.json()["error"]["message"]
    assert "'orphan'" in message and f"{NAME!r} version 1" in message and "[2]" in message
    assert (await _index(client))[1]["reason"] == "removed from the repository"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"version": 9}, "version"),
        ({"version": "1"}, "version"),
        ({"version": 0}, "version"),
        ({"version": True}, "version"),
    ],
)
async def test_bad_versions_name_the_field(
    served: Served, body: dict[str, Any], field: str
) -> None:
    r = await served.client.post(f"/v1/models/{NAME}/sessions", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field


async def test_repository_api_errors(served: Served) -> None:
    client = served.client
    assert (await client.post("/v2/repository/models/ghost/load")).status_code == 404
    assert (await client.post("/v2/repository/models/..bad/load")).status_code == 422
    r = await client.post("/v2/repository/index", json={"ready": "yes"})
    assert r.status_code == 422 and r.json()["error"].startswith("ready: ")
    assert (await client.post(f"/v2/repository/models/{NAME}/unload")).status_code == 200
    r = await client.post(f"/v1/models/{NAME}/sessions", json={})
    assert r.status_code == 503
    assert (await _index(client))[1]["state"] == "UNAVAILABLE"
    assert (await client.post(f"/v2/repository/models/{NAME}/load")).status_code == 200
    assert (await client.post(f"/v1/models/{NAME}/sessions", json={})).status_code == 201
    ready = (await client.post("/v2/repository/index", json={"ready": True})).json()
    assert [(e["name"], e["version"], e["state"]) for e in ready] == [(NAME, "1", "READY")]


def test_version_policy() -> None:
    assert VersionPolicy.parse("latest: 2").kept([1, 2, 3]) == [2, 3]
    assert VersionPolicy.parse("specific: [3, 1]").kept([1, 2, 3]) == [1, 3]
    assert VersionPolicy.parse("all").kept([1, 2]) == [1, 2]
    for bad in ("latest: 0", "specific: []", "specific: [x]", "newest"):
        with pytest.raises(ValueError, match="latest: N"):
            VersionPolicy.parse(bad)
