"""Sessions over REST on both session stores: lifecycle, Keras-stateful semantics, order, limits.

Every numeric expectation comes from the torch model the served ONNX file was
exported from (tests/fixtures.py), or from the server's own stateless predict.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import past, serve
from gruserve.api.v1.schemas import SessionInfo, SessionList, StepResponse

ATOL = 1e-5


async def create(client: httpx.AsyncClient, model: str, **body: Any) -> dict[str, Any]:
    r = await client.post(f"/v1/models/{model}/sessions", json=body)
    assert r.status_code == 201, r.text
    SessionInfo.model_validate(r.json())
    return dict(r.json())


async def step(
    client: httpx.AsyncClient, sid: str, inputs: Any, mask: Any = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": np.asarray(inputs).tolist()}
    if mask is not None:
        body["mask"] = np.asarray(mask).tolist()
    r = await client.post(f"/v1/sessions/{sid}/step", json=body)
    assert r.status_code == 200, r.text
    StepResponse.model_validate(r.json())
    return dict(r.json())


async def states(client: httpx.AsyncClient, sid: str) -> dict[str, np.ndarray]:
    r = await client.get(f"/v1/sessions/{sid}", params={"include_state": "true"})
    assert r.status_code == 200, r.text
    return {k: np.asarray(v, np.float32) for k, v in r.json()["states"].items()}


def chunks(total: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, total)) for i in range(0, total, size)]


# -- lifecycle ---------------------------------------------------------------------------------
async def test_session_lifecycle(client: httpx.AsyncClient) -> None:
    info = await create(client, "simple", session_id="user-1")
    assert (info["session_id"], info["model"], info["version"], info["step"]) == (
        "user-1",
        "simple",
        1,
        0,
    )
    # the same create again (a resend after a lost reply, or after a 503) is the first one
    r = await client.post("/v1/models/simple/sessions", json={"session_id": "user-1"})
    assert r.status_code == 201 and r.json() == info, r.text
    # another initial state is another session: the id is taken
    other = {name: np.ones_like(v).tolist() for name, v in (await states(client, "user-1")).items()}
    r = await client.post(
        "/v1/models/simple/sessions", json={"session_id": "user-1", "initial_state": other}
    )
    assert r.status_code == 409 and r.json()["error"]["type"] == "SessionExists"
    assert "user-1" in r.json()["error"]["message"]

    reply = await step(client, "user-1", [[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    # stepped: the same create now names a session it did not make
    r = await client.post("/v1/models/simple/sessions", json={"session_id": "user-1"})
    assert r.status_code == 409 and r.json()["error"]["type"] == "SessionExists"
    assert reply["step"] == 1 and np.shape(reply["outputs"]) == (2, 2)
    got = (await client.get("/v1/sessions/user-1")).json()
    SessionInfo.model_validate(got)
    assert (got["step"], got["timesteps"], got["model"]) == (1, 2, "simple") and "states" not in got
    assert got["last_used_at"] >= got["created_at"]

    assert (await client.delete("/v1/sessions/user-1")).status_code == 204
    for method, path in [("GET", ""), ("DELETE", ""), ("POST", "/step"), ("POST", "/reset")]:
        r = await client.request(
            method,
            f"/v1/sessions/user-1{path}",
            json={"inputs": [0, 0, 0]} if path == "/step" else None,
        )
        assert r.status_code == 404, (method, path)
        assert r.json()["error"]["type"] == "SessionNotFound"


async def test_generated_ids_and_bad_ids(client: httpx.AsyncClient) -> None:
    ids = {(await create(client, "simple"))["session_id"] for _ in range(5)}
    assert len(ids) == 5
    r = await client.post("/v1/models/simple/sessions", json={"session_id": "../etc"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "session_id"
    for trailing in ("trail\n", "trail\r\n", "\ntrail"):  # `$` once let the first one in
        r = await client.post("/v1/models/simple/sessions", json={"session_id": trailing})
        assert r.status_code == 422 and r.json()["error"]["field"] == "session_id", trailing
    r = await client.get("/v1/sessions", params={"cursor": "trail\n"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "cursor"
    r = await client.post("/v1/models/nope/sessions", json={})
    assert r.status_code == 404 and r.json()["error"]["type"] == "ModelNotFound"


# -- Keras stateful semantics ---------------------------------------------------------------------
@pytest.mark.parametrize("model", ["stacked", "loop", "backwards"])
@pytest.mark.parametrize("size", [1, 3, 7])
async def test_streaming_equals_one_sequence(
    client: httpx.AsyncClient,
    tiny_models: dict[str, Any],
    model: str,
    size: int,
    rng: np.random.Generator,
) -> None:
    """Chunked steps == one predict on the whole sequence (go_backwards: chunk-wise predicts)."""
    tiny = tiny_models[model]
    x = rng.normal(size=(1, 17, 3)).astype(np.float32)
    sid = (await create(client, model))["session_id"]
    streamed = []
    for part in chunks(17, size):
        reply = await step(client, sid, x[0, part])
        streamed.append(np.asarray(reply["outputs"], np.float32).reshape(-1, 2))
    streamed_out = np.concatenate(streamed)
    final = await states(client, sid)

    if model == "backwards":  # Keras stateful + go_backwards reverses each call's chunk
        carried: dict[str, np.ndarray] | None = None
        expected_parts = []
        for part in chunks(17, size):
            outs, carried = tiny.reference(x[:, part], carried)
            expected_parts.append(outs[0][0])
        expected, expected_states = np.concatenate(expected_parts), carried
    else:
        outs, expected_states = tiny.reference(x)
        expected = outs[0][0]
        r = await client.post(
            f"/v1/models/{model}/predict", json={"inputs": x.tolist(), "return_state": True}
        )
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(streamed_out, np.asarray(r.json()["outputs"])[0], atol=ATOL)
        for key, value in r.json()["states"].items():
            np.testing.assert_allclose(final[key], np.asarray(value)[0], atol=ATOL)
    np.testing.assert_allclose(streamed_out, expected, atol=ATOL)
    assert expected_states is not None and set(final) == set(expected_states)
    for key in final:
        np.testing.assert_allclose(final[key], expected_states[key][0], atol=ATOL)


async def test_masked_timesteps_keep_the_state(
    client: httpx.AsyncClient, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    x = rng.normal(size=(1, 5, 3)).astype(np.float32)
    mask = np.array([[True, False, True, True, False]])
    sid = (await create(client, "stacked"))["session_id"]
    reply = await step(client, sid, x[0], mask[0])
    outs, expected = tiny_models["stacked"].reference(x, mask=mask)
    np.testing.assert_allclose(np.asarray(reply["outputs"]), outs[0][0], atol=ATOL)
    final = await states(client, sid)
    for key in expected:
        np.testing.assert_allclose(final[key], expected[key][0], atol=ATOL)


async def test_one_timestep_without_time_axis(
    client: httpx.AsyncClient, tiny_models: dict[str, Any]
) -> None:
    sid = (await create(client, "simple"))["session_id"]
    reply = await step(client, sid, [0.5, -0.5, 1.0])
    outs, _ = tiny_models["simple"].reference(np.array([[[0.5, -0.5, 1.0]]], np.float32))
    assert np.shape(reply["outputs"]) == (2,)
    np.testing.assert_allclose(reply["outputs"], outs[0][0, 0], atol=ATOL)


async def test_initial_state_and_reset(
    client: httpx.AsyncClient, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    tiny = tiny_models["stacked"]
    x = rng.normal(size=(1, 4, 3)).astype(np.float32)
    start = {
        "gru_a": rng.normal(size=6).astype(np.float32),
        "gru_b": rng.normal(size=5).astype(np.float32),
    }
    sid = (
        await create(client, "stacked", initial_state={k: v.tolist() for k, v in start.items()})
    )["session_id"]
    first = await step(client, sid, x[0])
    outs, _ = tiny.reference(x, {k: v[None] for k, v in start.items()})
    np.testing.assert_allclose(first["outputs"], outs[0][0], atol=ATOL)

    # run twice, reset, run twice: identical numbers (Keras test_statefulness)
    r = await client.post(f"/v1/sessions/{sid}/reset", json={})
    assert r.status_code == 200 and r.json()["step"] == 0
    assert all(not v.any() for v in (await states(client, sid)).values())
    a = [await step(client, sid, x[0]) for _ in range(2)]
    await client.post(f"/v1/sessions/{sid}/reset")
    b = [await step(client, sid, x[0]) for _ in range(2)]
    assert [s["step"] for s in a] == [1, 2] == [s["step"] for s in b]
    np.testing.assert_allclose([s["outputs"] for s in a], [s["outputs"] for s in b], atol=0)
    assert not np.allclose(a[0]["outputs"], a[1]["outputs"])

    # reset_states(states=...) as a list in manifest order
    given = [start["gru_a"].tolist(), start["gru_b"].tolist()]
    r = await client.post(f"/v1/sessions/{sid}/reset", json={"states": given})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose((await states(client, sid))["gru_a"], start["gru_a"], atol=1e-7)
    again = await step(client, sid, x[0])
    np.testing.assert_allclose(again["outputs"], first["outputs"], atol=ATOL)


@pytest.mark.parametrize(
    ("states", "field"),
    [
        ({"gru_a": [0.0] * 5, "gru_b": [0.0] * 5}, "states.gru_a"),
        ({"gru_a": [0.0] * 6}, "states.gru_b"),
        ({"gru_a": [0.0] * 6, "gru_b": [0.0] * 5, "extra": [1.0]}, "states.extra"),
        ({"gru_a": [0.0] * 6, "gru_b": [0.0] * 4 + [float("nan")]}, "states.gru_b[4]"),
        ([[0.0] * 6], "states"),
    ],
)
async def test_reset_validates_state_shapes(
    client: httpx.AsyncClient, states: Any, field: str
) -> None:
    sid = (await create(client, "stacked"))["session_id"]
    r = await client.post(f"/v1/sessions/{sid}/reset", content=json.dumps({"states": states}))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field
    r = await client.post(
        "/v1/models/stacked/sessions", content=json.dumps({"initial_state": states})
    )
    assert (
        r.status_code == 422
        and r.json()["error"]["field"].replace("initial_state", "states") == field
    )


async def test_token_one_per_sequence_multi_output_and_scaled_models(
    client: httpx.AsyncClient, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    ids = np.array([[3, 1, 0, 9, 4]])
    sid = (await create(client, "tokens"))["session_id"]
    reply = await step(client, sid, ids[0, :2])
    reply = await step(client, sid, ids[0, 2:])
    # token 0 is masked (mask_zero): a masked first timestep of a call outputs zeros, as in Keras
    _, carried = tiny_models["tokens"].reference(ids[:, :2])
    outs, _ = tiny_models["tokens"].reference(ids[:, 2:], carried)
    np.testing.assert_allclose(reply["outputs"], outs[0][0], atol=ATOL)
    assert not np.any(reply["outputs"][0])
    for bad, field in [([1.5], "inputs[0]"), ([10], "inputs[0]"), ([2, -1], "inputs[1]")]:
        r = await client.post(f"/v1/sessions/{sid}/step", json={"inputs": bad})
        assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text

    x = rng.normal(size=(1, 6, 3)).astype(np.float32)
    sid = (await create(client, "last_only"))["session_id"]
    await step(client, sid, x[0, :4])
    reply = await step(client, sid, x[0, 4:])
    outs, _ = tiny_models["last_only"].reference(x)
    np.testing.assert_allclose(reply["outputs"], outs[0][0], atol=ATOL)

    sid = (await create(client, "bidi"))["session_id"]
    reply = await step(client, sid, x[0])
    outs, _ = tiny_models["bidi"].reference(x)
    assert set(reply["outputs"]) == {"outputs/forward", "outputs/backward"}
    np.testing.assert_allclose(reply["outputs"]["outputs/forward"], outs[0][0], atol=ATOL)
    np.testing.assert_allclose(reply["outputs"]["outputs/backward"], outs[1][0], atol=ATOL)

    from fixtures import PREPROCESSING

    raw = x * 3 + 5
    sid = (await create(client, "scaled"))["session_id"]
    reply = await step(client, sid, raw[0])
    pre, post = PREPROCESSING["inputs"], PREPROCESSING["outputs"]
    outs, _ = tiny_models["scaled"].reference(
        ((raw - pre["mean"]) / pre["scale"]).astype(np.float32)
    )
    expected = outs[0][0] * np.asarray(post["scale"]) + np.asarray(post["mean"])
    np.testing.assert_allclose(reply["outputs"], expected, rtol=1e-5, atol=1e-4)


# -- ordering and batching ---------------------------------------------------------------------
async def test_concurrent_steps_on_one_session_are_serialised(
    client: httpx.AsyncClient, tiny_models: dict[str, Any]
) -> None:
    """50 concurrent single steps == 50 sequential ones: no lost update, no interleaving."""
    x = np.array([0.3, -0.2, 0.9], np.float32)
    sid = (await create(client, "stacked"))["session_id"]
    replies = await asyncio.gather(*(step(client, sid, x) for _ in range(50)))
    assert sorted(r["step"] for r in replies) == list(range(1, 51))
    _, expected = tiny_models["stacked"].reference(np.tile(x, (1, 50, 1)))
    final = await states(client, sid)
    for key in expected:
        np.testing.assert_allclose(final[key], expected[key][0], atol=ATOL)
    assert (await client.get(f"/v1/sessions/{sid}")).json()["step"] == 50


async def test_concurrent_sessions_are_batched_exactly(
    served: Any, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    """Steps of 8 sessions with chunks of 1-7 timesteps share runs and equal each run alone."""
    client = served.client
    lengths = [1, 2, 3, 4, 5, 6, 7, 3]
    xs = [rng.normal(size=(1, n, 3)).astype(np.float32) for n in lengths]
    ids = [(await create(client, "stacked"))["session_id"] for _ in lengths]
    pairs = zip(ids, xs, strict=True)
    replies = await asyncio.gather(*(step(client, sid, x[0]) for sid, x in pairs))
    for reply, x in zip(replies, xs, strict=True):
        outs, _ = tiny_models["stacked"].reference(x)
        np.testing.assert_allclose(reply["outputs"], outs[0][0], atol=ATOL)
    metrics = (await client.get("/metrics")).text
    count = _sample(metrics, 'gruserve_batch_size_count{model="stacked"}')
    total = _sample(metrics, 'gruserve_batch_size_sum{model="stacked"}')
    assert total == 8 and count < 8, metrics


# A limit no run can reach (about 11 days of CPU time), or none: where a measured batch
# runs then depends on the setting alone, never on how busy the machine is (a run of the
# tiny model may take more than the default 250 µs while other processes hold the CPUs).
@pytest.mark.parametrize("inline_below_us", [1e12, 0.0])
async def test_a_small_models_steps_run_on_the_loop_once_measured(
    models_dir: Path,
    tiny_models: dict[str, Any],
    store_url: str,
    inline_below_us: float,
    rng: np.random.Generator,
) -> None:
    """Same outputs and state on the event loop as in the pool; /metrics says where."""
    steps = 12
    xs = rng.normal(size=(1, steps, 3)).astype(np.float32)
    inline = 'gruserve_inline_batches_total{model="simple"}'
    async for s in serve(models_dir, store_url, batch_inline_below_us=inline_below_us):
        sid = (await create(s.client, "simple"))["session_id"]
        replies = [await step(s.client, sid, xs[0, t]) for t in range(steps - 2)]
        before = _sample((await s.client.get("/metrics")).text, inline)
        replies += [await step(s.client, sid, xs[0, t]) for t in range(steps - 2, steps)]
        after = _sample((await s.client.get("/metrics")).text, inline)
        outs, expected = tiny_models["simple"].reference(xs)
        for t, reply in enumerate(replies):
            np.testing.assert_allclose(reply["outputs"], outs[0][0, t], atol=ATOL)
        final = await states(s.client, sid)
        for key in expected:
            np.testing.assert_allclose(final[key], expected[key][0], atol=ATOL)
        # the first step of a size measures the model in the pool; measured, every later
        # step runs on the loop when inline runs are on, in the pool when they are off
        assert (before > 0, after - before) == ((True, 2) if inline_below_us else (False, 0))


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


# -- limits ------------------------------------------------------------------------------------
async def test_idle_sessions_expire(
    models_dir: Path, tiny_models: dict[str, Any], store_url: str
) -> None:
    # "busy" is stepped every 0.2 s (each step well within its 1.5 s TTL of the one before)
    # until "idle", never used since its create, is past its TTL
    async for s in serve(models_dir, store_url, session_ttl_s=1.5):
        idle = (await create(s.client, "simple"))["session_id"]
        idle_until = time.time() + 1.5
        busy = (await create(s.client, "simple"))["session_id"]
        while time.time() <= idle_until:
            await asyncio.sleep(0.2)
            await step(s.client, busy, [0.0, 0.0, 0.0])
        await past(idle_until)
        r = await s.client.get(f"/v1/sessions/{idle}")
        assert r.status_code == 404 and "expired" in r.json()["error"]["message"]
        assert (await s.client.get(f"/v1/sessions/{busy}")).status_code == 200


async def test_max_sessions(models_dir: Path, tiny_models: dict[str, Any], store_url: str) -> None:
    async for s in serve(models_dir, store_url, max_sessions=2):
        first = (await create(s.client, "simple"))["session_id"]
        await create(s.client, "simple")
        r = await s.client.post("/v1/models/simple/sessions", json={})
        assert r.status_code == 429 and r.json()["error"]["type"] == "TooManySessions"
        assert "GRUSERVE_MAX_SESSIONS" in r.json()["error"]["message"]
        await s.client.delete(f"/v1/sessions/{first}")
        await create(s.client, "simple")


async def test_lru_eviction_and_lifetime_through_the_api(
    models_dir: Path, tiny_models: dict[str, Any], store_url: str
) -> None:
    # a lifetime that what must live until the sleep outlasts however busy the machine
    async for s in serve(
        models_dir, store_url, max_sessions=2, session_eviction="lru", session_max_lifetime_s=3.0
    ):
        first = await create(s.client, "simple", session_id="first")
        # expires at the end of its lifetime, well before its idle TTL (1800 s)
        created = datetime.fromisoformat(first["created_at"])
        lives = datetime.fromisoformat(first["expires_at"]) - created
        assert abs(lives - timedelta(seconds=3)) <= timedelta(milliseconds=1)  # ms resolution
        await create(s.client, "simple", session_id="second")
        await step(s.client, "first", [0.0, 0.0, 0.0])  # "second" is now the least recently used
        await create(s.client, "simple", session_id="third")
        assert (await s.client.get("/v1/sessions/second")).status_code == 404
        assert (await s.client.get("/v1/sessions/first")).status_code == 200
        await past(time.time() + 3.0)  # "third", created last, is past its lifetime too
        for sid in ("first", "third"):
            r = await s.client.get(f"/v1/sessions/{sid}")
            assert r.status_code == 404, r.text
        metrics = (await s.client.get("/metrics")).text
        assert _sample(metrics, "gruserve_sessions_evicted_total") == 1
        assert _sample(metrics, 'gruserve_sessions_expired_total{reason="lifetime"}') == 2
        assert _sample(metrics, 'gruserve_sessions_expired_total{reason="idle"}') == 0
        assert _sample(metrics, "gruserve_sessions") == 0


# -- listing -----------------------------------------------------------------------------------
async def test_listing_pages_through_every_session(client: httpx.AsyncClient) -> None:
    ids = sorted(f"list-{i:02d}" for i in range(7))
    for i, sid in enumerate(ids):
        await create(client, "stacked" if i % 3 else "simple", session_id=sid)
    await step(client, ids[1], [[0.1, 0.2, 0.3]])
    seen, cursor, pages = [], None, 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor is not None:
            params["cursor"] = cursor
        r = await client.get("/v1/sessions", params=params)
        assert r.status_code == 200, r.text
        body = SessionList.model_validate(r.json())
        seen += body.sessions
        pages += 1
        cursor = body.next_cursor
        if cursor is None:
            break
    assert [s.session_id for s in seen] == ids and pages == 3
    assert seen[1].step == 1 and seen[1].timesteps == 1 and seen[1].model == "stacked"
    assert "states" not in r.text
    r = await client.get("/v1/sessions", params={"model": "simple", "limit": 100})
    assert [s["session_id"] for s in r.json()["sessions"]] == [ids[0], ids[3], ids[6]]
    assert r.json()["next_cursor"] is None
    for params, field in (
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"cursor": "../x"}, "cursor"),
    ):
        r = await client.get("/v1/sessions", params=params)
        assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
