"""onnxruntime's GRU node against Keras's float64 math, activation by activation.

The exporter uses the native GRU node only for activations whose kernel is
as exact as the float32 loop (``Activation.native_exact``). Every activation
the node can spell is driven here from tiny to extreme pre-activations
(|x| up to 1e4) in both roles, candidate and gate, with saturated gates,
and judged by the float64 rule of :mod:`gruserve.export.tolerance`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from gruserve.export.exporter import export_model
from gruserve.export.model_graph import INPUT, MASK, build_model_graph
from gruserve.export.tolerance import judge
from gruserve.layers import ModelSpec
from gruserve.layers.activations import ACTIVATIONS
from keras_helpers import keras, to_numpy

pytestmark = pytest.mark.usefixtures("keras_in_float64")  # a float64 reference in float64
NATIVE = sorted(name for name, a in ACTIVATIONS.items() if a.onnx_gru is not None)
MAGNITUDES = [0.0, 1e-4, 0.03, 0.5, 1.0, 3.0, 9.0, 20.0, 45.0, 87.0, 89.0, 150.0, 1e3, 1e4]
SWEEP = np.array(MAGNITUDES + [-m for m in MAGNITUDES[1:]], np.float32)
ROLES = [("activation", n) for n in NATIVE] + [("recurrent_activation", n) for n in NATIVE]
IDS = [f"{role}={name}" for role, name in ROLES]


def _gru_spec(units: int, steps: int | None, **config: Any) -> ModelSpec:
    return ModelSpec.from_layer_configs(
        "probe",
        [
            {"class_name": "InputLayer", "config": {"batch_shape": [None, steps, 1]}},
            {
                "class_name": "GRU",
                "config": {"name": "gru", "units": units, "return_sequences": True, **config},
            },
        ],
    )


def _run(
    spec: ModelSpec, weights: dict[str, np.ndarray], x: np.ndarray, h0: np.ndarray, strategy: str
) -> np.ndarray:
    built = build_model_graph(spec, {"gru": weights}, strategy)
    session = ort.InferenceSession(
        built.model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    feeds = {INPUT: x, MASK: np.ones(x.shape[:2], bool), "initial_state/gru": h0}
    return session.run(["outputs"], feeds)[0]


def _keras_activation(name: str, x: np.ndarray) -> np.ndarray:
    return to_numpy(keras.activations.get(name)(keras.ops.convert_to_tensor(x, "float64")))


# ----------------------------------------------------------------------------- one activation
def _probe_weights(role: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """One unit, one step, h0 = 0, so the output is one activation value.

    Candidate role: the update gate is sigmoid(-1e4) = 0, so ``h = g(x)``.
    Gate role: the candidate is linear(1), so ``h = 1 - f(x)``.
    """
    zero = np.zeros((1, 3), np.float32)
    if role == "activation":
        kernel, bias = np.array([[0.0, 0.0, 1.0]]), np.array([[-1e4, 0.0, 0.0], [0.0] * 3])
        config = {"recurrent_activation": "sigmoid"}
    else:
        kernel, bias = np.array([[1.0, 0.0, 0.0]]), np.array([[0.0, 0.0, 1.0], [0.0] * 3])
        config = {"activation": "linear"}
    weights = {
        "kernel": kernel.astype(np.float32),
        "recurrent_kernel": zero,
        "bias": bias.astype(np.float32),
    }
    return weights, config


@pytest.mark.parametrize("role, name", ROLES, ids=IDS)
def test_native_kernel_values_from_small_to_extreme(role: str, name: str) -> None:
    """Each activation the GRU node spells, at |x| from 0 to 1e4, against Keras float64."""
    weights, config = _probe_weights(role)
    spec = _gru_spec(1, 1, **{**config, role: name})
    x = SWEEP[:, None, None]
    h0 = np.zeros((len(SWEEP), 1), np.float32)
    keras_value = _keras_activation(name, SWEEP.astype(np.float64))
    exact = keras_value if role == "activation" else 1.0 - keras_value
    loop = _run(spec, weights, x, h0, "loop")[:, 0, 0]
    native = _run(spec, weights, x, h0, "native")[:, 0, 0]
    assert judge(loop, exact, loop)["passed"]
    verdict = judge(native, exact, loop)
    if ACTIVATIONS[name].native_exact:
        assert verdict["passed"], verdict
    else:  # why it is not exported natively: onnxruntime's kernel overflows
        assert not verdict["passed"] and verdict["non_finite"], verdict
        assert build_model_graph(spec, {"gru": weights}).layers["gru"].strategy == "loop"


# ----------------------------------------------------------------------------- saturated GRUs
def _keras64_gru(
    config: dict[str, Any], weights: dict[str, np.ndarray], x: np.ndarray, h0: np.ndarray
) -> np.ndarray:
    units = h0.shape[1]
    layer = keras.layers.GRU(units, return_sequences=True, dtype="float64", **config)
    layer.build((None, x.shape[1], x.shape[2]))
    layer.set_weights(
        [weights[k].astype(np.float64) for k in ("kernel", "recurrent_kernel", "bias")]
    )
    return to_numpy(layer(x.astype(np.float64), initial_state=[h0.astype(np.float64)]))


@pytest.mark.parametrize("scale", [0.6, 100.0])
@pytest.mark.parametrize("role, name", ROLES, ids=IDS)
def test_saturated_gru_exports_match_keras_float64(
    role: str, name: str, scale: float, tmp_path: Any
) -> None:
    """Weights x100 and inputs to 1e4 saturate every gate; the written graph must still
    be as close to Keras float64 as float32 allows (the native node or, where its
    sigmoid overshoots 1, the loop the exporter falls back to)."""
    rng = np.random.default_rng(5)
    units, steps = 3, 4
    spec = _gru_spec(units, steps, **{role: name})
    weights = {
        key: (rng.normal(size=shape) * scale).astype(np.float32)
        for key, shape in spec.weight_shapes()["gru"].items()
    }
    result = export_model(spec, {"gru": weights}, models_dir=tmp_path, name="sat")
    x = rng.normal(size=(6, steps, 1)) * np.array([1, 10, 100, 1e3, 1e4, 1])[:, None, None]
    x = x.astype(np.float32)
    h0 = (rng.normal(size=(6, units)) * 0.5).astype(np.float32)
    session = ort.InferenceSession(
        str(result.path / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds = {INPUT: x, MASK: np.ones(x.shape[:2], bool), "initial_state/gru": h0}
    got = session.run(["outputs"], feeds)[0]
    exact = _keras64_gru({role: name}, weights, x, h0)
    loop = _run(spec, weights, x, h0, "loop")
    assert judge(got, exact, loop)["passed"], (
        result.manifest.layers[0].export,
        judge(got, exact, loop),
    )


def test_softplus_is_finite_past_88_as_in_keras(tmp_path: Any) -> None:
    """The issue's numbers: Keras gives [5.0, 27.5, 63.75], onnxruntime's GRU node inf."""
    spec = ModelSpec.from_layer_configs(
        "sp",
        [
            {"class_name": "InputLayer", "config": {"batch_shape": [None, None, 1]}},
            {"class_name": "GRU", "config": {"name": "gru", "units": 1, "activation": "softplus"}},
        ],
    )
    weights = {
        "kernel": np.array([[0.0, 0.0, 1.0]], np.float32),
        "recurrent_kernel": np.zeros((1, 3), np.float32),
        "bias": np.array([[-1e4, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32),
    }
    result = export_model(spec, {"gru": weights}, models_dir=tmp_path, name="sp")
    assert result.manifest.layers[0].export["strategy"] == "loop"  # type: ignore[index]
    session = ort.InferenceSession(
        str(result.path / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    x = np.array([[[5.0]], [[27.5]], [[100.0]]], np.float32)
    feeds = {
        INPUT: x,
        MASK: np.ones((3, 1), bool),
        "initial_state/gru": np.zeros((3, 1), np.float32),
    }
    got = session.run(["outputs"], feeds)[0][:, 0]
    np.testing.assert_allclose(got, [5.006715348489118, 27.5, 100.0], rtol=1e-6)
