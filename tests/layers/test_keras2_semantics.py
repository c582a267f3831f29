"""Keras-2-only semantics against the documented formulas, written out here in numpy.

tf-keras's hard_sigmoid is clip(0.2 x + 0.5, 0, 1) (Keras 3 uses x/6 + 0.5),
old Keras 2 GRUs default to reset_after=False, and ``time_major=True`` takes
(time, batch, features). The reference below is independent of gruserve's
layer math; the tf-keras files in tests/fixtures/keras2 check the same
against tf-keras itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gruserve.export.model_graph import build_model_graph
from gruserve.export.recurrent import gru_node_names
from gruserve.layers import ModelSpec
from gruserve.nn.sequential import Sequential
from keras_helpers import assert_close, onnx_session, run_onnx

T, B, F, U = 6, 3, 4, 5


def keras2_gru_reference(
    x_tbf: np.ndarray, kernel: np.ndarray, recurrent: np.ndarray, bias: np.ndarray, h0: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """tf-keras GRU: reset_after=False, hard_sigmoid gates, tanh candidate, time-major."""

    def hard_sigmoid(v: np.ndarray) -> np.ndarray:
        return np.clip(0.2 * v + 0.5, 0.0, 1.0)

    kz, kr, kh = np.split(kernel.astype(np.float64), 3, axis=1)
    rz, rr, rh = np.split(recurrent.astype(np.float64), 3, axis=1)
    bz, br, bh = np.split(bias.astype(np.float64), 3)
    h = h0.astype(np.float64)
    outputs = []
    for x in x_tbf.astype(np.float64):
        z = hard_sigmoid(x @ kz + bz + h @ rz)
        r = hard_sigmoid(x @ kr + br + h @ rr)
        candidate = np.tanh(x @ kh + bh + (r * h) @ rh)
        h = z * h + (1 - z) * candidate
        outputs.append(h)
    return np.stack(outputs).astype(np.float32), h.astype(np.float32)


def keras2_model() -> ModelSpec:
    config = {  # what tf-keras 2.x writes for GRU(..., time_major=True) in a Sequential
        "name": "gru",
        "trainable": True,
        "dtype": "float32",
        "batch_input_shape": [None, None, F],
        "return_sequences": True,
        "return_state": False,
        "go_backwards": False,
        "stateful": False,
        "unroll": False,
        "time_major": True,
        "units": U,
        "activation": "tanh",
        "recurrent_activation": "hard_sigmoid",
        "use_bias": True,
        "kernel_initializer": {"class_name": "GlorotUniform", "config": {"seed": None}},
        "recurrent_initializer": {
            "class_name": "Orthogonal",
            "config": {"gain": 1.0, "seed": None},
        },
        "bias_initializer": {"class_name": "Zeros", "config": {}},
        "kernel_regularizer": None,
        "recurrent_regularizer": None,
        "bias_regularizer": None,
        "activity_regularizer": None,
        "kernel_constraint": None,
        "recurrent_constraint": None,
        "bias_constraint": None,
        "dropout": 0.0,
        "recurrent_dropout": 0.0,
        "implementation": 1,
        "reset_after": False,
    }
    return ModelSpec.from_layer_configs(
        "keras2", [{"class_name": "GRU", "config": config}], keras_version=2
    )


@pytest.fixture
def case(rng: np.random.Generator) -> dict:  # type: ignore[type-arg]
    spec = keras2_model()
    weights = {
        "gru": {
            "kernel": rng.normal(size=(F, 3 * U)).astype(np.float32),
            "recurrent_kernel": rng.normal(size=(U, 3 * U)).astype(np.float32) * 0.5,
            "bias": rng.normal(size=(3 * U,)).astype(np.float32),
        }
    }
    x = rng.normal(size=(T, B, F)).astype(np.float32)
    h0 = rng.normal(size=(B, U)).astype(np.float32)
    sequence, final = keras2_gru_reference(
        x, weights["gru"]["kernel"], weights["gru"]["recurrent_kernel"], weights["gru"]["bias"], h0
    )
    return {
        "spec": spec,
        "weights": weights,
        "x": x,
        "h0": h0,
        "sequence": sequence,
        "final": final,
    }


def test_spec_reads_keras2_config(case: dict) -> None:  # type: ignore[type-arg]
    spec = case["spec"]
    assert spec.time_major and spec.keras_version == 2
    assert spec.layers[0].cell.recurrent_activation_fn.onnx_gru.alpha == 0.2  # type: ignore[attr-defined]


def test_torch_matches_formula(case: dict) -> None:  # type: ignore[type-arg]
    model = Sequential.from_spec(case["spec"], case["weights"])
    with torch.no_grad():
        outputs, states = model.forward_with_states(
            torch.from_numpy(case["x"]), states={"gru": [torch.from_numpy(case["h0"])]}
        )
    assert outputs[0].shape == (T, B, U)  # time-major out
    assert_close([outputs[0].numpy(), states["gru"][0].numpy()], [case["sequence"], case["final"]])


def test_onnx_matches_formula(case: dict) -> None:  # type: ignore[type-arg]
    spec, weights = case["spec"], case["weights"]
    session = onnx_session(spec, weights)
    mask = np.ones((T, B), bool)
    outputs, final = run_onnx(session, spec, case["x"], mask, {"gru": [case["h0"]]})
    assert_close([outputs[0], final[0]], [case["sequence"], case["final"]])
    node = gru_node_names(build_model_graph(spec, weights).model)[0]
    assert node["activations"] == [b"HardSigmoid", b"Tanh"]
    assert node["activation_alpha"] == pytest.approx([0.2]) and node[
        "activation_beta"
    ] == pytest.approx([0.5])
    assert node["linear_before_reset"] == 0


def test_time_major_mask_is_time_major_too(case: dict) -> None:  # type: ignore[type-arg]
    """A time-major model's mask is (time, batch); right padding must still be exact."""
    spec, weights = case["spec"], case["weights"]
    session = onnx_session(spec, weights)
    mask = np.ones((T, B), bool)
    mask[4:, 1] = False
    outputs, final = run_onnx(session, spec, case["x"], mask, {"gru": [case["h0"]]})
    short_seq, short_final = keras2_gru_reference(
        case["x"][:4, 1:2],
        weights["gru"]["kernel"],
        weights["gru"]["recurrent_kernel"],
        weights["gru"]["bias"],
        case["h0"][1:2],
    )
    assert_close([final[0][1:2], outputs[0][:4, 1:2]], [short_final, short_seq])
