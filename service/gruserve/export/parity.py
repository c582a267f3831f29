"""Export-time parity: onnxruntime against the reference math on random inputs.

The reference is the torch module when torch is installed (the issue's "torch
vs onnxruntime"), else the same layer math on numpy; both run
:mod:`gruserve.layers.forward`. Cases cover full sequences, right padding
(including an all-masked sample) and masks with holes, so every branch of
the exported graph is exercised before a model is written.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnxruntime as ort

from gruserve.export.model_graph import INPUT, MASK, state_input_name, state_output_name
from gruserve.layers.backend import NUMPY
from gruserve.layers.core import EmbeddingSpec
from gruserve.layers.forward import run_model
from gruserve.layers.model import ModelSpec

ATOL = 1e-5
RTOL = 1e-4
Reference = Callable[
    [
        ModelSpec,
        Mapping[str, Mapping[str, np.ndarray]],
        np.ndarray,
        np.ndarray,
        dict[str, list[np.ndarray]],
    ],
    tuple[list[np.ndarray], dict[str, list[np.ndarray]]],
]


def numpy_reference(spec, weights, x, mask, states):  # type: ignore[no-untyped-def]
    return run_model(NUMPY, spec, weights, x, mask, states)


def torch_reference(spec, weights, x, mask, states):  # type: ignore[no-untyped-def]
    import torch

    from gruserve.nn.sequential import Sequential

    model = Sequential.from_spec(spec, weights).eval()
    with torch.no_grad():
        outputs, final = model.forward_with_states(
            torch.from_numpy(x),
            mask=torch.from_numpy(mask),
            states={k: [torch.from_numpy(s) for s in v] for k, v in states.items()},
        )
    return [o.numpy() for o in outputs], {k: [s.numpy() for s in v] for k, v in final.items()}


def pick_reference(name: str = "auto") -> tuple[str, Reference]:
    if name == "auto":
        name = "torch" if importlib.util.find_spec("torch") is not None else "numpy"
    return name, (torch_reference if name == "torch" else numpy_reference)


def _masks(batch: int, steps: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    lengths = np.array([steps, max(steps - 2, 1), 1, 0][:batch])
    right = np.arange(steps)[None, :] < lengths[:, None]
    holes = rng.random((batch, steps)) > 0.3
    holes[:, 0] = True
    return {"full": np.ones((batch, steps), bool), "right_padded": right, "holes": holes}


def _inputs(spec: ModelSpec, batch: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    first = spec.layers[0]
    if isinstance(first, EmbeddingSpec):
        low = 0 if first.mask_zero else 1
        return rng.integers(low, first.input_dim, size=(batch, steps)).astype(np.int64)
    return rng.normal(size=(batch, steps, int(spec.input_features or 0))).astype(np.float32)


def parity_report(
    spec: ModelSpec,
    weights: Mapping[str, Mapping[str, np.ndarray]],
    onnx_bytes: bytes,
    *,
    static_timesteps: int | None = None,
    reference: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Run every case through onnxruntime and the reference; return the report."""
    ref_name, ref = pick_reference(reference)
    rng = np.random.default_rng(seed)
    batch, steps = 4, static_timesteps or 7
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    output_names = spec.output_names() + [state_output_name(s.key) for s in spec.states()]
    cases, worst, passed = [], 0.0, True
    for case, mask in _masks(batch, steps, rng).items():
        x = _inputs(spec, batch, steps, rng)
        states: dict[str, list[np.ndarray]] = {}
        feeds: dict[str, np.ndarray] = {}
        for state in spec.states():
            value = (rng.normal(size=(batch, state.units)) * 0.5).astype(np.float32)
            states.setdefault(state.layer, []).append(value)
            feeds[state_input_name(state.key)] = value
        if spec.time_major:
            x, mask = np.swapaxes(x, 0, 1).copy(), mask.T.copy()
        feeds[INPUT], feeds[MASK] = x, mask
        got = session.run(output_names, feeds)
        outputs, final = ref(spec, weights, x, mask, states)
        expected = list(outputs) + [
            s for layer in spec.recurrent_layers() for s in final[layer.name]
        ]
        diffs = [
            float(np.max(np.abs(g - e))) if g.size else 0.0
            for g, e in zip(got, expected, strict=True)
        ]
        ok = all(
            np.allclose(g, e, rtol=RTOL, atol=ATOL) for g, e in zip(got, expected, strict=True)
        )
        passed = passed and ok
        worst = max(worst, *diffs)
        cases.append(
            {
                "case": case,
                "batch": batch,
                "timesteps": steps,
                "max_abs_diff": max(diffs),
                "passed": ok,
            }
        )
    return {
        "reference": ref_name,
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "max_abs_diff": worst,
        "atol": ATOL,
        "rtol": RTOL,
        "passed": passed,
        "cases": cases,
        "seed": seed,
    }
