"""Request arrays against a model signature: shapes, finiteness, tokens, masks, limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gruserve.errors import InvalidInput, PayloadTooLarge
from gruserve.repository import ModelRepository
from gruserve.runtime.signature import ModelSignature
from gruserve.runtime.validation import check_batch, check_chunk, check_states, flat_state


@pytest.fixture
def sigs(models_dir: Path, tiny_models: dict[str, Any]) -> dict[str, ModelSignature]:
    repo = ModelRepository(models_dir)
    return {name: ModelSignature(repo.resolve(name).manifest) for name in ("stacked", "tokens")}


def test_chunks(sigs: dict[str, ModelSignature]) -> None:
    sig = sigs["stacked"]
    chunk = check_chunk(sig, np.ones(3), None, 10)
    assert chunk.single and chunk.inputs.shape == (1, 3) and chunk.inputs.dtype == np.float32
    chunk = check_chunk(sig, np.ones((4, 3)), np.array([True, False, True, True]), 10)
    assert not chunk.single and chunk.timesteps == 4
    cases = [
        (np.ones((2, 4)), None, "inputs", "3 features"),
        (np.array([[1.0, np.inf, 0.0]]), None, "inputs[0][1]", "finite"),
        (np.ones((2, 3)), np.array([True]), "mask", "shape"),
        (np.ones((2, 3)), np.array([1, 2]), "mask", "booleans"),
        (np.ones((0, 3)), None, "inputs", "at least one"),
    ]
    for x, mask, field, text in cases:
        with pytest.raises(InvalidInput, match=text) as caught:
            check_chunk(sig, x, mask, 10)
        assert caught.value.field == field
    with pytest.raises(PayloadTooLarge, match="GRUSERVE_MAX_TIMESTEPS"):
        check_chunk(sig, np.ones((11, 3)), None, 10)


def test_tokens_and_batches(sigs: dict[str, ModelSignature]) -> None:
    sig = sigs["tokens"]
    assert check_chunk(sig, np.array(4.0), None, 10).inputs.tolist() == [4]
    with pytest.raises(InvalidInput, match=r"outside \[0, 10\)"):
        check_chunk(sig, np.array([1, 10]), None, 10)
    x, mask = check_batch(sig, np.array([[1, 2], [3, 0]]), None, 10)
    assert x.dtype == np.int64 and mask is None
    with pytest.raises(InvalidInput, match=r"\[batch, timesteps, 3\]"):
        check_batch(sigs["stacked"], np.ones((2, 3)), None, 10)


def test_states(sigs: dict[str, ModelSignature]) -> None:
    sig = sigs["stacked"]
    flat = flat_state(sig, {"gru_a": np.ones(6), "gru_b": np.zeros(5)}, "s")
    assert flat.shape == (11,) and flat[:6].sum() == 6
    assert flat_state(sig, None, "s").shape == (11,)
    listed = check_states(sig, [np.ones((2, 6)), np.ones((2, 5))], "s", batch=2)
    assert [a.shape for a in listed] == [(2, 6), (2, 5)]
    with pytest.raises(InvalidInput, match="expected 2 state"):
        check_states(sig, [np.ones(6)], "s")
    assert sig.split_state(flat)["gru_b"].shape == (5,)


def test_finiteness_and_float32_range(sigs: dict[str, ModelSignature]) -> None:
    """The one-reduction fast check and the value-by-value check agree on every edge."""
    sig = sigs["stacked"]
    top = float(np.finfo(np.float32).max)
    ok = check_chunk(sig, np.array([[top, -top, 0.0]]), None, 10).inputs
    assert ok.dtype == np.float32 and np.isfinite(ok).all()
    assert check_chunk(sig, np.array([[1, 2, 3]]), None, 10).inputs.dtype == np.float32
    bad = [
        (np.array([[0.0, 0.0], [1e300, 0.0], [0.0, 0.0]]).T, "inputs[0][1]"),
        (np.array([[0.0, 1e39, 0.0]]), "inputs[0][1]"),
        (np.array([[0.0, 0.0, -np.inf]]), "inputs[0][2]"),
        (np.array([[np.nan, 0.0, 0.0]], np.float32), "inputs[0][0]"),
        (np.array([[0.0, 0.0, np.inf]], np.float32), "inputs[0][2]"),
    ]
    for x, field in bad:
        with pytest.raises(InvalidInput, match="not a finite float32") as caught:
            check_chunk(sig, x, None, 10)
        assert caught.value.field == field
