"""The client's in-band lifecycle (``step(x, create=..., end=...)``) against a real
``gruserve serve``: sessions made by their first step and ended by their last, checked with
stock httpx calls (one ``predict`` over the whole sequence, ``GET /v1/sessions/{id}``)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from client_helpers import array, with_states

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))

from fault_helpers import server_env, serving

from gruserve.client import AsyncClient, Client, SessionNotFound

KEY = "client-lifecycle-key"
AUTH = {"authorization": f"Bearer {KEY}"}
ATOL = RTOL = 1e-5  # demo outputs are in raw sunspot units (tens)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("client-lifecycle")
    yield from serving(server_env(GRUSERVE_API_KEYS=KEY), workdir)


def _predict(url: str, x: np.ndarray, initial: dict[str, np.ndarray] | None = None) -> Any:
    body: dict[str, Any] = {"inputs": [x.tolist()], "return_state": True}
    if initial is not None:
        body["initial_state"] = {k: [v.tolist()] for k, v in initial.items()}
    reply = httpx.post(f"{url}/v1/models/demo/predict", json=body, headers=AUTH, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()


def _status(url: str, session_id: str) -> int:
    return httpx.get(f"{url}/v1/sessions/{session_id}", headers=AUTH, timeout=30).status_code


def _chunks(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 200, size=(t, 1)).astype(np.float32) for t in (2, 1, 3)]


def _check(url: str, chunks: list[np.ndarray], outputs: list[Any], states: Any) -> None:
    expected = _predict(url, np.concatenate(chunks))
    np.testing.assert_allclose(
        np.concatenate(outputs), expected["outputs"][0], rtol=RTOL, atol=ATOL
    )
    for key, value in expected["states"].items():
        np.testing.assert_allclose(states[key], value[0], rtol=RTOL, atol=ATOL)


def test_a_session_made_by_its_first_step_and_ended_by_its_last(server: str) -> None:
    chunks = _chunks(1)
    with Client(server, api_key=KEY) as c:
        s = c.session("visit-1", model="demo")  # no request: the first step creates it
        assert _status(server, "visit-1") == 404 and s.step_number == 0
        outputs = [array(s.step(chunks[0], create=True))]
        assert (s.step_number, s.version) == (1, 1) and _status(server, "visit-1") == 200
        # a resend of the create-step (as after a lost reply): the kept answer, nothing new
        again = c.session("visit-1", model="demo").step(chunks[0], create="demo")
        np.testing.assert_array_equal(again, outputs[0])
        outputs.append(array(s.step(chunks[1])))
        last, states = with_states(s.step(chunks[2], end={"return_state": True}))
        outputs.append(last)
        assert s.step_number == 3 and _status(server, "visit-1") == 404
        with pytest.raises(SessionNotFound):  # ended: its id is free, no session behind it
            s.step(chunks[2], end=True)
    _check(server, chunks, outputs, states)


def test_a_one_request_session_with_an_initial_state(server: str) -> None:
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 200, size=(4, 1)).astype(np.float32)
    initial = {"gru": rng.normal(size=32), "gru_1": rng.normal(size=16)}
    with Client(server, api_key=KEY) as c:
        s = c.session("one-shot", model="demo")
        outputs = array(s.step(x, create={"initial_state": initial}, end=True))
    assert _status(server, "one-shot") == 404
    expected = _predict(server, x, {k: v.astype(np.float32) for k, v in initial.items()})
    np.testing.assert_allclose(outputs, expected["outputs"][0], rtol=RTOL, atol=ATOL)


def test_the_forms_create_and_end_take(server: str) -> None:
    with Client(server, api_key=KEY) as c:
        s = c.session("forms", model="demo")
        for bad in ({"create": {"modle": "demo"}}, {"end": "yes"}, {"end": {"state": True}}):
            with pytest.raises(ValueError, match=r"create=|end="):
                s.step(np.array([1.0]), **bad)
    assert _status(server, "forms") == 404  # nothing was sent


def test_the_async_client_creates_and_ends_in_band(server: str) -> None:
    chunks = _chunks(3)

    async def main() -> tuple[list[Any], Any]:
        async with AsyncClient(server, api_key=KEY) as c:
            s = await c.session("visit-async", model="demo")
            outputs = [await s.step(chunks[0], create={"model": "demo"})]
            assert _status(server, "visit-async") == 200
            outputs.append(await s.step(chunks[1]))
            last, states = await s.step(chunks[2], end={"return_state": True})
            return [*outputs, last], states

    outputs, states = asyncio.run(main())
    assert _status(server, "visit-async") == 404
    _check(server, chunks, outputs, states)
