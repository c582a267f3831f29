"""Moving sessions between model versions: ``POST /v1/sessions/{id}/upgrade`` and
``GRUSERVE_SESSION_ON_VERSION_GONE``, through the production app on both stores.

Two versions of one tiny model with different seeded weights are exported by the
production exporter. Every number a server returns after a move is compared with the
torch model of version 2 (Keras-exact: tests/parity) run by hand over the inputs the
test sent: from zero state without replay, over the last W inputs with ``replay: W``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import Served, serve
from fixtures import FEATURES, TinyModel, _randomize, export_versions
from gruserve.nn import GRU, Dense, InputLayer, Sequential
from gruserve.sessions import history

ATOL = 1e-5
NAME = "mover"
KEPT = 16


def _build(seed: int) -> Sequential:
    model = Sequential(
        [InputLayer((None, FEATURES)), GRU(5, return_sequences=True), Dense(2)], name=NAME
    )
    _randomize(model, seed)
    return model


@pytest.fixture(scope="module")
def versions_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_versions(tmp_path_factory.mktemp("mover"), NAME, lambda v: _build(40 + v), (1, 2))


@pytest.fixture(scope="module")
def v2() -> TinyModel:
    return TinyModel(NAME, _build(42), FEATURES)


def _repo(tmp_path: Path, versions_dir: Path, versions: tuple[int, ...]) -> Path:
    for version in versions:
        shutil.copytree(versions_dir / NAME / str(version), tmp_path / NAME / str(version))
    return tmp_path


@pytest.fixture
async def served(tmp_path: Path, versions_dir: Path, store_url: str) -> AsyncIterator[Served]:
    """Both versions on disk (2 the default) and ``KEPT`` timesteps of history."""
    repo = _repo(tmp_path, versions_dir, (1, 2))
    async for s in serve(repo, store_url, session_history=KEPT):
        yield s


def _after(ref: TinyModel, kept: list[np.ndarray], x: np.ndarray, mask: Any = None) -> np.ndarray:
    """Version 2's outputs for ``x`` after running over ``kept`` from zero state."""
    seq = np.concatenate([*kept, x]) if kept else x
    m = None if mask is None else np.asarray(mask, bool)[None]
    return ref.reference(seq[None], mask=m)[0][0][0][-x.shape[0] :]


async def _stream(client: httpx.AsyncClient, sid: str, chunks: list[np.ndarray]) -> None:
    r = await client.post(f"/v1/models/{NAME}/sessions", json={"session_id": sid, "version": 1})
    assert r.status_code == 201, r.text
    for x in chunks:
        r = await client.post(f"/v1/sessions/{sid}/step", json={"inputs": x.tolist()})
        assert r.status_code == 200 and r.json()["version"] == 1, r.text


async def _step(client: httpx.AsyncClient, sid: str, x: np.ndarray) -> dict[str, Any]:
    r = await client.post(f"/v1/sessions/{sid}/step", json={"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    return dict(r.json())


def _chunks(seed: int, count: int, timesteps: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(timesteps, FEATURES)).astype(np.float32) for _ in range(count)]


@pytest.mark.parametrize("replay", [None, 0, 5, KEPT])
async def test_upgrade_equals_version_2_over_the_kept_inputs(
    served: Served, v2: TinyModel, replay: int | None
) -> None:
    client = served.client
    chunks = _chunks(1, 7)  # 21 timesteps: more than the KEPT 16
    await _stream(client, "s", chunks)
    body = {} if replay is None else {"replay": replay}
    r = await client.post("/v1/sessions/s/upgrade", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "session_id": "s",
        "model": NAME,
        "old_version": 1,
        "version": 2,
        "step": 7,
        "replayed": replay or 0,
    }
    x = np.linspace(-1, 1, 4 * FEATURES, dtype=np.float32).reshape(4, FEATURES)
    got = await _step(client, "s", x)
    assert (got["version"], got["step"]) == (2, 8)
    sent = np.concatenate(chunks)
    kept = [sent[len(sent) - replay :]] if replay else []
    np.testing.assert_allclose(got["outputs"], _after(v2, kept, x), atol=ATOL)


async def test_history_is_bounded_and_masks_are_kept(served: Served, v2: TinyModel) -> None:
    client = served.client
    chunks = _chunks(2, 6)
    await _stream(client, "m", chunks[:5])
    mask = [True, False, True]
    r = await client.post("/v1/sessions/m/step", json={"inputs": chunks[5].tolist(), "mask": mask})
    assert r.status_code == 200, r.text
    record = await served.services.store.get("m")
    kept = history.read(record.history)
    sent = np.concatenate(chunks)
    np.testing.assert_array_equal(kept.inputs, sent[-KEPT:])
    assert kept.mask is not None and kept.mask.tolist() == [True] * (KEPT - 3) + mask
    r = await client.post("/v1/sessions/m/upgrade", json={"replay": KEPT + 1})
    assert r.status_code == 422 and r.json()["error"]["field"] == "replay"
    assert f"keeps its last {KEPT} timesteps" in r.json()["error"]["message"]
    r = await client.post("/v1/sessions/m/upgrade", json={"version": 2, "replay": 9})
    assert r.status_code == 200 and r.json()["replayed"] == 9
    x = np.ones((2, FEATURES), np.float32)
    got = await _step(client, "m", x)
    full_mask = [True] * 6 + mask + [True, True]
    np.testing.assert_allclose(got["outputs"], _after(v2, [sent[-9:]], x, full_mask), atol=ATOL)
    # a reset forgets the kept inputs: nothing to replay
    assert (await client.post("/v1/sessions/m/reset")).status_code == 200
    assert (await served.services.store.get("m")).history is None
    r = await client.post("/v1/sessions/m/upgrade", json={"replay": 1})
    assert r.status_code == 422 and "keeps its last 0 timesteps" in r.json()["error"]["message"]


async def test_bulk_steps_keep_history(served: Served) -> None:
    """The bulk batch path (sessions on the default version) keeps inputs as steps do."""
    client = served.client
    r = await client.post(f"/v1/models/{NAME}/sessions", json={"session_id": "b"})
    assert r.status_code == 201 and r.json()["version"] == 2
    x = _chunks(3, 2)
    for chunk in x:
        r = await client.post(
            f"/v1/models/{NAME}/steps",
            json={"steps": [{"session_id": "b", "inputs": chunk.tolist()}]},
        )
        assert r.status_code == 200 and "error" not in r.json()["results"][0], r.text
    kept = history.read((await served.services.store.get("b")).history)
    np.testing.assert_array_equal(kept.inputs, np.concatenate(x))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"version": 9}, "version"),
        ({"version": 0}, "version"),
        ({"version": -1}, "version"),
        ({"version": "2"}, "version"),
        ({"replay": -1}, "replay"),
        ({"replay": "3"}, "replay"),
        ({"replay": True}, "replay"),
        ({"replay": 4}, "replay"),  # more than the 3 timesteps kept
        ({"versions": 2}, "versions"),
    ],
)
async def test_bad_upgrades_name_the_field(
    served: Served, body: dict[str, Any], field: str
) -> None:
    await _stream(served.client, "bad", _chunks(4, 1))
    r = await served.client.post("/v1/sessions/bad/upgrade", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field
    info = (await served.client.get("/v1/sessions/bad")).json()
    assert (info["version"], info["step"]) == (1, 1)  # nothing moved


async def test_upgrade_of_unknown_or_foreign_sessions_is_404(
    tmp_path: Path, versions_dir: Path
) -> None:
    repo = _repo(tmp_path, versions_dir, (1, 2))
    async for s in serve(repo, api_keys="acme:key-a,other:key-b", session_history=4):
        acme = {"Authorization": "Bearer key-a"}
        other = {"Authorization": "Bearer key-b"}
        r = await s.client.post("/v1/sessions/ghost/upgrade", json={}, headers=acme)
        assert r.status_code == 404
        r = await s.client.post(
            f"/v1/models/{NAME}/sessions", json={"session_id": "mine"}, headers=acme
        )
        assert r.status_code == 201
        r = await s.client.post("/v1/sessions/mine/upgrade", json={}, headers=other)
        assert r.status_code == 404
        r = await s.client.post("/v1/sessions/mine/upgrade", json={}, headers=acme)
        assert r.status_code == 200 and r.json()["session_id"] == "mine"  # never the store key
        # the other tenant's own "mine" is another session, upgraded on its own
        r = await s.client.post(
            f"/v1/models/{NAME}/sessions", json={"session_id": "mine", "version": 1}, headers=other
        )
        assert r.status_code == 201
        r = await s.client.post("/v1/sessions/mine/upgrade", json={"version": 2}, headers=other)
        assert r.status_code == 200
        assert (r.json()["session_id"], r.json()["old_version"], r.json()["version"]) == (
            "mine",
            1,
            2,
        )


async def test_without_history_nothing_is_kept(tmp_path: Path, versions_dir: Path) -> None:
    repo = _repo(tmp_path, versions_dir, (1, 2))
    async for s in serve(repo):
        await _stream(s.client, "plain", _chunks(5, 2))
        assert (await s.services.store.get("plain")).history is None
        r = await s.client.post("/v1/sessions/plain/upgrade", json={"replay": 1})
        assert r.status_code == 422 and r.json()["error"]["field"] == "replay"
        assert "GRUSERVE_SESSION_HISTORY=0" in r.json()["error"]["message"]
        r = await s.client.post("/v1/sessions/plain/upgrade", json={"version": 1})
        assert r.status_code == 200 and r.json()["version"] == 1


@pytest.mark.parametrize("policy", ["fail", "reset", "upgrade"])
async def test_a_removed_version_fails_resets_or_upgrades(
    tmp_path: Path, versions_dir: Path, v2: TinyModel, store_url: str, policy: str
) -> None:
    repo = _repo(tmp_path, versions_dir, (1,))
    async for s in serve(repo, store_url, session_history=64, session_on_version_gone=policy):
        client = s.client
        chunks = _chunks(6, 4)
        paths = ("rest", "bulk", "v2")  # one orphan per step path
        for path in paths[:2]:
            await _stream(client, path, chunks)
        for i, x in enumerate(chunks):  # a v2 sequence started on version 1
            r = await client.post(
                f"/v2/models/{NAME}/versions/1/infer",
                json={**_v2_body(x), "parameters": {"sequence_id": "v2", "sequence_start": i == 0}},
            )
            assert r.status_code == 200 and r.json()["model_version"] == "1", r.text
        _repo(tmp_path, versions_dir, (2,))
        shutil.rmtree(repo / NAME / "1")
        assert (await client.post(f"/v2/repository/models/{NAME}/load")).status_code == 200
        x = np.full((2, FEATURES), 0.5, np.float32)
        kept = [np.concatenate(chunks)] if policy == "upgrade" else []
        for path in paths:
            status, version, outputs, message = await _orphan_step(client, path, x)
            if policy == "fail":
                assert status == 410 and "removed from the model repository" in message
                assert path in message
                continue
            assert (status, version) == (200, 2), message
            assert outputs is not None
            np.testing.assert_allclose(outputs, _after(v2, kept, x), atol=ATOL)
            if path != "v2":  # (a v2 sequence's session id is scoped: not this one)
                info = (await client.get(f"/v1/sessions/{path}")).json()
                assert (info["version"], info["step"]) == (2, 5)  # the step count continued


def _v2_body(x: np.ndarray) -> dict[str, Any]:
    tensor = {"name": "inputs", "datatype": "FP32", "shape": [1, *x.shape]}
    return {"inputs": [{**tensor, "data": x.ravel().tolist()}]}


async def _orphan_step(
    client: httpx.AsyncClient, path: str, x: np.ndarray
) -> tuple[int, int | None, np.ndarray | None, str]:
    """One step of session ``path`` through that step path: status, version, outputs, text."""
    if path == "rest":
        r = await client.post("/v1/sessions/rest/step", json={"inputs": x.tolist()})
        body = r.json()
        if r.status_code != 200:
            return r.status_code, None, None, r.text
        return 200, body["version"], np.asarray(body["outputs"]), r.text
    if path == "bulk":
        r = await client.post(
            f"/v1/models/{NAME}/steps",
            json={"steps": [{"session_id": "bulk", "inputs": x.tolist()}]},
        )
        result = r.json()["results"][0]
        if "error" in result:
            return 410 if result["error"]["type"] == "ModelVersionGone" else 500, None, None, r.text
        return 200, result["version"], np.asarray(result["outputs"]), r.text
    r = await client.post(
        f"/v2/models/{NAME}/infer", json={**_v2_body(x), "parameters": {"sequence_id": "v2"}}
    )
    if r.status_code != 200:
        return r.status_code, None, None, r.text
    got = np.asarray(r.json()["outputs"][0]["data"]).reshape(x.shape[0], -1)
    return 200, int(r.json()["model_version"]), got, r.text


def test_history_survives_on_redis_across_two_server_processes(
    tmp_path: Path, versions_dir: Path, v2: TinyModel, redis_url: str
) -> None:
    """Inputs kept by one ``gruserve serve`` are replayed by another one after it stopped."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
    from deploy_helpers import free_port, server_env, start_server, stop, wait_ready

    repo = _repo(tmp_path / "repo", versions_dir, (1, 2))
    env = server_env(redis_url, GRUSERVE_SESSION_HISTORY="32")
    env["GRUSERVE_MODELS_DIR"] = str(repo)
    chunks = _chunks(7, 3)
    for turn in ("first", "second"):
        port = free_port()
        proc = start_server(port, env, tmp_path)
        try:
            wait_ready(proc, port)
            url = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=url, timeout=30) as client:
                if turn == "first":
                    r = client.post(
                        f"/v1/models/{NAME}/sessions", json={"session_id": "kept", "version": 1}
                    )
                    assert r.status_code == 201, r.text
                    for x in chunks:
                        r = client.post("/v1/sessions/kept/step", json={"inputs": x.tolist()})
                        assert r.status_code == 200, r.text
                    continue
                r = client.post("/v1/sessions/kept/upgrade", json={"replay": 9})
                assert r.status_code == 200, r.text
                assert (r.json()["old_version"], r.json()["version"]) == (1, 2)
                x = np.ones((2, FEATURES), np.float32)
                r = client.post("/v1/sessions/kept/step", json={"inputs": x.tolist()})
                assert r.status_code == 200 and r.json()["step"] == 4, r.text
                expected = _after(v2, [np.concatenate(chunks)], x)
                np.testing.assert_allclose(r.json()["outputs"], expected, atol=ATOL)
        finally:
            output = stop(proc)
        assert "Traceback" not in output, output


async def test_the_python_clients_upgrade(served: Served, v2: TinyModel) -> None:
    """``Client.upgrade`` / ``AsyncClient.upgrade`` (and their sessions') against uvicorn."""
    from conftest import live_server
    from gruserve.client import AsyncClient, Client, InvalidInput

    chunks = _chunks(8, 2)
    for sid in ("sync", "async"):
        await _stream(served.client, sid, chunks)
    async for address in live_server(served.app):
        url = f"http://{address}"

        def sync_calls(url: str) -> dict[str, Any]:
            with Client(url) as client:
                with pytest.raises(InvalidInput, match="replay"):
                    client.upgrade("sync", replay=99)
                session = client.session("sync")
                answer = session.upgrade(replay=6)
                assert (session.version, session.step_number) == (2, 2)
                return answer

        answer = await asyncio.to_thread(sync_calls, url)
        assert answer["replayed"] == 6 and answer["old_version"] == 1
        async with AsyncClient(url) as client:
            answer = await client.upgrade("async", version=2)
            assert (answer["version"], answer["replayed"]) == (2, 0)
            session = await client.session("async")
            back = await session.upgrade(version=1, replay=3)
            assert (back["old_version"], session.version) == (2, 1)
    x = np.ones((1, FEATURES), np.float32)
    got = await _step(served.client, "sync", x)
    np.testing.assert_allclose(got["outputs"], _after(v2, [np.concatenate(chunks)], x), atol=ATOL)


async def _steps_into(
    client: httpx.AsyncClient, sid: str, chunks: list[np.ndarray], replies: list[dict[str, Any]]
) -> None:
    for x in chunks:
        replies.append(await _step(client, sid, x))


async def test_an_upgrade_racing_steps_on_another_replica_loses_no_step(
    tmp_path: Path, versions_dir: Path, v2: TinyModel, redis_url: str
) -> None:
    """Replica A steps a session without pause while replica B upgrades it (replay 4): every
    step is applied once, on version 1 up to the upgrade's step and on version 2 after it,
    and version 2's numbers continue from the state replayed over the 4 timesteps before."""
    repo = _repo(tmp_path, versions_dir, (1, 2))
    chunks = _chunks(9, 60, timesteps=2)
    replies: list[dict[str, Any]] = []
    async for a in serve(repo, redis_url, session_history=8):
        async for b in serve(repo, redis_url, session_history=8):
            await _stream(a.client, "raced", [])
            stepping = asyncio.create_task(_steps_into(a.client, "raced", chunks, replies))
            while len(replies) < 3 and not stepping.done():
                await asyncio.sleep(0.005)
            for _ in range(100):  # a SessionConflict (every attempt lost a race) is retried
                r = await b.client.post("/v1/sessions/raced/upgrade", json={"replay": 4})
                if r.status_code != 409:
                    break
            await stepping
    assert r.status_code == 200, r.text
    at = r.json()["step"]
    assert [reply["step"] for reply in replies] == list(range(1, 61))
    assert [reply["version"] for reply in replies] == [1] * at + [2] * (60 - at)
    sent = np.concatenate(chunks[:at])
    later = [np.concatenate(chunks[at:])] if at < 60 else []
    if later:
        got = np.concatenate([np.asarray(reply["outputs"]) for reply in replies[at:]])
        np.testing.assert_allclose(got, _after(v2, [sent[-4:]], later[0]), atol=ATOL)


def _keras_version_2(versions_dir: Path, tmp_path: Path) -> Any:
    """Version 2 as the ``keras`` package loads it: its manifest's config and the graph's
    weights written to a .keras file (``gruserve export-keras``)."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras
    import onnx

    from gruserve.keras_io.writer import onnx_weights, spec_of_manifest, write_keras_file
    from gruserve.manifest import Manifest

    folder = versions_dir / NAME / "2"
    manifest = Manifest.read(folder / "model.json")
    spec = spec_of_manifest(manifest)
    out = tmp_path / "v2.keras"
    write_keras_file(spec, onnx_weights(onnx.load(str(folder / manifest.onnx_file)), spec), out)
    return keras.saving.load_model(out)


async def test_upgrade_with_replay_equals_keras_on_version_2(
    tmp_path: Path, versions_dir: Path
) -> None:
    model = _keras_version_2(versions_dir, tmp_path)
    chunks = _chunks(10, 5)
    x = np.linspace(1, -1, 3 * FEATURES, dtype=np.float32).reshape(3, FEATURES)
    async for s in serve(_repo(tmp_path / "repo", versions_dir, (1, 2)), session_history=KEPT):
        await _stream(s.client, "k", chunks)
        r = await s.client.post("/v1/sessions/k/upgrade", json={"replay": 12})
        assert r.status_code == 200, r.text
        got = (await _step(s.client, "k", x))["outputs"]
    seq = np.concatenate([np.concatenate(chunks)[-12:], x])[None]
    expected = np.asarray(model.predict(seq, verbose=0))[0, -3:]
    np.testing.assert_allclose(got, expected, atol=ATOL)


async def test_every_transport_keeps_history(served: Served) -> None:
    """The REST step answered by the HTTP protocol itself, NDJSON and WebSocket (binary)
    steps all keep their inputs: history is recorded where a record advances."""
    from websockets.asyncio.client import connect

    from conftest import live_server

    x = _chunks(11, 3)
    await _stream(served.client, "paths", [])
    async for address in live_server(served.app):
        async with httpx.AsyncClient(base_url=f"http://{address}") as real:
            r = await real.post("/v1/sessions/paths/step", json={"inputs": x[0].tolist()})
            assert r.status_code == 200, r.text
            r = await real.post(
                "/v1/sessions/paths/stream", content=json.dumps({"inputs": x[1].tolist()}) + "\n"
            )
            assert r.status_code == 200 and '"step":2' in r.text, r.text
        async with connect(f"ws://{address}/v1/sessions/paths/ws") as ws:
            await ws.send(x[2].astype("<f4").tobytes())
            assert isinstance(await ws.recv(), bytes)
    kept = history.read((await served.services.store.get("paths")).history)
    np.testing.assert_array_equal(kept.inputs, np.concatenate(x))
