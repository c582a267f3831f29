"""Helpers that move models and numbers between the real ``keras`` package and gruserve.

Only tests import this: the product never imports keras.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import onnxruntime as ort

from gruserve.export.model_graph import (
    INPUT,
    MASK,
    build_model_graph,
    state_input_name,
    state_output_name,
)
from gruserve.layers.model import ModelSpec

TOLERANCE = 1e-5
# A state that diverges (an unbounded gate makes z > 1) reaches tens; there only
# float32's relative precision is meaningful, so allow 1e-6 of the magnitude on top.
RELATIVE = 1e-6


def to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    return np.asarray(value)


def randomize(layer_or_model: Any, rng: np.random.Generator, scale: float = 0.5) -> None:
    """Random weights (Keras's initial biases are zero, which hides bias bugs)."""
    weights = [
        (rng.normal(size=w.shape) * scale).astype(np.float32) for w in layer_or_model.get_weights()
    ]
    layer_or_model.set_weights(weights)


def spec_of_layers(
    name: str,
    input_shape: Sequence[int | None],
    layers: Sequence[Any],
    input_dtype: str = "float32",
) -> ModelSpec:
    """Our spec for Keras layers as they are configured (via their get_config)."""
    configs = [
        {
            "class_name": "InputLayer",
            "config": {"batch_shape": [None, *input_shape], "dtype": input_dtype},
        }
    ]
    configs += [
        {"class_name": layer.__class__.__name__, "config": layer.get_config()} for layer in layers
    ]
    return ModelSpec.from_layer_configs(name, configs)


def weights_of_layers(spec: ModelSpec, layers: Sequence[Any]) -> dict[str, dict[str, np.ndarray]]:
    """Keras ``get_weights()`` order equals the order of ``spec.weight_shapes()``."""
    expected = spec.weight_shapes()
    weights = {}
    for layer, ours in zip(layers, spec.layers, strict=True):
        values = layer.get_weights()
        shapes = expected.get(ours.name, {})
        assert len(values) == len(shapes), (ours.name, list(shapes), [v.shape for v in values])
        for (key, shape), value in zip(shapes.items(), values, strict=True):
            assert tuple(value.shape) == tuple(shape), (ours.name, key, value.shape, shape)
        weights[ours.name] = dict(
            zip(shapes, (np.asarray(v, np.float32) for v in values), strict=True)
        )
    return weights


def onnx_session(
    spec: ModelSpec, weights: dict[str, dict[str, np.ndarray]]
) -> ort.InferenceSession:
    built = build_model_graph(spec, weights)
    return ort.InferenceSession(built.model.SerializeToString(), providers=["CPUExecutionProvider"])


def run_onnx(
    session: ort.InferenceSession,
    spec: ModelSpec,
    x: np.ndarray,
    mask: np.ndarray | None,
    states: dict[str, list[np.ndarray]] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Run our graph; zeros for states not given; an all-true mask when none is given."""
    batch = x.shape[1] if spec.time_major else x.shape[0]
    if mask is None:
        mask = np.ones(x.shape[:2], bool)
    feeds = {INPUT: x, MASK: mask}
    given = {k: list(v) for k, v in (states or {}).items()}
    for state in spec.states():
        values = given.get(state.layer)
        feeds[state_input_name(state.key)] = (
            values.pop(0) if values else np.zeros((batch, state.units), np.float32)
        )
    names = spec.output_names() + [state_output_name(s.key) for s in spec.states()]
    results = session.run(names, feeds)
    n = len(spec.output_names())
    return results[:n], results[n:]


def assert_close(ours: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> float:
    """max |diff| <= 1e-5 (+ 1e-6 * |expected| for diverging states); returns max |diff|."""
    assert len(ours) == len(expected), (len(ours), len(expected))
    worst = 0.0
    for x, y in zip(ours, expected, strict=True):
        x, y = to_numpy(x), to_numpy(y)
        assert x.shape == y.shape, (x.shape, y.shape)
        assert np.all(np.isfinite(y)), "the reference itself is not finite; the case is meaningless"
        diff = np.abs(x - y)
        bound = TOLERANCE + RELATIVE * np.abs(y)
        assert np.all(diff <= bound), (
            f"max |diff| {diff.max():.3g} at |value| {np.abs(y).max():.3g}"
        )
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst


def max_diff(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    diffs = []
    for x, y in zip(a, b, strict=True):
        x, y = to_numpy(x), to_numpy(y)
        assert x.shape == y.shape, (x.shape, y.shape)
        diffs.append(float(np.max(np.abs(x - y))) if x.size else 0.0)
    return max(diffs)


__all__ = [
    "TOLERANCE",
    "assert_close",
    "keras",
    "max_diff",
    "onnx_session",
    "randomize",
    "run_onnx",
    "spec_of_layers",
    "to_numpy",
    "weights_of_layers",
]
