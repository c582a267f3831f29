"""Work limits: refused from the shape before anything runs, and big batches run in chunks
whose results equal the torch reference (so chunking changes memory, never numbers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import serve
from gruserve.runtime.limits import WorkLimits

ATOL = 1e-5


def test_chunks_cover_the_batch_once() -> None:
    limits = WorkLimits(chunk_timesteps=10)
    parts = list(limits.chunks(batch=23, timesteps=4))  # 2 sequences (8 steps) per chunk
    assert [(p.start, p.stop) for p in parts][:2] == [(0, 2), (2, 4)]
    assert sum(p.stop - p.start for p in parts) == 23 and parts[-1].stop == 23
    # a sequence longer than the chunk still runs, alone
    assert [(p.start, p.stop) for p in limits.chunks(batch=2, timesteps=50)] == [(0, 1), (1, 2)]


@pytest.mark.parametrize("name", ["max_batch_timesteps", "max_reply_values", "chunk_timesteps"])
def test_limits_must_be_positive(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        WorkLimits(**{name: 0})


async def test_chunked_predict_matches_the_reference(
    models_dir: Path, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    """21 sequences of 5 steps in chunks of 2 sequences (10 sequence-steps): 11 runs."""
    model = tiny_models["stacked"]
    x = rng.normal(size=(21, 5, 3)).astype(np.float32)
    mask = rng.random((21, 5)) > 0.3
    mask[:, 0] = True
    async for s in serve(models_dir, predict_chunk_timesteps=10):
        r = await s.client.post(
            "/v1/models/stacked/predict",
            json={"inputs": x.tolist(), "mask": mask.tolist(), "return_state": True},
        )
        assert r.status_code == 200, r.text
        body = r.json()
    outputs, states = model.reference(x, mask=mask)
    np.testing.assert_allclose(np.asarray(body["outputs"]), outputs[0], atol=ATOL)
    for key, value in states.items():
        np.testing.assert_allclose(np.asarray(body["states"][key]), value, atol=ATOL)


async def test_v2_chunked_returns_only_what_was_asked(
    models_dir: Path, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    """A v2 request for one final state only: chunked, it gets that state and nothing else."""
    model = tiny_models["stacked"]
    x = rng.normal(size=(9, 4, 3)).astype(np.float32)
    async for s in serve(models_dir, predict_chunk_timesteps=8):
        r = await s.client.post(
            "/v2/models/stacked/infer",
            json={
                "inputs": [
                    {
                        "name": "inputs",
                        "shape": [9, 4, 3],
                        "datatype": "FP32",
                        "data": x.ravel().tolist(),
                    }
                ],
                "outputs": [{"name": "final_state/gru_b"}],
            },
        )
        assert r.status_code == 200, r.text
        outputs = r.json()["outputs"]
    assert [o["name"] for o in outputs] == ["final_state/gru_b"]
    _, states = model.reference(x)
    got = np.asarray(outputs[0]["data"], np.float32).reshape(outputs[0]["shape"])
    np.testing.assert_allclose(got, states["gru_b"], atol=ATOL)


async def test_oversized_work_is_refused_naming_the_setting(
    models_dir: Path, tiny_models: dict[str, Any]
) -> None:
    """simple: GRU(4) -> Dense(2) per timestep, one state of 4 units."""
    async for s in serve(models_dir, max_batch_timesteps=100, max_reply_values=400):
        c = s.client
        ok = {"inputs": [[[0.5] * 3] * 10] * 10}  # 100 sequence-steps, 200 output values
        assert (await c.post("/v1/models/simple/predict", json=ok)).status_code == 200
        r = await c.post("/v1/models/simple/predict", json={"inputs": [[[0.5] * 3] * 11] * 10})
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["type"] == "PayloadTooLarge"
        assert "110" in error["message"] and "GRUSERVE_MAX_BATCH_TIMESTEPS" in error["message"]
        # 100 sequences x (1 step x 2 outputs + 4 state units) = 600 values > 400
        one_step = {"inputs": [[[0.5] * 3]] * 100, "return_state": True}
        r = await c.post("/v1/models/simple/predict", json=one_step)
        assert r.status_code == 413 and "GRUSERVE_MAX_REPLY_VALUES" in r.text, r.text
        one_step["return_state"] = False  # 200 values: fine
        assert (await c.post("/v1/models/simple/predict", json=one_step)).status_code == 200
        # a session step counts its reply too: 201 timesteps x 2 outputs > 400
        created = await c.post("/v1/models/simple/sessions", json={})
        sid = created.json()["session_id"]
        r = await c.post(f"/v1/sessions/{sid}/step", json={"inputs": [[0.5] * 3] * 201})
        assert r.status_code == 413 and "GRUSERVE_MAX_REPLY_VALUES" in r.text, r.text
        assert (await c.get(f"/v1/sessions/{sid}")).json()["step"] == 0
